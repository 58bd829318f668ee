"""GPTQ weight-only quantization (int4/int8, blocked or per channel) from calibration Gram matrices.

For a linear layer y = x W (W stored [K, N], K input channels), the output error of a weight
perturbation dW over the calibration tokens is trace(dW^T G dW) with G = sum x^T x (the "gram"
observer). GPTQ quantizes W one input channel (row) at a time and spreads each row's rounding error
over the rows not yet quantized, using the Cholesky factor of H^-1 (H = 2 G / n, dampened), so the
remaining rows compensate for it. Rows are processed in lazy blocks of 128 (the rank-1 updates stay
inside the block; the rest of W is updated once per block, a matrix product).

Group scales are computed when the loop enters each group, from the already-updated rows; with
act_order (rows taken by decreasing H diagonal) the groups stay the static, contiguous blocks of
ONNX's blocked DequantizeLinear and their scales are fixed up front from the original weights, so
the result is still a standard opset-21 DequantizeLinear(Wq, scale, zp, axis=0, block_size=g).

Sites whose weight is a token-embedding table (a tied lm_head) are left for quantize_weights, which
stores the table once for the Gather and the lm_head.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import LinearSite, embedding_gathers, find_linear_sites, node_order, weight_array
from eqcompiler.compile.layer_selection import EVERY_LAYER, LayerSelection
from eqcompiler.compile.pass_base import EqcPass, ObserverNeeds
from eqcompiler.compile.qdq import INT_RANGES, QuantizedWeight, emit_dequantize, output_error, quantize_channelwise

SUB = 16  # rows per inner sub-block of a lazy block (block sizes are powers of two >= 16)
CLIP_GRID = tuple(np.round(np.arange(1.0, 0.69, -0.025), 3))  # shrink ratios tried by the clip search


@dataclasses.dataclass
class WeightOnlyOptions(LayerSelection):
    """Options shared by the Gram-based weight-only passes (gptq, awq)."""

    bits: int = 4
    block_size: int = 128  # group size along the input features; 0 = one scale per output channel
    symmetric: bool = False  # False: uint zero point per group (asymmetric); True: int, zero point 0

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise EqcError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise EqcError(f"block_size must be 0 or a power of two >= 16, got {self.block_size}")


@dataclasses.dataclass
class GptqOptions(WeightOnlyOptions):
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal (percdamp)
    act_order: bool = False  # quantize rows by decreasing H diagonal (static groups)
    lazy_block: int = 128  # rows per lazy batch update
    clip_search: bool = True  # pick each group's range shrink by H-diagonal-weighted error
    # "error": a layer input without the 'gram' observer is refused. "skip": such layers are left
    # unquantized for the next pass (a recipe's quantize_weights rounds them to nearest), listed in
    # the report and warned: big models whose K x K Grams would not fit still compile.
    missing_gram: str = "error"

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.damp < 1.0:
            raise EqcError(f"gptq: damp must be in (0, 1), got {self.damp}")
        if self.lazy_block < 1:
            raise EqcError(f"gptq: lazy_block must be positive, got {self.lazy_block}")
        if self.missing_gram not in ("error", "skip"):
            raise EqcError(f"gptq: missing_gram must be 'error' or 'skip', got '{self.missing_gram}'")


# ----------------------------------------------------------------------------------------------
# Shared by gptq and awq: which sites, their statistics, the output-error measure.

def weight_only_sites(graph: ir.Graph, select: LayerSelection = EVERY_LAYER,
                      required_by: str | None = None) -> list[list[LinearSite]]:
    """Unquantized linear sites grouped by stored weight, tied embedding tables excluded.

    With `required_by` (a pass name), finding none is an error naming that pass.
    """
    tables = {id(g.inputs[0]) for g in embedding_gathers(graph)}
    by_weight: dict[int, list[LinearSite]] = {}
    for site in find_linear_sites(graph, select):
        if site.quantized or id(site.weight) in tables:
            continue
        by_weight.setdefault(id(site.weight), []).append(site)
    if required_by and not by_weight:
        raise EqcError(f"{required_by} matched no layer: the graph has no unquantized MatMul/Gemm with a constant weight")
    return list(by_weight.values())


def gram_of(stats: object, name: str | None, pass_name: str) -> tuple[np.ndarray, int]:
    """(G = sum x^T x as float64 [K, K], token count) of a linear input, from the 'gram' observer."""
    if name is None:
        raise EqcError(f"{pass_name}: a linear layer input has no name; cannot look up its statistics")
    t = stats.get(name)  # type: ignore[attr-defined]
    if "gram" not in t.extra:
        raise EqcError(f"{pass_name} needs the 'gram' observer, missing for '{name}': "
                       "recalibrate with `eqc calibrate --observers minmax,gram,abssum`")
    g = np.asarray(t.extra["gram"], dtype=np.float64)
    rows = int(np.asarray(t.extra.get("gram_rows", max(t.count // max(g.shape[0], 1), 1))))
    return g, max(rows, 1)


def site_matrix(site: LinearSite) -> np.ndarray:
    """The weight in MatMul orientation [K, N] (a transposed [N, K] weight is transposed back)."""
    w = weight_array(site.weight).astype(np.float32)
    return w.T if site.transposed else w


def to_stored(qw: QuantizedWeight, transposed: bool) -> QuantizedWeight:
    """A [K, N] QuantizedWeight in the orientation the weight is stored ([N, K] if transposed)."""
    if not transposed:
        return qw
    axis = 1 - qw.axis
    return dataclasses.replace(qw, q=np.ascontiguousarray(qw.q.T), scale=np.ascontiguousarray(qw.scale.T),
                               zero_point=np.ascontiguousarray(qw.zero_point.T), axis=axis)


def quantize_kn(w: np.ndarray, bits: int, symmetric: bool, block_size: int,
                clip: np.ndarray | float = 1.0) -> QuantizedWeight:
    """RTN of a [K, N] weight: blocks along K (axis 0), or per output channel (axis 1) if block_size=0.

    `clip` is a shrink ratio per (block, column) [n_blocks, N] (per column [N] when per channel).
    """
    if block_size:
        clip_arr = np.asarray(clip, dtype=np.float32)
        ratio = clip_arr.T if clip_arr.ndim == 2 else clip_arr  # quantize_channelwise wants [N, n_blocks]
        return quantize_channelwise(w, axis=0, bits=bits, symmetric=symmetric, block_size=block_size, clip_ratio=ratio)
    return quantize_channelwise(w, axis=1, bits=bits, symmetric=symmetric, clip_ratio=clip)


def replace_weight(graph: ir.Graph, group: list[LinearSite], qw_kn: QuantizedWeight) -> None:
    """Emit DequantizeLinear for a group of sites sharing one weight and point them at it."""
    order = node_order(graph)
    weight = group[0].weight
    first = min(group, key=lambda s: order[id(s.node)])
    dq = emit_dequantize(graph, to_stored(qw_kn, group[0].transposed), weight.name, before=first.node)
    for site in group:
        site.node.replace_input_with(1, dq)
    graph.initializers.pop(weight.name)


def describe(bits: int, symmetric: bool, block_size: int) -> str:
    return f"int{bits} {'sym' if symmetric else 'asym'} " + (f"g{block_size}" if block_size else "per-channel")


def stored_bytes(qw: QuantizedWeight) -> int:
    return qw.q.size * qw.bits // 8 + qw.scale.nbytes + qw.zero_point.size * qw.bits // 8


# ----------------------------------------------------------------------------------------------
# The GPTQ algorithm on a [K, N] weight.

def _group_params(w: np.ndarray, bits: int, symmetric: bool, weights: np.ndarray | None,
                  clip_search: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale [N], zero point [N]) for rows `w` [g, N] of one group, with optional shrink search.

    The search minimises sum_k weights_k * (deq - w)_k^2 per column (weights = H diagonal, the
    output-error weight of each input channel when rows are considered independently).
    """
    def params(ratio: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        qw = quantize_channelwise(w, axis=0, bits=bits, symmetric=symmetric, block_size=w.shape[0],
                                  clip_ratio=np.reshape(ratio, (-1, 1)) if np.ndim(ratio) else ratio)
        return qw.scale[0], qw.zero_point[0].astype(np.float32)

    scale, zp = params(1.0)
    if not clip_search:
        return scale, zp
    qmin, qmax = INT_RANGES[("int" if symmetric else "uint", bits)][:2]
    wt = np.ones(w.shape[0]) if weights is None else weights
    best_err = np.full(w.shape[1], np.inf)
    best_s, best_z = scale, zp
    for r in CLIP_GRID:
        s, z = params(float(r))
        deq = (np.clip(np.rint(w / s) + z, qmin, qmax) - z) * s
        err = (wt[:, None] * (deq - w) ** 2).sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s.astype(np.float32), best_z.astype(np.float32)


def gptq_quantize(w: np.ndarray, gram: np.ndarray, rows: int, bits: int = 4, symmetric: bool = False,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False, lazy_block: int = 128,
                  clip_search: bool = True) -> QuantizedWeight:
    """GPTQ of a [K, N] weight given G = sum x^T x over `rows` tokens; returns a [K, N] QuantizedWeight."""
    k, n = w.shape
    qmin, qmax, store, _ = INT_RANGES[("int" if symmetric else "uint", bits)]
    group = block_size or k
    n_groups = -(-k // group)
    h = 2.0 * np.asarray(gram, dtype=np.float64) / rows
    wf = np.asarray(w, dtype=np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    wf[dead, :] = 0.0
    h_diag = np.diag(h).copy()
    perm = np.argsort(-h_diag, kind="stable") if act_order else np.arange(k)
    scales = np.zeros((n_groups, n), np.float32)
    zps = np.zeros((n_groups, n), np.float32)
    static = act_order or not block_size
    if static:  # fixed up front from the original weights: contiguous groups, any row order
        for g in range(n_groups):
            sl = slice(g * group, min((g + 1) * group, k))
            scales[g], zps[g] = _group_params(wf[sl].astype(np.float32), bits, symmetric, h_diag[sl], clip_search)
    hp = h[np.ix_(perm, perm)]
    hp[np.diag_indices(k)] += damp * float(np.mean(np.diag(hp)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper factor U with H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise EqcError("gptq: the Hessian is not positive definite even after dampening; raise damp") from None
    wp = wf[perm]
    q_rows = np.zeros((k, n), np.float32)
    lazy = max(lazy_block, group if not static else 1)
    if not static:
        lazy = -(-lazy // group) * group  # a group never straddles two lazy blocks
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        err_block = np.zeros((i2 - i1, n))
        # Rows go in sub-blocks of SUB: the rank-1 updates touch only the sub-block, the rest of the
        # lazy block is updated by one product per sub-block (same arithmetic, less memory traffic).
        for j1 in range(i1, i2, SUB):
            j2 = min(j1 + SUB, i2)
            w1 = wp[j1:j2].copy()
            u1 = hinv[j1:j2, j1:j2]
            for i in range(j2 - j1):
                row = int(perm[j1 + i])
                g = row // group
                if not static and row % group == 0:  # entering a group (always a sub-block start)
                    end = min(j1 + i + group, k)
                    scales[g], zps[g] = _group_params(wp[j1 + i:end].astype(np.float32), bits, symmetric,
                                                      h_diag[row:row + end - j1 - i], clip_search)
                s, z = scales[g].astype(np.float64), zps[g].astype(np.float64)
                q = np.clip(np.rint(w1[i] / s) + z, qmin, qmax)
                q_rows[j1 + i] = q
                e = (w1[i] - (q - z) * s) / u1[i, i]
                w1[i + 1:] -= np.outer(u1[i, i + 1:], e)
                err_block[j1 - i1 + i] = e
            wp[j2:i2] -= hinv[j1:j2, j2:i2].T @ err_block[j1 - i1:j2 - i1]
        wp[i2:] -= hinv[i1:i2, i2:].T @ err_block
    q = np.empty((k, n), np.float32)
    q[perm] = q_rows
    if not block_size:
        return QuantizedWeight(q=q.astype(store), scale=scales[0], zero_point=zps[0].astype(store), axis=1,
                               block_size=0, bits=bits, signed=symmetric)
    return QuantizedWeight(q=q.astype(store), scale=scales, zero_point=zps.astype(store), axis=0,
                           block_size=block_size, bits=bits, signed=symmetric)


class GptqPass(EqcPass):
    name = "gptq"
    Options = GptqOptions

    @classmethod
    def observers_needed(cls, options: GptqOptions) -> ObserverNeeds:
        gram = frozenset({"gram"})  # the Hessian; missing_gram="skip" rounds such layers to nearest instead
        return ObserverNeeds(required=gram) if options.missing_gram == "error" else ObserverNeeds(helpful=gram)
    requires_stats = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        groups = weight_only_sites(graph, opts, required_by=self.name)
        layers: dict[str, dict[str, float | str]] = {}
        bytes_before = bytes_after = 0
        skipped: list[str] = []
        for group in groups:
            site = group[0]
            if opts.missing_gram == "skip" and "gram" not in self.context.stats.get(site.activation.name).extra:
                skipped.extend(s.name for s in group)
                continue
            gram, rows = gram_of(self.context.stats, site.activation.name, self.name)
            w = site_matrix(site)
            if gram.shape != (w.shape[0], w.shape[0]):
                raise EqcError(f"gptq: gram for '{site.activation.name}' is {gram.shape}, layer '{site.name}' has K={w.shape[0]}")
            qw = gptq_quantize(w, gram, rows, opts.bits, opts.symmetric, opts.block_size, opts.damp,
                               opts.act_order, opts.lazy_block, opts.clip_search)
            ref = output_error(w, gram)
            rel = output_error(qw.dequantize() - w, gram) / ref if ref > 0 else 0.0
            for s in group:
                layers[s.name] = {"format": describe(opts.bits, opts.symmetric, opts.block_size),
                                  "relative_output_error": float(f"{rel:.4g}")}
            bytes_before += site.weight.const_value.nbytes
            bytes_after += stored_bytes(qw)
            replace_weight(graph, group, qw)
        if skipped:
            self.context.warn(f"gptq: no 'gram' statistics for {len(skipped)} layer(s) (e.g. {skipped[0]}): left to "
                              "the next weight pass (round to nearest); calibrate with `--observers "
                              "minmax,absmax_channel,abssum,gram` for GPTQ")
        self.report({"layers": layers, "weight_bytes_before": int(bytes_before), "weight_bytes_after": int(bytes_after),
                     "act_order": opts.act_order, "damp": opts.damp, "skipped_without_gram": skipped})
        return ir.passes.PassResult(model, modified=bool(layers))
