"""Fuse a decoder's attention block into `com.microsoft::GroupQueryAttention` (ort-cpu lowering).

Matched (eager attention with rotate-half rotary embedding and a KV cache, as exported; identity Casts
removed first; q/k/v are the projections' outputs, [B, S, heads*D], or Slices of one fused qkv projection):

    q  = Transpose(Reshape(q_in), [0,2,1,3])            k, v likewise, with kv_heads
    q' = Add(Mul(q, Unsqueeze(cos)), Mul(Concat(Neg(Slice(q, half:)), Slice(q, :half)), Unsqueeze(sin)))
    present_k = Concat(past_k, k', axis=-2)              present_v = Concat(past_v, v, axis=-2)
    K  = Reshape(Expand(Unsqueeze(present_k)))           (repeat_kv; absent when heads == kv_heads)
    p  = Softmax(Add(Mul(MatMul(q', Transpose(K, [0,1,3,2])), scale), mask))
    y  = Reshape(Transpose(MatMul(p, V), [0,2,1,3]))

with these optional parts (each family's exporter leaves one or another):
- a per-head RMSNorm over D on q and k, between the Reshape and the Transpose (qwen3) or after the Transpose
  (gemma3), weight on either side of the last Mul (gemma's 1 + w is folded into the exported weight);
- partial rotary (phi3, even at factor 1.0): q' = Concat(rotate(q[..., :R]), q[..., R:]), R the tables' width;
- soft-capped scores (gemma2): Mul(Tanh(Div(scores, cap)), cap) between the scale and the mask.

Replacement:

    q_r = RotaryEmbedding(q_in, position_ids, cos_cache, sin_cache)     (com.microsoft, [B, S, H*D];
    k_r = RotaryEmbedding(k_in, ...)                                      rotary_embedding_dim=R when R < D)
    y, present_k, present_v = GroupQueryAttention(q_r, k_r, v_in, past_k, past_v, seqlens_k, total_len,
                                                  attention_bias=bias, softcap=cap)

The rotary tables are the graph's own cos/sin computation evaluated for positions 0..max_positions-1
(so any rope scaling the exporter baked in is kept; gemma3's local and global bases give two table pairs).
Rotary stays outside the attention kernel: ORT's fused rotary ignores position_ids on a first prompt, which
would break left-padded batches. `bias` is a padding bias built from attention_mask when the graph's mask
proves to be plain causal + padding (then nothing but the attention reads the past, and onnxruntime-genai may
share its cache buffer), else the graph's own mask (a sliding window, say). Either way prompt, decode step and
left-padded batch give the unfused graph's numbers. seqlens_k is total_length - 1 for every row (padding is in
the bias). ORT's CPU kernel computes scores * scale, then softcap * tanh(. / softcap), then adds the bias: the
order gemma2's graph has.

A per-head q/k norm has to act before the rotary, so with rotary outside the kernel it is re-emitted in front of
the RotaryEmbedding: the graph's own ops on q_in reshaped to [B, S, heads, D] (over the last axis the norm gives
the same numbers before or after the heads' Transpose), then Reshape back to [B, S, heads*D]. Not the
alternatives: GroupQueryAttention's q_norm_weight / k_norm_weight inputs apply the norm before the kernel's own
rotary only, and ORT 1.32's CPU kernel refuses them (measured: "q_norm_weight / k_norm_weight inputs are not
supported", CUDA and WebGPU only); ORT's SimplifiedLayerNormalization sits in the ONNX domain without an ONNX
schema, so a graph holding it fails onnx.checker. ORT's session-level fusion turns the re-emitted ops into one SimplifiedLayerNormalization per
head norm anyway (tests/test_fusions.py checks it), as it does in the unfused graph.
ORT's CPU kernel needs head_dim % 16 == 0 and refuses batch > 1 with both a past and more than one new
token (chunked prefill of a batch); the check and the targets documentation say so. Blocks that stay unfused
are warned about with the reason of the deepest failed match (a check's reason, or the node where the graph
leaves the pattern), also in the report's "refused".
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import (MatchingTracer, MatchResult, MatchStatus, RewriteRuleClassBase, RewriteRuleSet,
                                 pattern)

from eqcompiler.compile.fusion import (MS_DOMAIN, const_ints, is_float32, name_fused_nodes, prepare_for_fusion, scalar,
                                      use_ms_domain)
from eqcompiler.compile.graph import const_array, int_constant, new_initializer, scalar_initializer
from eqcompiler.compile.pass_base import EqcPass

DEFAULT_MAX_POSITIONS = 4096  # rotary table length when the model's config does not say
MASK_INPUT = "attention_mask"


@dataclasses.dataclass
class RotaryTables:
    position_ids: ir.Value
    cos: ir.Value  # [max_positions, D/2]
    sin: ir.Value


def _upstream_nodes(values: list[ir.Value]) -> tuple[list[ir.Node], set[ir.Value]]:
    """Nodes computing `values` (topological order) and the graph inputs they read."""
    seen: dict[int, ir.Node] = {}
    inputs: set[ir.Value] = set()
    stack = [v for v in values]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            if value.const_value is None:
                inputs.add(value)
            continue
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(v for v in node.inputs if v is not None)
    graph = values[0].graph
    order = {id(n): i for i, n in enumerate(graph)} if graph is not None else {}
    return sorted(seen.values(), key=lambda n: order.get(id(n), 0)), inputs


def _subgraph_model(nodes: list[ir.Node], inputs: dict[str, int], outputs: list[str], opsets: dict[str, int]) -> onnx.ModelProto:
    """A standalone model of `nodes` (their constant inputs inlined) for onnx's reference evaluator."""
    protos, initializers = [], {}
    for node in nodes:
        protos.append(ir.serde.serialize_node(node))
        for v in node.inputs:
            if v is not None and v.producer() is None and v.const_value is not None and v.name not in initializers:
                # inline: an initializer stored as external data would point at a file the evaluator cannot see
                initializers[v.name] = onnx.numpy_helper.from_array(np.asarray(v.const_value.numpy()), v.name)
    graph = onnx.helper.make_graph(
        protos, "subgraph", [onnx.helper.make_tensor_value_info(n, t, None) for n, t in inputs.items()],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs], list(initializers.values()))
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()
                                                         if d in ("", "ai.onnx")])


def evaluate_rotary(cos: ir.Value, sin: ir.Value, positions: int, opsets: dict[str, int]) -> tuple[ir.Value, np.ndarray, np.ndarray] | str:
    """Run the graph's own cos/sin computation for positions 0..positions-1 with onnx's reference
    evaluator (numpy; no session). Returns (position_ids input, cos [P, D], sin [P, D]) or why not."""
    from onnx.reference import ReferenceEvaluator

    nodes, graph_inputs = _upstream_nodes([cos, sin])
    if len(graph_inputs) != 1:
        return f"cos/sin depend on {sorted(v.name for v in graph_inputs)}, not on position ids alone"
    pos = next(iter(graph_inputs))
    if pos.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return f"cos/sin depend on '{pos.name}', which is not an integer input"
    model = _subgraph_model(nodes, {pos.name: pos.dtype.value}, [cos.name, sin.name], opsets)
    feed = np.arange(positions, dtype=pos.dtype.numpy())[None, :]
    try:
        cos_t, sin_t = ReferenceEvaluator(model).run(None, {pos.name: feed})
    except Exception as exc:  # an op the reference evaluator lacks, or a shape it cannot take
        return f"could not evaluate the rotary tables ({type(exc).__name__}: {exc})"
    cos_t, sin_t = np.asarray(cos_t), np.asarray(sin_t)
    if cos_t.ndim != 3 or cos_t.shape[:2] != (1, positions) or sin_t.shape != cos_t.shape:
        return f"cos/sin have shape {cos_t.shape}, not [1, positions, head_dim]"
    return pos, cos_t[0], sin_t[0]


def is_causal_padding_mask(mask: ir.Value, graph: ir.Graph, opsets: dict[str, int], positions: int) -> bool:
    """Whether the graph's additive mask is exactly "causal, plus the attention_mask's padding" (no sliding
    window, no other rule). Evaluated with onnx's reference evaluator on a left-padded batch with a past, and on
    a decode step at the last position the model was built for (a sliding window shorter than that shows there).
    Then GroupQueryAttention's own causal masking plus a padding-only bias built from attention_mask is the same
    mask, and the graph no longer reads the past's length anywhere but in the attention (its KV buffer can be
    shared)."""
    from onnx.reference import ReferenceEvaluator

    nodes, inputs = _upstream_nodes([mask])
    if not nodes or any(v.shape is None for v in inputs):
        return False
    model = None
    for seq, past in ((3, 5), (1, max(positions - 1, 5))):
        feed = _mask_feed(inputs, batch=2, seq=seq, past=past)
        if feed is None:
            return False
        model = model or _subgraph_model(nodes, {n: onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
                                                 for n, a in feed.items()}, [mask.name], opsets)
        try:
            (got,) = ReferenceEvaluator(model).run(None, feed)
        except Exception:  # an op the reference evaluator lacks: keep the graph's own mask
            return False
        if not _is_causal_padding(np.asarray(got), feed[MASK_INPUT], seq, past):
            return False
    return True


def _mask_feed(inputs: set[ir.Value], batch: int, seq: int, past: int) -> dict[str, np.ndarray] | None:
    """Inputs for the mask's subgraph: row 0 left-padded by two tokens; None for an input it cannot make up."""
    total = past + seq
    attention = np.ones((batch, total), np.int64)
    attention[0, :2] = 0
    feed: dict[str, np.ndarray] = {}
    for value in inputs:
        if value.name == MASK_INPUT:
            feed[value.name] = attention
        elif value.name == "position_ids":
            feed[value.name] = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)[:, past:]
        elif value.name == "input_ids":
            feed[value.name] = np.zeros((batch, seq), np.int64)
        elif value.shape.rank() == 4 and all(isinstance(d, int) for d in (value.shape[1], value.shape[3])):
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32  # a quantized cache is int8/uint8
            feed[value.name] = np.zeros((batch, value.shape[1], past, value.shape[3]), dtype)  # a past input
        else:
            return None
    return feed if MASK_INPUT in feed else None


def _is_causal_padding(got: np.ndarray, attention: np.ndarray, seq: int, past: int) -> bool:
    batch, total = attention.shape
    if got.shape not in ((batch, 1, seq, total), (1, 1, seq, total)):
        return False
    rows = np.arange(seq)[:, None] + past
    blocked = (np.arange(total)[None, :] > rows)[None, None] | (attention[:, None, None, :] == 0)
    blocked = np.broadcast_to(blocked, (batch, 1, seq, total))
    got = np.broadcast_to(got, blocked.shape)
    return bool(np.all(got[blocked] <= -1e30) and np.all(got[~blocked] == 0))


def _closest_refusal(ruleset: RewriteRuleSet, model: ir.Model) -> str:
    """Why the attention blocks left did not fuse: the rules are matched again with onnxscript's tracer (which
    changes nothing) and the deepest failed match names what did not match: a check's reason, or the node where
    the graph leaves the pattern."""
    tracer = MatchingTracer()
    ruleset.apply_to_model(model, tracer=tracer)
    best = max((m for matches in tracer.best_matches_map.values() for m in matches
                if m.status != MatchStatus.SUCCESS), key=lambda m: m.score(), default=None)
    if best is None or not best.match_result.reason:
        return ""
    reason = best.match_result.reason
    if best.status == MatchStatus.CONDITION_FAILED:
        return reason
    at = next((f for f in best.match_result.failure_nodes_and_values if isinstance(f, ir.Node)), None)
    where = f" at {at.op_type} node '{at.name}'" if at is not None else ""
    return f"the graph leaves the pattern{where} ({reason.rstrip('.')})"


def _variants(graph: ir.Graph, fused: list[ir.Node]) -> dict[str, int]:
    """How many fused blocks carry each optional part (report keys only when some do)."""
    counts = {"softcapped": sum(1 for n in fused if n.attributes.get_float("softcap", 0.0) > 0),
              "partial_rotary": sum(1 for n in graph if n.op_type == "RotaryEmbedding" and n.domain == MS_DOMAIN
                                    and n.attributes.get_int("rotary_embedding_dim", 0) > 0) // 2,
              "head_norms": sum(1 for n in graph if n.name.startswith("fused_attention/head_norm_")
                                and n.name.endswith("/q/Reshape"))}
    return {k: v for k, v in counts.items() if v}


def _kv_buffer(graph: ir.Graph, unfused: int) -> str:
    """"shareable" when only GroupQueryAttention reads the past inputs (onnxruntime-genai may then pass one
    preallocated buffer as past and present), else "concat"."""
    pasts = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
    readers = {u.node.op_type for v in pasts for u in v.uses()}
    return "shareable" if pasts and not unfused and readers == {"GroupQueryAttention"} else "concat"


def _insert_early(graph: ir.Graph, nodes: list[ir.Node], after: ir.Value | None = None) -> None:
    """Put `nodes` (which read graph inputs, initializers and `after` only) at the top of the graph, or right
    after `after`'s producer, with stable output names."""
    if after is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(after.producer(), nodes)
    for node in nodes:
        node.outputs[0].name = f"{node.name}/output_0"


QK_NORMS = ("", "bshd", "bnsh")  # no per-head q/k norm; one before the heads' Transpose (qwen3); one after (gemma3)


class GroupQueryAttentionRule(RewriteRuleClassBase):
    """`tables_for(cos, sin, head_dim)` gives the shared rotary tables (or why none); `lengths` the shared
    (seqlens_k, total_sequence_length) values; `bias_for(mask)` the attention bias; `flat_shape()` the shared
    [0, 0, -1] Reshape target (needed with `qk_norm`); `next_block()` a counter that names re-emitted norm nodes.

    Every variant also matches partial rotary (`x_rot = Concat(rotate(x[..., :R]), x[..., R:])`, phi3 keeps it
    even at R = head_dim). Class variants: `qk_norm` places a per-head RMSNorm over head_dim on q and k; `softcap`
    expects soft-capped scores (`Mul(Tanh(Div(s, cap)), cap)` between the scale and the mask, gemma2). Not an
    OrValue: onnxscript does not search through one for the pattern's output nodes, so present_k would become a
    second output node and the matcher would try every pair of Concats in the graph (minutes on a 30-layer model)."""

    def __init__(self, repeat_kv: bool, tables_for, lengths: tuple[ir.Value, ir.Value], bias_for,
                 qk_norm: str = "", softcap: bool = False, flat_shape=None, next_block=None) -> None:
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}")
        variant = (("repeat_kv" if repeat_kv else "mha") + (f", qk_norm {qk_norm}" if qk_norm else "")
                   + (", softcap" if softcap else ""))
        super().__init__(name=f"GroupQueryAttention[{variant}]", remove_nodes=False)
        self.repeat_kv = repeat_kv
        self.qk_norm = qk_norm
        self.softcap = softcap
        self.tables_for = tables_for
        self.lengths = lengths
        self.bias_for = bias_for
        self.flat_shape = flat_shape
        self.next_block = next_block or itertools.count().__next__
        self._pending: dict[str, Any] = {}

    def _rotate(self, op, t, cos_u, sin_u, tag: str):
        upper = op.Slice(t, _allow_other_inputs=True, _outputs=[f"{tag}_upper"])
        lower = op.Slice(t, _allow_other_inputs=True, _outputs=[f"{tag}_lower"])
        rotated = op.Concat(op.Neg(upper), lower, axis=-1)
        return op.Add(op.Mul(t, cos_u), op.Mul(rotated, sin_u))

    def _rotary(self, op, t, cos_u, sin_u, tag: str):
        """Full rotary, or partial: the first R channels rotated, the rest passed through."""
        part = op.Slice(t, _allow_other_inputs=True, _outputs=[f"{tag}_part"])
        kept = op.Slice(t, _allow_other_inputs=True, _outputs=[f"{tag}_kept"])
        partial = op.Concat(self._rotate(op, part, cos_u, sin_u, f"{tag}_part"), kept, axis=-1)
        return pattern.OrValue([self._rotate(op, t, cos_u, sin_u, tag), partial])

    @staticmethod
    def _rms_norm(op, x, weight, eps, two, one, tag: str):
        """x * 1/sqrt(mean(x^2, last axis) + eps) * weight (the weight on either side; 1/sqrt as Reciprocal or Div)."""
        mean = op.ReduceMean(op.Pow(x, two), _allow_other_inputs=True, _allow_other_attributes=True,
                             _outputs=[f"{tag}_norm_mean"])
        root = op.Sqrt(op.Add(mean, eps))
        normed = op.Mul(x, pattern.OrValue([op.Reciprocal(root), op.Div(one, root)]))
        return pattern.OrValue([op.Mul(weight, normed), op.Mul(normed, weight)], tag_var=f"{tag}_norm_weight_first",
                               tag_values=[True, False])

    def _heads(self, op, x_in, tag: str, weight, eps, two, one):
        """[B, S, heads*D] -> [B, heads, S, D], with the variant's per-head norm."""
        x = op.Reshape(x_in, _allow_other_inputs=True, _outputs=[f"{tag}_heads"])
        if self.qk_norm == "bshd":
            x = self._rms_norm(op, x, weight, eps, two, one, tag)
        x = op.Transpose(x, perm=[0, 2, 1, 3])
        if self.qk_norm == "bnsh":
            x = self._rms_norm(op, x, weight, eps, two, one, tag)
        return x

    def _query_heads(self, q_in: ir.Value, kv_heads: int, head_dim: int) -> int | str:
        """The query's head count, or why this variant cannot take it (ORT's CPU kernel needs head_dim % 16 == 0)."""
        width = q_in.shape[-1] if q_in.shape is not None else None
        if not isinstance(width, int) or width % head_dim:
            return "query width is unknown or not a multiple of head_dim"
        heads = width // head_dim
        if heads % kv_heads or (heads != kv_heads) != self.repeat_kv:
            return f"{heads} query heads and {kv_heads} kv heads do not fit this variant"
        if head_dim % 16:
            return f"head_dim {head_dim} is not a multiple of 16 (ORT's CPU GroupQueryAttention needs it)"
        return heads

    def _repeat(self, op, kv):
        return op.Reshape(op.Expand(op.Unsqueeze(kv, _allow_other_inputs=True), _allow_other_inputs=True),
                          _allow_other_inputs=True) if self.repeat_kv else kv

    def pattern(self, op, q_in, k_in, v_in, past_k, past_v, cos, sin, scale, mask, q_norm_weight, q_norm_eps,
                q_norm_two, q_norm_one, k_norm_weight, k_norm_eps, k_norm_two, k_norm_one, cap_div, cap_mul):
        q = self._heads(op, q_in, "q", q_norm_weight, q_norm_eps, q_norm_two, q_norm_one)
        k = self._heads(op, k_in, "k", k_norm_weight, k_norm_eps, k_norm_two, k_norm_one)
        v = op.Transpose(op.Reshape(v_in, _allow_other_inputs=True), perm=[0, 2, 1, 3])
        cos_u = op.Unsqueeze(cos, _allow_other_inputs=True, _outputs=["cos_u"])
        sin_u = op.Unsqueeze(sin, _allow_other_inputs=True)
        q_rot = self._rotary(op, q, cos_u, sin_u, "q")
        k_rot = self._rotary(op, k, cos_u, sin_u, "k")
        present_k = op.Concat(past_k, k_rot, axis=-2)
        present_v = op.Concat(past_v, v, axis=-2)
        keys_t = op.Transpose(self._repeat(op, present_k), perm=[0, 1, 3, 2])
        scores = op.Mul(op.MatMul(q_rot, keys_t), scale)
        if self.softcap:
            scores = op.Mul(op.Tanh(op.Div(scores, cap_div)), cap_mul)
        scores = op.Add(scores, mask)
        probs = op.Softmax(scores, axis=-1)
        context = op.MatMul(probs, self._repeat(op, present_v))
        out = op.Reshape(op.Transpose(context, perm=[0, 2, 1, 3]), _allow_other_inputs=True)
        return out, present_k, present_v

    def check(self, context, q_in, k_in, v_in, past_k, past_v, cos, sin, scale, mask, cos_u, cap_div=None,
              cap_mul=None, **kw: Any) -> MatchResult:
        result = MatchResult()
        for value, what in ((q_in, "query"), (k_in, "key"), (v_in, "value"), (mask, "mask")):
            if not is_float32(value):
                return result.fail(f"{what} is not float32 (or its type is unknown)", value)
        shape = past_v.shape
        if shape is None or shape.rank() != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            return result.fail("past value has no static [B, kv_heads, P, head_dim] shape", past_v)
        kv_heads, head_dim = int(shape[1]), int(shape[3])
        heads = self._query_heads(q_in, kv_heads, head_dim)
        if isinstance(heads, str):
            return result.fail(heads, q_in)
        s = scalar(scale)
        if s is None or not s > 0:
            return result.fail("attention scale is not a positive scalar constant", scale)
        softcap = 0.0
        if self.softcap:  # gemma2: GroupQueryAttention's softcap does softcap * tanh(scores / softcap) after the scale
            a, b = scalar(cap_div), scalar(cap_mul)
            if a is None or b is None or not a > 0 or a != b:
                return result.fail(f"soft-cap divisor {a} and multiplier {b} are not one positive constant", cap_mul)
            softcap = a
        norms = {}
        if self.qk_norm:
            for tag in ("q", "k"):
                norm = _check_head_norm(kw, tag, head_dim)
                if isinstance(norm, str):
                    return result.fail(norm)
                norms[tag] = norm
        tables = self.tables_for(cos, sin, head_dim)
        if isinstance(tables, str):
            return result.fail(tables, cos)
        rotary_dim = tables.cos.shape[1] * 2
        for tag in ("q", "k"):
            why = _check_rotary(kw, tag, head_dim, rotary_dim, cos_u)
            if why:
                return result.fail(why)
        self._pending = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "scale": s, "tables": tables,
                         "rotary_dim": rotary_dim, "softcap": softcap, "norms": norms, "bias": self.bias_for(mask)}
        return result

    def _normed(self, op, x_in, heads: ir.Value, norm: HeadNorm, block: int, tag: str):
        """The per-head norm re-emitted on [B, S, heads, D] (the norm is over the last axis only, so before or
        after the heads' Transpose it is the same numbers), then flattened back to [B, S, heads*D] for the
        rotary outside the attention (see the module docstring for why not GroupQueryAttention's q/k norm)."""
        prefix = f"fused_attention/head_norm_{block}/{tag}"

        def node(op_type: str, *inputs, **attrs):
            name = f"{prefix}/{op_type}" if op_type not in seen else f"{prefix}/{op_type}_{seen[op_type]}"
            seen[op_type] = seen.get(op_type, 0) + 1
            return getattr(op, op_type)(*inputs, _name=name, _outputs=[f"{name}/output_0"], **attrs)

        seen: dict[str, int] = {}
        mean = node("ReduceMean", node("Pow", heads, norm.two), norm.axes, keepdims=1)
        root = node("Sqrt", node("Add", mean, norm.eps))
        inv = node("Div", norm.one, root) if norm.one is not None else node("Reciprocal", root)
        scaled = node("Mul", heads, inv)
        normed = node("Mul", norm.weight, scaled) if norm.weight_first else node("Mul", scaled, norm.weight)
        return node("Reshape", normed, self.flat_shape())

    def rewrite(self, op, q_in, k_in, v_in, past_k, past_v, mask, q_heads=None, k_heads=None, **_: Any):
        p = self._pending
        tables: RotaryTables = p["tables"]
        if p["norms"]:
            block = self.next_block()
            q_in = self._normed(op, q_in, q_heads, p["norms"]["q"], block, "q")
            k_in = self._normed(op, k_in, k_heads, p["norms"]["k"], block, "k")
        rotary = {"interleaved": 0}
        if p["rotary_dim"] < p["head_dim"]:
            rotary["rotary_embedding_dim"] = p["rotary_dim"]
        q_r = op.RotaryEmbedding(q_in, tables.position_ids, tables.cos, tables.sin, num_heads=p["heads"],
                                 _domain=MS_DOMAIN, **rotary)
        k_r = op.RotaryEmbedding(k_in, tables.position_ids, tables.cos, tables.sin, num_heads=p["kv_heads"],
                                 _domain=MS_DOMAIN, **rotary)
        seqlens_k, total = self.lengths
        extra = {"softcap": p["softcap"]} if p["softcap"] else {}
        out, present_k, present_v = op.GroupQueryAttention(
            q_r, k_r, v_in, past_k, past_v, seqlens_k, total, None, None, None, p["bias"],
            num_heads=p["heads"], kv_num_heads=p["kv_heads"], scale=p["scale"], _domain=MS_DOMAIN, _outputs=3, **extra)
        return out, present_k, present_v


@dataclasses.dataclass
class HeadNorm:
    """A matched per-head RMSNorm's operands (graph values, reused by the re-emitted norm)."""
    weight: ir.Value
    weight_first: bool
    eps: ir.Value
    two: ir.Value
    axes: ir.Value
    one: ir.Value | None  # None: 1/sqrt is a Reciprocal


def _check_head_norm(kw: dict[str, Any], tag: str, head_dim: int) -> HeadNorm | str:
    weight, eps, two, one = (kw.get(f"{tag}_norm_{n}") for n in ("weight", "eps", "two", "one"))
    mean = kw.get(f"{tag}_norm_mean")
    what = "query" if tag == "q" else "key"
    if weight is None or eps is None or two is None or mean is None:
        return f"{what} per-head norm was not matched"
    if scalar(two) != 2.0:
        return f"{what} norm's Pow exponent is not the constant 2"
    reduce = mean.producer()
    axes = reduce.inputs[1] if len(reduce.inputs) > 1 else None
    if const_ints(axes) not in ([-1], [3]) or reduce.attributes.get_int("keepdims", 1) != 1:
        return f"{what} norm's ReduceMean is not over the last axis with keepdims=1"
    e = scalar(eps)
    if e is None or not e >= 0.0:
        return f"{what} norm's epsilon is not a non-negative scalar constant"
    if one is not None and scalar(one) != 1.0:
        return f"{what} norm's Div numerator is not the constant 1"
    w = const_array(weight)
    if w is None or w.ndim != 1 or w.dtype != np.float32 or w.shape[0] != head_dim:
        return f"{what} norm's weight is not a float32 constant of head_dim ({head_dim}) elements"
    return HeadNorm(weight, bool(kw[f"{tag}_norm_weight_first"]), eps, two, axes, one)


def _check_rotary(kw: dict[str, Any], tag: str, head_dim: int, rotary_dim: int, cos_u: ir.Value) -> str:
    """Full rotate-half rotary over head_dim, or partial over the tables' width (then split there)."""
    what = "query" if tag == "q" else "key"
    if kw.get(f"{tag}_upper") is not None:
        if rotary_dim != head_dim:
            return f"rotary tables are {rotary_dim} wide, head_dim is {head_dim}, and the {what} is rotated whole"
        return _check_rotate_half(kw[f"{tag}_upper"], kw[f"{tag}_lower"], head_dim)
    part, kept = kw.get(f"{tag}_part"), kw.get(f"{tag}_kept")
    if part is None or kept is None:
        return f"{what} rotary was not matched"
    if rotary_dim > head_dim:
        return f"rotary tables are {rotary_dim} wide, more than head_dim {head_dim}"
    why = _check_last_axis_slice(part.producer()) or _check_last_axis_slice(kept.producer())
    if why:
        return why
    first, rest = part.producer(), kept.producer()
    if const_ints(first.inputs[1]) != [0] or (const_ints(rest.inputs[2]) or [0])[0] < head_dim:
        return f"partial rotary does not split the {what} into [:R] and [R:]"
    for split in (first.inputs[2], rest.inputs[1]):
        if const_ints(split) != [rotary_dim] and not _is_cos_width(split, cos_u):
            return f"partial rotary splits the {what} elsewhere than the tables' width {rotary_dim}"
    return _check_rotate_half(kw[f"{tag}_part_upper"], kw[f"{tag}_part_lower"], rotary_dim)


def _is_cos_width(value: ir.Value, cos_u: ir.Value) -> bool:
    """value = Unsqueeze(Gather(Shape(cos_u), -1)): the rotary tables' width, as the tracer computes it."""
    unsq = value.producer()
    gather = unsq.inputs[0].producer() if unsq is not None and unsq.op_type == "Unsqueeze" else None
    shape = gather.inputs[0].producer() if gather is not None and gather.op_type == "Gather" else None
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not cos_u:
        return False
    if shape.attributes.get_int("start", 0) != 0 or "end" in shape.attributes:
        return False
    index = const_array(gather.inputs[1])
    return index is not None and index.size == 1 and int(index.ravel()[0]) in (-1, 3)


def _check_last_axis_slice(node: ir.Node) -> str:
    if len(node.inputs) < 4:
        return "rotary Slices do not name their axes"
    if const_ints(node.inputs[3]) not in ([-1], [3]):
        return "rotary Slice is not on the last axis"
    if len(node.inputs) > 4 and node.inputs[4] is not None and const_ints(node.inputs[4]) != [1]:
        return "rotary Slice has a step"
    return ""


def _check_rotate_half(upper: ir.Value, lower: ir.Value, rotary_dim: int) -> str:
    """upper = x[..., half:], lower = x[..., :half] on the last axis, with the same `half`."""
    up, low = upper.producer(), lower.producer()
    why = _check_last_axis_slice(up) or _check_last_axis_slice(low)
    if why:
        return why
    if const_ints(low.inputs[1]) != [0]:
        return "rotary lower half does not start at 0"
    start, stop = up.inputs[1], low.inputs[2]
    if start is not stop and not (const_ints(start) == const_ints(stop) == [rotary_dim // 2]):
        # the tracer computes half = shape[-1] // 2 once and feeds it to both Slices (through Unsqueezes)
        a, b = start.producer(), stop.producer()
        same = (a is not None and b is not None and a.op_type == b.op_type == "Unsqueeze"
                and a.inputs[0] is b.inputs[0])
        if not same:
            return "rotary halves are not split at one shared midpoint"
    return ""


def rules(tables_for, lengths: tuple[ir.Value, ir.Value], bias_for, flat_shape) -> RewriteRuleSet:
    """Every variant (see GroupQueryAttentionRule); one counter names the re-emitted head norms of all of them."""
    next_block = itertools.count().__next__
    return RewriteRuleSet([GroupQueryAttentionRule.rule(repeat_kv, tables_for, lengths, bias_for, qk_norm=norm,
                                                        softcap=softcap, flat_shape=flat_shape, next_block=next_block)
                           for norm in QK_NORMS for softcap in (False, True) for repeat_kv in (True, False)])


@dataclasses.dataclass
class FuseGroupQueryAttentionOptions:
    max_positions: int | None = None  # rotary table length; default: the model's config, else 4096

    def validate(self) -> None:
        if self.max_positions is not None and (not isinstance(self.max_positions, int) or self.max_positions < 1):
            raise ValueError("max_positions must be a positive integer")


class FuseGroupQueryAttentionPass(EqcPass):
    name = "fuse_group_query_attention"
    Options = FuseGroupQueryAttentionOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        mask_input = next((v for v in graph.inputs if v.name == MASK_INPUT), None)
        if mask_input is None:
            self.context.warn(f"fuse_group_query_attention: no '{MASK_INPUT}' input; attention stays unfused")
            self.report({"fused": 0})
            return ir.passes.PassResult(model, modified=False)
        prepare_for_fusion(model)
        positions = self.options.max_positions or self.context.max_positions or DEFAULT_MAX_POSITIONS
        dims = self._mask_dims(graph, mask_input)
        lengths = self._lengths(graph, mask_input, dims)
        cache: dict[tuple[int, int], RotaryTables | str] = {}
        opsets = dict(model.opset_imports)

        def tables_for(cos: ir.Value, sin: ir.Value, head_dim: int) -> RotaryTables | str:
            key = (id(cos), id(sin))
            if key not in cache:
                cache[key] = self._tables(graph, cos, sin, head_dim, positions, opsets)
            return cache[key]

        biases: dict[int, ir.Value] = {}
        padding: list[ir.Value] = []  # the padding-only bias, built once when some mask is plain causal + padding

        def bias_for(mask: ir.Value) -> ir.Value:
            if id(mask) not in biases:
                plain = is_causal_padding_mask(mask, graph, opsets, positions)
                if plain and not padding:
                    padding.append(self._padding_bias(graph, mask_input, dims))
                biases[id(mask)] = padding[0] if plain and padding[0] is not None else mask
            return biases[id(mask)]

        flat: list[ir.Value] = []  # [0, 0, -1]: per-head norm output back to [B, S, heads*D], made once

        def flat_shape() -> ir.Value:
            if not flat:
                flat.append(int_constant(graph, "gqa_heads/flat_shape", [0, 0, -1]))
            return flat[0]

        from eqcompiler.passes.gqa_quantized_cache import kv_attention_path, quantized_cache_rules, swap_presents

        swaps: list[tuple[ir.Value, ir.Value]] = []  # a quantized cache's present outputs, moved to GQA's
        ruleset = RewriteRuleSet([*rules(tables_for, lengths, bias_for, flat_shape).rules,
                                  *quantized_cache_rules(tables_for, lengths, bias_for, swaps)])
        count = ruleset.apply_to_model(model)
        swap_presents(graph, swaps)
        left = sum(1 for node in graph.all_nodes() if node.op_type == "Softmax")
        refused = _closest_refusal(ruleset, model) if left else ""
        common_passes.RemoveUnusedNodesPass()(model)  # also drops the length nodes when nothing matched
        if count:
            use_ms_domain(model)
            name_fused_nodes(graph, "fused_attention", {"GroupQueryAttention", "RotaryEmbedding"})
        reasons = sorted({t for t in cache.values() if isinstance(t, str)})
        kv_path = kv_attention_path(graph, self.context.manifest, left)  # None for a float cache
        if kv_path is not None and isinstance(self.context.manifest.get("kv_cache"), dict):
            self.context.manifest["kv_cache"] = {**self.context.manifest["kv_cache"], "attention": kv_path}
        if left:
            why = "; ".join(reasons) or refused or "their pattern differs from eager rotary attention over a KV cache"
            if kv_path is not None:  # a quantized cache: say which path it takes, and why
                why = "; ".join([*reasons, f"quantized KV cache: {kv_path['path']}: {kv_path['why']}"])
            self.context.warn(f"fuse_group_query_attention: {left} attention block(s) stay unfused ({why})")
        fused = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
        self.report({"fused": count, "unfused": left, "rotary_positions": positions, "kv_buffer": _kv_buffer(graph, left),
                     **({"rotary_refused": reasons} if reasons else {}), **({"refused": refused} if refused else {}),
                     **({"kv_cache_path": kv_path} if kv_path else {}), **_variants(graph, fused)})
        return ir.passes.PassResult(model, modified=bool(count))

    @staticmethod
    def _mask_dims(graph: ir.Graph, mask_input: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Batch and total length of attention_mask, int64 [1] each, computed once for the lengths and bias."""
        batch = ir.node("Shape", [mask_input], {"start": 0, "end": 1}, name="gqa_mask/batch")
        total = ir.node("Shape", [mask_input], {"start": 1, "end": 2}, name="gqa_mask/total")
        _insert_early(graph, [batch, total])
        return batch.outputs[0], total.outputs[0]

    @staticmethod
    def _padding_bias(graph: ir.Graph, mask_input: ir.Value, dims: tuple[ir.Value, ir.Value]) -> ir.Value | None:
        """float [B, 1, S, T]: 0 where attention_mask is 1, the float minimum where it is 0 (S from input_ids)."""
        ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
        if ids is None:
            return None
        batch, total = dims
        pad = ir.node("Equal", [mask_input, scalar_initializer(graph, "gqa_bias/zero", 0, np.int64)], name="gqa_bias/is_pad")
        bias = ir.node("Where", [pad.outputs[0], scalar_initializer(graph, "gqa_bias/min", np.finfo(np.float32).min),
                                 scalar_initializer(graph, "gqa_bias/none", 0.0)], name="gqa_bias/bias")
        bias4 = ir.node("Unsqueeze", [bias.outputs[0], int_constant(graph, "gqa_bias/axes", [1, 2])], name="gqa_bias/b11t")
        seq = ir.node("Shape", [ids], {"start": 1, "end": 2}, name="gqa_bias/seq")
        target = ir.node("Concat", [batch, int_constant(graph, "gqa_bias/one", [1]), seq.outputs[0], total],
                         {"axis": 0}, name="gqa_bias/target_shape")
        full = ir.node("Expand", [bias4.outputs[0], target.outputs[0]], name="gqa_bias/expand")
        _insert_early(graph, [pad, bias, bias4, seq, target, full], after=total)
        full.outputs[0].dtype = ir.DataType.FLOAT
        full.outputs[0].shape = ir.Shape([mask_input.shape[0] if mask_input.shape else "batch", 1,
                                          ids.shape[1] if ids.shape else "sequence",
                                          mask_input.shape[1] if mask_input.shape else "total_sequence"])
        return full.outputs[0]

    @staticmethod
    def _lengths(graph: ir.Graph, mask_input: ir.Value, dims: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, ir.Value]:
        """seqlens_k = total_length - 1 for every row (int32 [B]); total_sequence_length (int32 scalar).
        Padding is carried by the bias, so every row's cache holds total_length entries."""
        batch, total = dims
        last = ir.node("Sub", [total, int_constant(graph, "gqa_lengths/one", [1])], name="gqa_lengths/last")
        rows = ir.node("Expand", [last.outputs[0], batch], name="gqa_lengths/rows")
        seqlens = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.INT32}, name="gqa_lengths/seqlens_k")
        total32 = ir.node("Cast", [total], {"to": ir.DataType.INT32}, name="gqa_lengths/total32")
        scalar_total = ir.node("Squeeze", [total32.outputs[0], int_constant(graph, "gqa_lengths/axis", [0])],
                               name="gqa_lengths/total_sequence_length")
        _insert_early(graph, [last, rows, seqlens, total32, scalar_total], after=total)
        seqlens.outputs[0].dtype, seqlens.outputs[0].shape = ir.DataType.INT32, ir.Shape([mask_input.shape[0] if mask_input.shape else "batch"])
        scalar_total.outputs[0].dtype, scalar_total.outputs[0].shape = ir.DataType.INT32, ir.Shape([])
        return seqlens.outputs[0], scalar_total.outputs[0]

    @staticmethod
    def _tables(graph: ir.Graph, cos: ir.Value, sin: ir.Value, head_dim: int, positions: int,
                opsets: dict[str, int]) -> RotaryTables | str:
        got = evaluate_rotary(cos, sin, positions, opsets)
        if isinstance(got, str):
            return got
        pos, cos_t, sin_t = got
        width = cos_t.shape[1]  # head_dim, or the rotated part of it (partial rotary; the rule checks which)
        if width % 2 or width > head_dim:
            return f"rotary tables are {width} wide, head_dim is {head_dim}"
        half = width // 2
        if not (np.array_equal(cos_t[:, :half], cos_t[:, half:]) and np.array_equal(sin_t[:, :half], sin_t[:, half:])):
            return "rotary tables are not rotate-half tables (the two halves differ)"
        return RotaryTables(pos, new_initializer(graph, "rotary_cos_cache", np.ascontiguousarray(cos_t[:, :half], np.float32)),
                            new_initializer(graph, "rotary_sin_cache", np.ascontiguousarray(sin_t[:, :half], np.float32)))
