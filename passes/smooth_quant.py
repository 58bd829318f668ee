"""SmoothQuant: migrate activation outliers into the weights with an exact per-channel rescaling.

For an activation X feeding linear layers W (q/k/v share one X, gate/up share one X), pick per
input channel j

    s_j = max|X_j|^a / max|W_j|^(1-a)        (max|W_j| over every output column of every consumer)

and rewrite X' = X / s, W' = diag(s) W, so X'W' = XW exactly in float. The 1/s is folded into
whatever produces X, which must be a per-channel affine op so that no node is added:

- "norm": the norm's scale (RMSNorm `Mul(x_normed, gamma)` as exported for llama/mistral/qwen2/
  qwen3, or a `LayerNormalization` op's scale and bias for gpt2/bert), optionally through Reshapes
  that keep the last dimension (gpt2 flattens to 2-D before its Gemm).
- "mlp": down_proj's input is `Mul(act(gate), up)`: 1/s goes into up_proj's output columns.
- "attn": o_proj's input is softmax(QK^T) V re-laid out: 1/s goes into v_proj's output columns (and
  bias). v_proj is found by its path (layout ops and one probs x V MatMul to o_proj), not by its name:
  torch.onnx dynamo names every linear node_linear_*. With GQA one kv channel (g, d) feeds every query head of its group, so s is tied across the
  heads of a group (stats and weight maxima are max-reduced over the group before computing s).
  The present.*.value outputs then hold V/s: consistent within this model's own decode loop, which
  the report and manifest say.

A site is skipped (and reported with the reason) when folding would change anything else: the
activation (or the norm output before a Reshape) has a consumer other than the smoothed linears or
Shape (e.g. BERT's post-LN output also feeds the residual Add), a weight is shared with another node
(a tied lm_head reads the embedding table), a weight is already quantized, or the path from v_proj
to o_proj contains anything but layout ops, the KV-cache Concat and the probs x V MatMul.
Two opt-in rewrites reach more sites, each with one inserted elementwise Mul (exact in float):
- compensate_other_consumers: a norm output that also feeds something else still absorbs 1/s; the
  other consumers (BERT's residual Add) read Mul(x', s), i.e. the original x.
- explicit_scale: an activation with no foldable producer (a GELU output) gets Mul(x, 1/s) in front of
  its linears only (ModelOpt's pre_quant_scale; TensorRT fuses it into the QuantizeLinear).

Alpha is chosen per site from `alpha_grid` by the error of the site's int8 output,
||XW - Qa(X/s) Qw(sW)||^2 / ||XW||^2 (Qa: static per-tensor from the calibrated range, Qw: per-channel
or blocked as `weight_block_size`), where X is either
- search="ort": a few calibration windows of the source artifact run through ONNX Runtime (the text in the
  statistics' metadata), rows sub-sampled. That model run is calibration's (calibration/smoothing_search.py
  runs this pass's own scoring on a copy and stores each site's scale with the statistics: `eqc calibrate
  --for RECIPE` once, or `eqc compile` in memory when its statistics lack it); this pass reads the result;
- search="gram": the calibration Gram matrix extra ("gram"/"gram_rows"): weight error is exact,
  tr(dW^T G dW), activation rounding is modelled as uniform noise (step^2/12 per element);
- search="sample": the rows the calibration 'sample' observer stored (extra "sample_rows", a uniform
  random subset of the calibration tokens), scored exactly like "ort" but without any model session;
- search="auto": gram when every site has it (and the score is per-tensor/total), else sample when
  every site has it, else ort (whose search refuses a model too big for one whole-graph session, naming the
  observer to add: a silent fixed alpha would hide a worse model); search="none": `alpha` for every site.
Big models: smoothed weights of memory-mapped (external) sources stay lazy (computed when the next pass
reads them, their source mapping released after), and the source weights a site scored are released,
so smoothing never holds the model's weights in memory.
With `allow_identity` s=1 (no smoothing) also competes, so the pass never picks a worse proxy score.

Statistics: after smoothing the stats the later passes read (quantize_activations looks them up by
tensor name) describe X, not X/s. The pass replaces context.stats.tensors[name] with adjusted copies:
absmax_channel/s (exact), max = max(absmax/s) and min = -that when the original min was negative
(exact for the symmetric range quantize_activations uses; a bound otherwise), abssum_channel/s and
gram D^-1 G D^-1 (exact); "hist"/"hist_max" cannot be rescaled per channel and are dropped.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import LinearSite, const_array, constant_source, find_linear_sites, is_constant, new_initializer, release_mapping, weight_array
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.lm_head import is_lm_head
from eqcompiler.compile.folds import gated_up_projection, norm_fold, other_input, other_uses
from eqcompiler.compile.pass_base import EqcPass, ObserverNeeds
from eqcompiler.compile.qdq import int8_matmul, quantize_channelwise, step_ratio
from eqcompiler.calibration.smoothing_search import SmoothChoice, search_key, stored_choice
from eqcompiler.calibration.stats import TensorStats

SEARCHES = ("auto", "ort", "gram", "sample", "none")
GRANULARITIES = ("tensor", "token", "auto")  # how the score models activation quantization
# Where smooth_quant records the inputs it smoothed for per-token quantization (granularity "auto"):
# quantize_activations gives exactly these per-token int8, so the quantizer matches the smoothing.
NORMS = ("total", "row")
LAYOUT_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Concat"}


@dataclasses.dataclass
class SmoothQuantOptions(LayerSelection):
    alpha: float = 0.5  # used when search="none" (and as the fallback reported per site)
    alpha_grid: list[float] = dataclasses.field(default_factory=lambda: [round(0.3 + 0.05 * i, 2) for i in range(14)])
    search: str = "auto"
    allow_identity: bool = True  # s=1 competes with the grid
    min_scale: float = 1e-3  # s is clamped to [min_scale, max_scale]
    max_scale: float = 1e3
    weight_block_size: int = 0  # how the score quantizes weights: 0 per channel, else blocked
    search_windows: int = 1
    search_rows: int = 512  # rows (tokens) kept per activation for the ORT search
    # The activation quantizer the score models: "tensor" (static per-tensor scale from the
    # calibrated range, what quantize_activations emits) or "token" (per-row absmax/127 at run
    # time, what quantize_activations_dynamic emits). A score that models the wrong quantizer picks
    # the wrong alpha: per-token rows already absorb token outliers, only channel outliers remain.
    # "auto": per site, the static choice unless its static step stays coarse after smoothing
    # (step / median channel mean|x| > dynamic_above, as quantize_activations measures it): then the
    # site is re-scored per token and recorded for per-token quantization (context.per_token_inputs).
    # Smoothing a per-token input for a static range pushes its outliers into the weight rows for nothing
    # (SmolLM2 layer 11 down_proj: alpha 0.85 on a 2000x channel, measured +0.4% ppl from weights alone).
    activation_granularity: str = "tensor"
    dynamic_above: float = 0.15
    # "auto" also re-scores every static site per token and takes per-token when the static error is
    # more than static_tolerance x the per-token error (None: the step criterion alone decides).
    # Scores are the site's own output error, so this trades run-time scale computation for accuracy
    # only where static costs a measured multiple (SmolLM2: most o_proj inputs).
    static_tolerance: float | None = None
    # "total": ||dY||^2/||Y||^2 over all sampled rows, dominated by the few massive-activation tokens
    # (|y| ~ 1e4); "row": mean over rows of ||dy||^2/||y||^2, every token counts the same.
    score_norm: str = "total"
    data: str | None = None  # text for the ORT search; default: the statistics' calibration text
    smooth_norm: bool = True
    # A norm output that also feeds something else (BERT's post-LN hidden state is the next residual):
    # fold 1/s into the norm anyway and give those other consumers x' * s through one inserted Mul
    # (exact; one elementwise op in float per site). False: such sites are skipped, as folding alone
    # cannot reach them.
    compensate_other_consumers: bool = False
    # An activation with no per-channel affine producer (GELU output -> BERT/GPT-2 output dense): give
    # its linears x * (1/s) through one inserted Mul (ModelOpt's "pre_quant_scale"; TensorRT fuses it
    # into the following QuantizeLinear, ORT runs one elementwise op). False: such sites are skipped.
    explicit_scale: bool = False
    smooth_mlp: bool = True
    smooth_attention: bool = True

    def validate(self) -> None:
        if self.search not in SEARCHES:
            raise EqcError(f"smooth_quant: unknown search '{self.search}' (known: {', '.join(SEARCHES)})")
        if not self.alpha_grid or any(not 0.0 <= float(a) <= 1.0 for a in self.alpha_grid) or not 0.0 <= self.alpha <= 1.0:
            raise EqcError("smooth_quant: alpha and alpha_grid values must lie in [0, 1]")
        if not 0 < self.min_scale <= 1.0 <= self.max_scale:
            raise EqcError("smooth_quant: need 0 < min_scale <= 1 <= max_scale")
        if self.activation_granularity not in GRANULARITIES:
            raise EqcError(f"smooth_quant: activation_granularity must be one of {', '.join(GRANULARITIES)}, "
                           f"got '{self.activation_granularity}'")
        if self.score_norm not in NORMS:
            raise EqcError(f"smooth_quant: score_norm must be one of {', '.join(NORMS)}, got '{self.score_norm}'")
        if self.search == "gram" and (self.activation_granularity != "tensor" or self.score_norm != "total"):
            raise EqcError("smooth_quant: search='gram' models per-tensor activations and a total error only; "
                           "use search='ort' for activation_granularity='token' or score_norm='row'")
        if self.activation_granularity == "auto" and self.dynamic_above <= 0:
            raise EqcError("smooth_quant: activation_granularity='auto' needs dynamic_above > 0")
        if self.static_tolerance is not None and (self.static_tolerance < 1.0 or self.activation_granularity != "auto"
                                                  or self.search in ("none", "gram")):
            raise EqcError("smooth_quant: static_tolerance (>= 1) needs activation_granularity='auto' and a scored "
                           "per-token search ('sample', 'ort' or 'auto')")
        if self.search_windows < 1 or self.search_rows < 16:
            raise EqcError("smooth_quant: search_windows must be >= 1 and search_rows >= 16")


@dataclasses.dataclass
class SmoothSite:
    """One activation to smooth: how 1/s is folded, and the linears that absorb s."""

    kind: str  # "norm" | "mlp" | "attn" | "explicit" (an inserted Mul carries 1/s)
    activation: ir.Value
    sites: list[LinearSite]
    fold_scale: ir.Value | None = None  # norm: gamma (or LayerNormalization scale)
    fold_bias: ir.Value | None = None  # norm: LayerNormalization bias / producer bias
    fold_node: ir.Node | None = None
    fold_linear: LinearSite | None = None  # mlp: up_proj, attn: v_proj (1/s on its output columns)
    fold_bias_node: ir.Node | None = None  # attn: the Add of v's bias (which may be shared with other nodes)
    groups: int = 1  # attn: query heads per kv head
    head_dim: int = 0
    compensate: list = dataclasses.field(default_factory=list)  # (node, input index) that get x' * s back

    @property
    def name(self) -> str:
        return self.sites[0].name

    @property
    def channels(self) -> int:
        return self.sites[0].in_features


# ---------------------------------------------------------------------------------------------
# Finding sites


def _only_linear_consumers(x: ir.Value, linear_nodes: set[int]) -> str | None:
    """None when x feeds only the given linears (as their activation) and Shape; else the reason."""
    if x.is_graph_output():
        return f"'{x.name}' is a graph output"
    others = other_uses(x, linear_nodes)
    if others:
        node = others[0][0]
        return f"'{x.name}' also feeds {node.op_type} '{node.name}'"
    return None


def _last_dim_may_be(x: ir.Value, k: int) -> bool:
    if x.shape is None or len(x.shape) == 0:
        return x.shape is None
    last = x.shape[-1]
    return not isinstance(last, int) or last == k


def _through_reshapes(x: ir.Value, k: int) -> tuple[ir.Value, str | None]:
    """Walk up Reshapes that keep the last dim k; the source value, or a reason if one branches."""
    while True:
        p = x.producer()
        if p is None or p.op_type != "Reshape":
            return x, None
        src = p.inputs[0]
        # The consumer's weight fixes x's last dim at k; src's is k when known, or proven by the
        # caller (only a norm with a [k] scale is accepted behind a Reshape). Equal last dims make
        # the Reshape a row-major flatten that keeps every channel where it was.
        if not (_last_dim_may_be(src, k) and _last_dim_may_be(x, k)):
            return x, None
        if src.is_graph_output() or not all(u.node is p or u.node.op_type == "Shape" for u in src.uses()):
            return src, f"'{src.name}' also feeds another node besides the Reshape"
        x = src


def _attention_path(v_site: LinearSite, o_sites: dict[int, LinearSite]) -> tuple[LinearSite | None, str]:
    """Walk forward from v_proj's output; the o_proj it reaches through channel-preserving ops only.

    The candidate is found by structure, not by name (dynamo names every linear `node_linear_*`): the path
    must pass one probs x V MatMul, which no other linear's output path does (q and k meet rotary's Mul or
    the scores' Softmax, gate/up their activation, o_proj/down_proj the residual Add)."""
    start = v_site.node.outputs[0]
    frontier, seen, reached, through_probs = [start], set(), [], False
    while frontier:
        x = frontier.pop()
        for use in x.uses():
            node = use.node
            if node.op_type == "Shape":
                continue
            if id(node) in o_sites and use.idx == 0:
                reached.append(o_sites[id(node)])
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Add" and x is start:
                continue  # v bias: handled by _v_bias, the walk goes on from the Add's output below
            if node.op_type in LAYOUT_OPS:
                if node.op_type != "Concat" and use.idx != 0:
                    return None, f"v path meets {node.op_type} '{node.name}' on a shape input"
            elif node.op_type == "MatMul" and use.idx == 1 and not is_constant(node.inputs[0]):
                through_probs = True  # probs @ V keeps V's last (channel) axis
            else:
                return None, f"v path meets {node.op_type} '{node.name}'"
            frontier.extend(node.outputs)
        if x is start:
            bias_add = _v_bias_node(start)
            if bias_add is not None:
                frontier.extend(bias_add.outputs)
    if len(reached) != 1:
        return None, f"v path reaches {len(reached)} o_proj-like linears"
    if not through_probs:
        return None, "v path has no probs x V MatMul"
    return reached[0], ""


def _reshape_target(node: ir.Node) -> "np.ndarray | None":
    """A Reshape's target when constant, or its last entries when it is Concat(dynamic dims..., constants) as
    TorchScript writes [batch, seq, -1, head_dim] (only a constant last entry matters here), else None."""
    if len(node.inputs) < 2:
        return None
    target = const_array(node.inputs[1])
    if target is not None:
        return target
    concat = node.inputs[1].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 4:
        return None
    last = const_array(concat.inputs[-1])
    return None if last is None or last.size != 1 else np.array([0, 0, 0, int(last.ravel()[0])])


def _path_head_dim(v_site: LinearSite) -> int | None:
    """The head size v's output is split into, for graphs without a KV-cache record (torch.onnx dynamo's, no cache):
    the last dim of the first rank-4 value on the path from v ([batch, seq, kv_heads, head_dim] after the Reshape,
    [batch, kv_heads, seq, head_dim] after the Transpose or the cache Concat), or a constant 4-D Reshape target."""
    value, n_v = v_site.node.outputs[0], v_site.out_features
    for _ in range(6):  # v -> [bias Add] -> Reshape -> Transpose -> [Concat]: a few nodes at most
        uses = [u.node for u in value.uses() if u.node.op_type != "Shape"]
        if not uses or uses[0].op_type not in LAYOUT_OPS | {"Add"}:
            return None
        node = uses[0]
        target = _reshape_target(node) if node.op_type == "Reshape" else None
        value = node.outputs[0]
        if target is not None and target.size == 4 and int(target[-1]) > 0:
            dim = int(target[-1])
        elif value.shape is not None and len(value.shape) == 4 and isinstance(value.shape[-1], int):
            dim = int(value.shape[-1])
        else:
            continue
        return dim if dim < n_v and n_v % dim == 0 else None
    return None


def _v_bias_node(v_out: ir.Value) -> ir.Node | None:
    for use in v_out.uses():
        n = use.node
        if n.op_type == "Add":
            other = other_input(n, v_out)
            if constant_source(other) is not None:
                return n
    return None


def _weight_private(site: LinearSite, allowed: set[int]) -> bool:
    """The stored weight feeds only the given nodes directly (no tied table, no shared initializer)."""
    if site.quantized or site.transposed and site.node.inputs[1].producer() is not None:
        return False
    return all(id(u.node) in allowed for u in site.weight.uses())


def find_smooth_sites(graph: ir.Graph, opts: SmoothQuantOptions, head_info: tuple[int, int] | None
                      ) -> tuple[list[SmoothSite], dict[str, str]]:
    """Every smoothable activation, and the skipped ones with their reason."""
    linear = find_linear_sites(graph)
    by_node = {id(s.node): s for s in linear}
    by_act: dict[int, list[LinearSite]] = {}
    for s in linear:
        by_act.setdefault(id(s.activation), []).append(s)
    found: list[SmoothSite] = []
    skipped: dict[str, str] = {}
    v_candidates = [s for s in linear if s.node.op_type == "MatMul" and not s.quantized]
    attn_by_o: dict[int, tuple[LinearSite, str]] = {}
    if opts.smooth_attention:
        o_sites = {id(s.node): s for s in linear}
        for v in v_candidates:
            o, reason = _attention_path(v, o_sites)
            if o is not None:
                attn_by_o[id(o.node)] = (v, reason)
    for group in by_act.values():
        x = group[0].activation
        k = group[0].in_features
        name = group[0].name
        if not opts.selects(name):  # the first consumer's layer name
            continue
        if opts.exclude_lm_head and any(is_lm_head(s.node) for s in group):
            skipped[name] = "lm_head (exclude_lm_head: its input stays float, so smoothing would only cost its weight)"
            continue
        nodes = {id(s.node) for s in group}
        if any(s.quantized for s in group):
            skipped[name] = "weight already quantized (run smooth_quant before quantize_weights)"
            continue
        if any(s.in_features != k for s in group):
            skipped[name] = "consumers disagree on input features"
            continue
        if not all(_weight_private(s, nodes) for s in group):
            skipped[name] = "a consumer's weight is shared with another node (e.g. tied lm_head / embedding)"
            continue
        reason = _only_linear_consumers(x, nodes)
        compensate: list[tuple[ir.Node, int]] = []
        if reason is not None:
            if opts.compensate_other_consumers and not x.is_graph_output() and norm_fold(x, k) is not None:
                compensate = other_uses(x, nodes)
            elif opts.explicit_scale:
                found.append(SmoothSite("explicit", x, group))  # the Mul feeds the linears only
                continue
            else:
                skipped[name] = reason
                continue
        if len(group) == 1 and id(group[0].node) in attn_by_o and not compensate:
            v, _ = attn_by_o[id(group[0].node)]
            if not _weight_private(v, {id(v.node)}):
                skipped[name] = f"v projection {v.name} has a shared weight"
                continue
            n_v = v.out_features
            if k % n_v:
                skipped[name] = f"o input {k} channels is not a multiple of v's {n_v}"
                continue
            groups = k // n_v
            head_dim = 0
            if groups > 1:
                head_dim = head_info[1] if head_info is not None else _path_head_dim(v)
                if not head_dim:
                    skipped[name] = ("GQA without known head_dim (manifest kv_cache, or a rank-4 Reshape of v) cannot "
                                     "tie scales per kv head")
                    continue
                if n_v % head_dim:
                    skipped[name] = "v width is not a multiple of head_dim"
                    continue
            bias_node = _v_bias_node(v.node.outputs[0])
            bias = None
            if bias_node is not None:
                bias = other_input(bias_node, v.node.outputs[0])
                source = constant_source(bias)
                if source.shape is None or tuple(source.shape) != (n_v,):
                    skipped[name] = "v bias is not a [N] vector"
                    continue
            found.append(SmoothSite("attn", x, group, fold_bias=bias, fold_linear=v, groups=groups, head_dim=head_dim,
                                    fold_bias_node=bias_node))
            continue
        src, reason = _through_reshapes(x, k)
        if reason is not None:
            skipped[name] = reason
            continue
        norm = norm_fold(src, k)
        if src is not x and norm is None:
            skipped[name] = "a Reshape sits between the activation and a producer that is not a norm"
            continue
        if norm is not None:
            if not opts.smooth_norm:
                continue
            node, scale, bias = norm
            found.append(SmoothSite("norm", x, group, fold_scale=scale, fold_bias=bias, fold_node=node,
                                    compensate=compensate))
            continue
        mlp = gated_up_projection(x, k, by_node)
        if mlp is not None:
            if not opts.smooth_mlp:
                continue
            up, bias = mlp
            if not _weight_private(up, {id(up.node)}):
                skipped[name] = f"producer {up.name} has a shared weight"
                continue
            found.append(SmoothSite("mlp", x, group, fold_bias=bias, fold_linear=up))
            continue
        if opts.explicit_scale:
            found.append(SmoothSite("explicit", x, group))
            continue
        p = src.producer()
        skipped[name] = f"no per-channel affine producer to fold into (produced by {p.op_type if p else 'a graph input'})"
    return found, skipped


# ---------------------------------------------------------------------------------------------
# Scales and their search


def _weight_rows_absmax(site: LinearSite) -> np.ndarray:
    w = np.abs(weight_array(site.weight))
    return w.max(axis=0) if site.transposed else w.max(axis=1)


def _kxn(site: LinearSite) -> np.ndarray:
    w = weight_array(site.weight).astype(np.float32)
    return w.T if site.transposed else w


def _tie(v: np.ndarray, site: SmoothSite) -> np.ndarray:
    """Per o_proj channel -> per v channel (max over the query heads of each kv group)."""
    if site.kind != "attn" or site.groups == 1:
        return v
    hd, g = site.head_dim, site.groups
    heads = v.reshape(-1, hd)  # [n_heads, hd], query head h belongs to kv head h // g
    return heads.reshape(-1, g, hd).max(axis=1).reshape(-1)


def _untie(v: np.ndarray, site: SmoothSite) -> np.ndarray:
    if site.kind != "attn" or site.groups == 1:
        return v
    hd, g = site.head_dim, site.groups
    return np.repeat(v.reshape(-1, 1, hd), g, axis=1).reshape(-1)


def compute_scale(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, site: SmoothSite,
                  opts: SmoothQuantOptions) -> np.ndarray:
    """s per input channel of the consumers (o_proj channels for attn, tied per kv group)."""
    xa = np.maximum(_tie(x_absmax.astype(np.float64), site), 1e-5)
    wa = np.maximum(_tie(w_absmax.astype(np.float64), site), 1e-5)
    s = np.clip(xa ** alpha / wa ** (1.0 - alpha), opts.min_scale, opts.max_scale)
    return _untie(s, site).astype(np.float32)


def _quant_weight(w: np.ndarray, block: int) -> np.ndarray:
    """Dequantized int8 weight [K,N], per output channel or blocked along K."""
    return quantize_channelwise(w, axis=0 if block else 1, bits=8, block_size=block).dequantize()


def _act_step(x: np.ndarray, granularity: str, amax: float) -> np.ndarray | float:
    """The int8 step of x [R,K]: per row (absmax/127, as quantize_activations_dynamic computes it) or
    per tensor from the calibrated range."""
    if granularity == "token":
        return np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127.0), np.float32(1e-8))
    return amax / 127.0 if amax > 0 else 1.0


def quantized_output(x: np.ndarray, w: np.ndarray, granularity: str, amax: float, block: int) -> np.ndarray:
    """int8(x) @ int8(w) [R,N] in float32: x per row or per tensor, w per output channel (block 0) or
    blocked along K.

    Per channel, the integer codes are multiplied exactly (int8_matmul) and scaled once, which is both
    faster than a float product of the dequantized values and free of its rounding; a blocked weight's
    scale changes along K, so it is multiplied dequantized.
    """
    if not block:
        return _channelwise_output(x, w, granularity, amax).numpy()
    step = _act_step(x, granularity, amax)
    codes = np.clip(np.rint(x / step), -128, 127)
    return (codes * step).astype(np.float32) @ _quant_weight(w, block)


def _channelwise_output(x: np.ndarray, w: np.ndarray, granularity: str, amax: float) -> Any:
    """quantized_output for per-channel weights, as a float32 torch tensor [R,N]: _act_step's float32 steps and
    QuantizeLinear's rounding (half to even) for the codes, the int8 product exact, then scaled in place. In torch
    so that every elementwise pass over the output runs on all cores: the alpha search spends most of
    `eqc calibrate --for w8a8-dynamic` in score_ort (SmolLM2's four site shapes at 2048 rows: 66 ms a score of
    each against numpy's 77 ms, 2 cores)."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if granularity == "token":
        step: Any = torch.clamp_min(xt.abs().amax(dim=-1, keepdim=True) / 127.0, 1e-8)
    else:
        step = amax / 127.0 if amax > 0 else 1.0
    codes = torch.round(xt / step).clamp_(-128, 127).to(torch.int8)
    qw = quantize_channelwise(w, axis=1, bits=8)
    y = torch.from_numpy(int8_matmul(codes.numpy(), qw.q)).to(torch.float32)
    return y.mul_(step).mul_(torch.from_numpy(qw.scale)[None, :])


def score_ort(x: np.ndarray, w: np.ndarray, s: np.ndarray, amax_channel: np.ndarray, block: int,
              ref: np.ndarray, granularity: str = "tensor", norm: str = "total") -> float:
    """Relative squared error of the int8 output on sampled rows x [R,K]."""
    amax = float((amax_channel / s).max())
    if not block:
        return _channelwise_score(x, w, s, amax, ref, granularity, norm)
    err = quantized_output(x / s, w * s[:, None], granularity, amax, block)
    err -= ref
    if norm == "row":
        per_row = np.einsum("ij,ij->i", err, err) / np.maximum(np.einsum("ij,ij->i", ref, ref), 1e-30)
        return float(per_row.mean())
    flat, ref_flat = err.reshape(-1), ref.reshape(-1)
    return float(np.dot(flat, flat) / max(float(np.dot(ref_flat, ref_flat)), 1e-30))


def _channelwise_score(x: np.ndarray, w: np.ndarray, s: np.ndarray, amax: float, ref: np.ndarray,
                       granularity: str, norm: str) -> float:
    """score_ort for per-channel weights: the error taken in place on _channelwise_output's tensor."""
    import torch

    err = _channelwise_output(x / s, w * s[:, None], granularity, amax)
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    err.sub_(ref_t)
    if norm == "row":
        per_row = (err * err).sum(dim=1) / torch.clamp_min((ref_t * ref_t).sum(dim=1), 1e-30)
        return float(per_row.mean())
    return float(torch.dot(err.view(-1), err.view(-1))) / max(float(torch.dot(ref_t.view(-1), ref_t.view(-1))), 1e-30)


def score_gram(gram: np.ndarray, rows: int, w: np.ndarray, s: np.ndarray, amax_channel: np.ndarray,
               block: int) -> float:
    """Same error from X^T X: exact weight part, activation rounding as uniform noise."""
    wq = _quant_weight(w * s[:, None], block) / s[:, None]  # effective weight in X's units
    dw = (wq - w).astype(np.float64)
    # sum((G dW) * dW) == tr(dW^T G dW) as one BLAS product (a 3-operand einsum loops in C: minutes
    # on a [576, 49152] untied lm_head).
    weight_err = float(np.sum((gram @ dw) * dw))
    step = float((amax_channel / s).max()) / 127.0
    act_err = rows * step * step / 12.0 * float(((wq * s[:, None]).astype(np.float64) ** 2).sum())
    w64 = w.astype(np.float64)
    ref = float(np.sum((gram @ w64) * w64))
    return (weight_err + act_err) / max(ref, 1e-30)


def stored_samples(t: TensorStats, opts: SmoothQuantOptions) -> np.ndarray:
    """The calibration 'sample' observer's rows as the [R, K] x score_ort takes (at most search_rows).

    Rows are stored in key order, a uniformly random order, so the first search_rows are themselves
    a uniform subset.
    """
    if "sample_rows" not in t.extra:
        raise EqcError("smooth_quant search='sample' needs the 'sample' calibration observer "
                       "(eqc calibrate --observers minmax,absmax_channel,sample)")
    return np.asarray(t.extra["sample_rows"][:opts.search_rows], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Rewriting


def _replace_const(graph: ir.Graph, node: ir.Node, old: ir.Value, array: np.ndarray | ir.TensorProtocol,
                   suffix: str) -> ir.Value:
    """Give `node` a private, rescaled copy of constant `old` (which may be shared, or an Identity of a constant)."""
    data = array if isinstance(array, ir.TensorProtocol) else array.astype(constant_source(old).dtype.numpy())
    new = new_initializer(graph, f"{old.name}_{suffix}", data)
    for i, inp in enumerate(node.inputs):
        if inp is old:
            node.replace_input_with(i, new)
    if not old.uses() and old.name in graph.initializers and not old.is_graph_output():
        graph.initializers.pop(old.name)
    identity = old.producer()
    if identity is not None and identity.op_type == "Identity" and not old.uses() and not old.is_graph_output():
        graph.remove(identity, safe=True)
    return new


def _rescaled(value: ir.Value, scale: np.ndarray, axis: int) -> np.ndarray | ir.TensorProtocol:
    """The weight times `scale` along `axis` (in float64, cast back when stored).

    A memory-mapped (external) or already lazy weight gives a LazyTensor: computed each time a later
    pass reads it, releasing the source mapping afterwards, so a model larger than memory is never
    held whole (quantize_weights reads each weight once and drops it).
    """
    src = value.const_value
    shape = [1, 1]
    shape[axis] = -1
    factor = scale.astype(np.float64).reshape(shape)
    if not isinstance(src, (ir.ExternalTensor, ir.LazyTensor)):
        return src.numpy().astype(np.float64) * factor

    def compute() -> ir.TensorProtocol:
        out = (src.numpy().astype(np.float64) * factor).astype(src.dtype.numpy())
        release_mapping(src)
        return ir.tensor(out)

    return ir.LazyTensor(compute, dtype=src.dtype, shape=src.shape)


def apply_smoothing(graph: ir.Graph, site: SmoothSite, s: np.ndarray) -> None:
    """Fold 1/s into the producer, s into every consumer's weight rows (exact in float)."""
    inv = (1.0 / s.astype(np.float64))
    if site.kind == "explicit":
        _insert_scale(graph, site, inv)
    elif site.kind == "norm":
        _replace_const(graph, site.fold_node, site.fold_scale, weight_array(site.fold_scale) * inv, "smoothed")
        if site.fold_bias is not None:
            _replace_const(graph, site.fold_node, site.fold_bias, weight_array(site.fold_bias) * inv, "smoothed")
    else:
        lin = site.fold_linear
        col = inv if site.kind == "mlp" else _tie(inv, site)
        w = _rescaled(lin.weight, col, axis=0 if lin.transposed else 1)
        # LinearSite objects are shared between smoothing sites (v_proj absorbs s of its input and
        # 1/s of o_proj's input): keep .weight pointing at the current initializer.
        lin.weight = _replace_const(graph, lin.node, lin.weight, w, "smoothed")
        if site.fold_bias is not None:
            add = site.fold_bias_node or next(u.node for u in site.fold_bias.uses())
            _replace_const(graph, add, site.fold_bias, weight_array(site.fold_bias) * col, "smoothed")
    for lin in site.sites:
        lin.weight = _replace_const(graph, lin.node, lin.weight, _rescaled(lin.weight, s, axis=1 if lin.transposed else 0),
                                    "smoothed")
    if site.compensate:
        _compensate(graph, site, s)


def _channel_mul(graph: ir.Graph, x: ir.Value, factor: np.ndarray, dtype: ir.DataType, name: str) -> ir.Node:
    """A new (not yet inserted) Mul(x, factor[channel]) whose output is named and typed like x."""
    scale = new_initializer(graph, f"{x.name}_{name}_scale", factor.astype(dtype.numpy()))
    mul = ir.node("Mul", [x, scale], name=f"{x.name}_{name}")
    out = mul.outputs[0]
    out.name, out.dtype = f"{x.name}_{name}ed", dtype
    if x.shape is not None:
        out.shape = x.shape.copy()
    return mul


def _insert_scale(graph: ir.Graph, site: SmoothSite, inv: np.ndarray) -> None:
    """x -> Mul(x, 1/s) -> the site's linears; site.activation becomes the Mul's output."""
    mul = _channel_mul(graph, site.activation, inv, site.sites[0].weight.dtype, "smooth")
    graph.insert_before(min((lin.node for lin in site.sites), key=list(graph).index), mul)
    for lin in site.sites:
        lin.node.replace_input_with(0, mul.outputs[0])
        lin.activation = mul.outputs[0]
    site.activation = mul.outputs[0]


def _compensate(graph: ir.Graph, site: SmoothSite, s: np.ndarray) -> None:
    """Give the activation's non-linear consumers x' * s (= the original x) through one Mul."""
    # the norm's scale has x's element type (x itself may carry no type)
    mul = _channel_mul(graph, site.activation, s, site.fold_scale.dtype, "unsmooth")
    graph.insert_after(site.activation.producer(), mul)
    for node, idx in site.compensate:
        node.replace_input_with(idx, mul.outputs[0])


def adjusted_stats(t: TensorStats, s: np.ndarray) -> TensorStats:
    """Statistics of X/s from those of X (see the module docstring for what is exact)."""
    amax = t.absmax_channel / s
    m = float(amax.max())
    extra: dict[str, np.ndarray] = {}
    for key, value in t.extra.items():
        if key == "abssum_channel":
            extra[key] = value / s
        elif key == "gram":
            inv = 1.0 / s.astype(np.float64)
            extra[key] = value * inv[:, None] * inv[None, :]
        elif key == "sample_rows":
            extra[key] = (value / s).astype(np.float32)
        elif key in ("hist", "hist_max"):
            continue
        else:
            extra[key] = value
    return TensorStats(min=-m if t.min < 0 else 0.0, max=m if t.max > 0 else 0.0,
                       absmax_channel=amax.astype(np.float32), count=t.count, extra=extra)


def _head_info(context_manifest: dict[str, Any]) -> tuple[int, int] | None:
    kv = context_manifest.get("kv_cache") or {}
    if kv.get("num_kv_heads") and kv.get("head_dim"):
        return int(kv["num_kv_heads"]), int(kv["head_dim"])
    return None


class SmoothQuantPass(EqcPass):
    name = "smooth_quant"
    Options = SmoothQuantOptions

    @classmethod
    def observers_needed(cls, options: SmoothQuantOptions) -> ObserverNeeds:
        required = {"absmax_channel"} | ({options.search} & {"gram", "sample"})
        # dynamic_above's step ratio reads mean |x| (abssum, or the sample rows when those are there)
        helpful = {"abssum"} if options.activation_granularity == "auto" else set()
        return ObserverNeeds(frozenset(required), frozenset(helpful))
    requires_stats = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.choices: dict[str, SmoothChoice] = {}  # per smoothed activation (by its name before smoothing)

    def model_rows_needed(self, model: ir.Model) -> list[str]:
        """The activations whose token rows the search scores on when it needs a model run (search 'ort'
        and the statistics lack its result), else []: calibration/smoothing_search.py runs it."""
        sites, _ = find_smooth_sites(model.graph, self.options, _head_info(self.context.manifest))
        if not sites or self._method(sites) != "ort":
            return []
        key = search_key(self.options)
        if all(stored_choice(self.context.stats.get(s.activation.name), key) is not None for s in sites):
            return []
        return [s.activation.name for s in sites]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        sites, skipped = find_smooth_sites(graph, opts, _head_info(self.context.manifest))
        if not sites:
            raise EqcError("smooth_quant found no smoothable activation"
                           + (f" (skipped: {json.dumps(skipped)[:300]})" if skipped else ""))
        stats = self.context.stats
        for site in sites:
            t = stats.get(site.activation.name)
            if t.absmax_channel is None or t.absmax_channel.shape[0] != site.channels:
                raise EqcError(f"statistics for '{site.activation.name}' have no per-channel maxima of width {site.channels}")
        method = self._method(sites)
        samples = {}
        if method == "sample":
            samples = {s.activation.name: stored_samples(stats.get(s.activation.name), opts) for s in sites}
        chosen: dict[str, Any] = {}
        key = search_key(opts)
        for site in sites:
            name = site.activation.name
            t = stats.get(name)
            if method == "ort":  # the search calibration ran on the model (calibration/smoothing_search.py)
                choice = stored_choice(t, key)
                if choice is None or choice.scale.shape != (site.channels,):
                    raise EqcError(f"smooth_quant search='ort': the statistics hold no alpha search for '{name}' with "
                                   "these options; `eqc calibrate --for RECIPE` stores it (`eqc compile` runs it "
                                   "when its statistics lack it)")
            else:
                choice = SmoothChoice(*self._choose_site(site, t, method, samples.get(name)))
            self.choices[name] = choice
            s, alpha, score, base, granularity = (choice.scale, choice.alpha, choice.score, choice.base,
                                                  choice.granularity)
            read = [x.weight.const_value for x in site.sites + ([site.fold_linear] if site.fold_linear else [])]
            apply_smoothing(graph, site, s)  # an "explicit" site's activation becomes the inserted Mul's output
            if granularity == "token" and opts.activation_granularity == "auto":
                self.context.per_token_inputs.append(site.activation.name)
            for tensor in read:
                release_mapping(tensor)  # pages the score touched; lazy smoothed copies re-map when read
            stats.tensors[site.activation.name] = adjusted_stats(t, s)
            chosen[site.name] = {"kind": site.kind, "alpha": alpha, "tensor": site.activation.name, "scored_for": granularity,
                                 "consumers": [x.name for x in site.sites],
                                 **({"compensated": [n.name for n, _ in site.compensate]} if site.compensate else {}),
                                 "channel_max_ratio_before": _ratio(t.absmax_channel),
                                 "channel_max_ratio_after": _ratio(t.absmax_channel / s),
                                 **({"score": score, "score_unsmoothed": base} if score is not None else {})}
        attn = [c for c in chosen.values() if c["kind"] == "attn"]
        if attn:
            self.context.manifest.setdefault("smoothing", {})["kv_value_divided_by_scale"] = True
        self.report({"method": method, "sites": chosen, "skipped": skipped,
                     "per_token_inputs": list(self.context.per_token_inputs),
                     "stats_adjusted": sorted(s.activation.name for s in sites),
                     "note": ("present.*.value hold V/s for smoothed attention sites (consistent within this model)"
                              if attn else "")})
        return ir.passes.PassResult(model, modified=True)

    def _method(self, sites: list[SmoothSite]) -> str:
        search = self.options.search
        if search != "auto":
            return search
        if self.options.activation_granularity != "tensor" or self.options.score_norm != "total":
            return self._rows_method(sites)  # the Gram score cannot model per-token quantization or per-row errors
        has_gram = all("gram" in self.context.stats.get(s.activation.name).extra for s in sites)
        return "gram" if has_gram else self._rows_method(sites)

    def _rows_method(self, sites: list[SmoothSite]) -> str:
        """search='auto' without gram: stored sample rows, else the search calibration runs on the model."""
        if all("sample_rows" in self.context.stats.get(s.activation.name).extra for s in sites):
            return "sample"
        return "ort"

    def _choose_site(self, site: SmoothSite, t: TensorStats, method: str, x: np.ndarray | None
                     ) -> tuple[np.ndarray, float | None, float | None, float | None, str]:
        """The site's scale, chosen for the activation quantizer it will get (see 'auto')."""
        opts = self.options
        if opts.activation_granularity != "auto":
            return (*self._choose(site, t, method, x, opts.activation_granularity), opts.activation_granularity)
        chosen = self._choose(site, t, method, x, "tensor")
        coarse = step_ratio(adjusted_stats(t, chosen[0]), float((t.absmax_channel / chosen[0]).max()) / 127.0) > opts.dynamic_above
        if not coarse and opts.static_tolerance is None:
            return (*chosen, "tensor")
        token = self._choose(site, t, method, x, "token")
        if coarse or chosen[2] > opts.static_tolerance * token[2]:
            return (*token, "token")
        return (*chosen, "tensor")

    def _choose(self, site: SmoothSite, t: TensorStats, method: str, x: np.ndarray | None, granularity: str
                ) -> tuple[np.ndarray, float | None, float | None, float | None]:
        opts = self.options
        w_abs = np.max([_weight_rows_absmax(s) for s in site.sites], axis=0)
        if method == "none":
            return compute_scale(t.absmax_channel, w_abs, opts.alpha, site, opts), opts.alpha, None, None
        w = np.concatenate([_kxn(s) for s in site.sites], axis=1)
        if method == "gram":
            if "gram" not in t.extra or "gram_rows" not in t.extra:
                raise EqcError(f"smooth_quant search='gram' needs the 'gram' observer for '{site.activation.name}' "
                               "(eqc calibrate --observers gram)")
            gram, rows = t.extra["gram"].astype(np.float64), float(t.extra["gram_rows"])

            def score(s: np.ndarray) -> float:
                return score_gram(gram, rows, w, s, t.absmax_channel, opts.weight_block_size)
        else:
            ref = x @ w

            def score(s: np.ndarray) -> float:
                return score_ort(x, w, s, t.absmax_channel, opts.weight_block_size, ref,
                                 granularity, opts.score_norm)
        ones = np.ones(site.channels, np.float32)
        base = score(ones)
        best = (base, None, ones) if opts.allow_identity else (float("inf"), None, ones)
        for alpha in opts.alpha_grid:
            s = compute_scale(t.absmax_channel, w_abs, float(alpha), site, opts)
            err = score(s)
            if err < best[0]:
                best = (err, float(alpha), s)
        return best[2], best[1], best[0], base


def _ratio(absmax: np.ndarray) -> float:
    """max/median of the per-channel maxima: how much one channel dominates the tensor's range."""
    return float(absmax.max() / max(float(np.median(absmax)), 1e-12))
