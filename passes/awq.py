"""AWQ weight-only quantization: activation-aware input-channel scaling plus a clipping search.

AWQ protects the weight rows that meet large activations: the input channels of a linear layer are
scaled, x W = (x / s)(diag(s) W), with s = mean|x|^alpha (normalised), so the salient rows get a
finer share of their group's quantization grid. alpha is searched over a grid per activation,
minimising the output error summed over every layer reading that activation. The error of a
weight perturbation dW [K, N] is trace(dW^T G dW), G = sum x^T x from the calibration "gram"
observer; mean|x| comes from the "abssum" observer (extra "abssum_channel").

A weight-only artifact cannot carry x / s at run time, so 1/s is folded into what produces x:
- the constant weight of the Mul that ends an RMSNorm (or LayerNormalization's scale and bias),
  when every reader of x is a scaled layer (q/k/v, gate/up);
- the output columns of a linear layer feeding an elementwise Mul that produces x (up_proj before
  down_proj in a gated MLP: (silu(g) * (x W_up)) / s = silu(g) * (x W_up diag(1/s))).
Where neither applies (o_proj after attention, a norm also read by an unscaled tied lm_head) the
layer keeps s = 1 and gets only the clipping search. Activations are processed from the last
layer back so a fold into an earlier layer's columns happens before that layer is quantized.

The clipping search then picks, per (group, output column), a range shrink ratio minimising the
group's share of the output error (block-diagonal part of G), and is kept only if it lowers the
full error. alpha = 0 and ratio 1 are in the grids, so the result is never worse than RTN on the
calibration objective.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import LinearSite, new_initializer, node_order
from eqcompiler.compile.folds import gated_up_projection, norm_fold, other_uses
from eqcompiler.compile.pass_base import EqcPass, ObserverNeeds
from eqcompiler.passes.gptq import (WeightOnlyOptions, describe, gram_of, quantize_kn, replace_weight,
                                    site_matrix, stored_bytes, weight_only_sites)
from eqcompiler.compile.qdq import QuantizedWeight, output_error


@dataclasses.dataclass
class AwqOptions(WeightOnlyOptions):
    alpha_grid: int = 20  # alpha in {0, 1/n, ..., (n-1)/n}
    clip_search: bool = True
    max_shrink: float = 0.5  # smallest range ratio the clipping search tries
    scale: bool = True  # False: clipping search only

    def validate(self) -> None:
        super().validate()
        if self.alpha_grid < 1:
            raise EqcError(f"awq: alpha_grid must be >= 1, got {self.alpha_grid}")
        if not 0.0 < self.max_shrink <= 1.0:
            raise EqcError(f"awq: max_shrink must be in (0, 1], got {self.max_shrink}")


def abs_mean(stats: object, name: str) -> np.ndarray:
    """mean |x| per input channel from the 'abssum' observer."""
    t = stats.get(name)  # type: ignore[attr-defined]
    if "abssum_channel" not in t.extra:
        raise EqcError(f"awq needs the 'abssum' observer, missing for '{name}': "
                       "recalibrate with `eqc calibrate --observers minmax,gram,abssum`")
    total = np.asarray(t.extra["abssum_channel"], dtype=np.float64)
    tokens = max(t.count // max(total.size, 1), 1)
    return total / tokens


@dataclasses.dataclass
class Fold:
    """Where 1/s goes: constants to divide along their last axis, or a weight's output columns."""

    constants: list[ir.Value] = dataclasses.field(default_factory=list)
    node: ir.Node | None = None  # the producer whose constant inputs are replaced
    columns_of: int | None = None  # id() of a stored weight whose [K, N] columns are divided by s


def find_fold(x: ir.Value, k: int, scaled_nodes: set[int], weights: dict[int, list[LinearSite]]) -> Fold | None:
    """How to fold 1/s into x's producer (compile.folds), or None when it cannot be done exactly."""
    if x.is_graph_output() or x.is_graph_input() or other_uses(x, scaled_nodes):
        return None  # another reader would see x / s (Shape only reads the shape)
    node = x.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    norm = norm_fold(x, k)
    if norm is not None:
        node, scale, bias = norm
        return Fold(constants=[scale] + ([bias] if bias is not None else []), node=node)
    # gated MLP: x = act(gate) * up(x0); fold into the output columns of up's own (unshared, [K, N]) weight
    single = {id(g[0].node): g[0] for g in weights.values() if len(g) == 1 and not g[0].transposed}
    up = gated_up_projection(x, k, single, with_bias=False)
    return Fold(columns_of=id(up[0].weight)) if up is not None else None


def _clip_ratios(wp: np.ndarray, s: np.ndarray, gram: np.ndarray, opts: AwqOptions, grid: np.ndarray) -> np.ndarray:
    """Best shrink ratio per (group, column) [n_groups, N] using G's diagonal blocks."""
    k, n = wp.shape
    group = opts.block_size or k
    n_groups = -(-k // group)
    best = np.full((n_groups, n), np.inf)
    ratio = np.ones((n_groups, n), np.float32)
    for r in grid:
        clip = np.full((n_groups, n), r, np.float32) if opts.block_size else np.full(n, r, np.float32)
        dw = (quantize_kn(wp, opts.bits, opts.symmetric, opts.block_size, clip).dequantize() - wp) / s[:, None]
        for g in range(n_groups):
            sl = slice(g * group, min((g + 1) * group, k))
            err = np.einsum("kn,kn->n", gram[sl, sl] @ dw[sl], dw[sl])
            better = err < best[g]
            best[g] = np.where(better, err, best[g])
            ratio[g] = np.where(better, r, ratio[g])
    return ratio if opts.block_size else ratio[0]


def _error(wp: np.ndarray, s: np.ndarray, gram: np.ndarray, opts: AwqOptions, clip: np.ndarray | float = 1.0
           ) -> tuple[float, QuantizedWeight]:
    qw = quantize_kn(wp, opts.bits, opts.symmetric, opts.block_size, clip)
    return output_error((qw.dequantize() - wp) / s[:, None], gram), qw


class AwqPass(EqcPass):
    name = "awq"
    Options = AwqOptions

    @classmethod
    def observers_needed(cls, options: AwqOptions) -> ObserverNeeds:
        return ObserverNeeds(required=frozenset({"gram", "abssum"}))  # output error; mean |x| per channel
    requires_stats = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        groups = weight_only_sites(graph, opts, required_by=self.name)
        weights = {id(g[0].weight): g for g in groups}
        floats = {wid: site_matrix(g[0]) for wid, g in weights.items()}  # current float [K, N] weights
        order = node_order(graph)
        by_act: dict[int, list[int]] = {}
        for wid, g in weights.items():
            acts = {id(s.activation) for s in g}
            key = acts.pop() if len(acts) == 1 else -wid  # a weight read with several inputs: never scaled
            by_act.setdefault(key, []).append(wid)
        last_first = sorted(by_act.items(), key=lambda kv: -max(order[id(s.node)] for w in kv[1] for s in weights[w]))
        layers: dict[str, dict[str, float | str]] = {}
        bytes_before = bytes_after = 0
        for key, wids in last_first:
            x = weights[wids[0]][0].activation
            gram, _ = gram_of(self.context.stats, x.name, self.name)
            k = gram.shape[0]
            scaled_nodes = {id(s.node) for w in wids for s in weights[w]}
            fold = find_fold(x, k, scaled_nodes, weights) if (opts.scale and key >= 0) else None
            if fold is not None and fold.columns_of in wids:
                fold = None  # a layer feeding its own input: not in a transformer
            s, alpha = np.ones(k), None
            if fold is not None:
                s, alpha = self._search_scale(x.name, gram, [floats[w] for w in wids])
                self._apply_fold(graph, fold, s, floats)
            for wid in wids:
                wp = (floats[wid] * s[:, None]).astype(np.float32)
                err, qw = _error(wp, s, gram, opts)
                if opts.clip_search:
                    grid = np.round(np.arange(1.0, opts.max_shrink - 1e-9, -0.05), 3)
                    clip = _clip_ratios(wp, s, gram, opts, grid)
                    err_c, qw_c = _error(wp, s, gram, opts, clip)
                    if err_c < err:
                        err, qw = err_c, qw_c
                ref = output_error(floats[wid], gram)
                group = weights[wid]
                for site in group:
                    layers[site.name] = {"format": describe(opts.bits, opts.symmetric, opts.block_size),
                                         "alpha": alpha, "scale_folded": fold is not None,
                                         "relative_output_error": float(f"{err / ref:.4g}") if ref > 0 else 0.0}
                bytes_before += group[0].weight.const_value.nbytes
                bytes_after += stored_bytes(qw)
                replace_weight(graph, group, qw)
        self.report({"layers": layers, "weight_bytes_before": int(bytes_before), "weight_bytes_after": int(bytes_after),
                     "scaled_inputs": sum(1 for v in layers.values() if v["scale_folded"])})
        return ir.passes.PassResult(model, modified=True)

    def _search_scale(self, name: str, gram: np.ndarray, ws: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Best s = mean|x|^alpha over the alpha grid for the layers sharing input `name`."""
        opts = self.options
        mean = np.maximum(abs_mean(self.context.stats, name), 1e-8)
        gram32 = gram.astype(np.float32)
        best = (np.inf, np.ones_like(mean), 0.0)
        for i in range(opts.alpha_grid):
            alpha = i / opts.alpha_grid
            s = mean ** alpha
            s = np.clip(s / np.sqrt(s.max() * s.min()), 1e-4, 1e4)
            err = 0.0
            for w in ws:
                wp = (w * s[:, None]).astype(np.float32)
                dw = ((quantize_kn(wp, opts.bits, opts.symmetric, opts.block_size).dequantize() - wp)
                      / s[:, None].astype(np.float32))
                err += float(np.einsum("kn,kn->", gram32 @ dw, dw))
            if err < best[0]:
                best = (err, s, alpha)
        return best[1], best[2]

    def _apply_fold(self, graph: ir.Graph, fold: Fold, s: np.ndarray, floats: dict[int, np.ndarray]) -> None:
        if fold.columns_of is not None:
            floats[fold.columns_of] = (floats[fold.columns_of] / s[None, :]).astype(np.float32)
            return
        for const in fold.constants:
            arr = const.const_value.numpy()
            new = (arr / s.reshape(arr.shape).astype(arr.dtype)).astype(arr.dtype)
            value = new_initializer(graph, f"{const.name}_awq", new)
            for i, inp in enumerate(fold.node.inputs):
                if inp is const:
                    fold.node.replace_input_with(i, value)
