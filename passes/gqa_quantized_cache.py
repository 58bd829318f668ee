"""GroupQueryAttention over a quantized KV cache: the rewrite rules fuse_group_query_attention adds for it.

quantize_kv_cache's symmetric layout (asymmetric: false) is the cache ONNX Runtime's CPU GroupQueryAttention
reads (k_quant_type / v_quant_type PER_CHANNEL, kv_cache_bit_width 8 or 4, k_scale / v_scale inputs 12 and 13).
Matched, per kind (key, value), on top of fuse_group_query_attention's eager rotary attention:

    codes     = Clip(Round(Mul(new, inv_scale)), qmin, qmax)      new: k after rotary, or v
    present   = Concat(dequant(past_q), Mul(codes, scale), axis=-2)    (what attention reads)
    present_q = Concat(past_q, store(codes), axis=2)                   (the graph's present.{i}.{kind} output)
    8 bits: dequant(p) = Mul(Cast(p, float), scale);  store(c) = Cast(c, int8)
    4 bits: dequant(p) = Mul(Sub(unpack(Cast(p, float)), 8), scale);  store(c) = Cast(pack(Add(c, 8)), uint8)

Centered cache (quantize_kv_cache's `center`, the default): new = Sub(x, center) before the quantizer, and
Add(..., center) after each dequantized part. GroupQueryAttention gets Sub(x, center) as its key and value input
(it quantizes what it is given, so the stored codes are the portable graph's); it then attends over keys and
values without their centers. For keys that is exact: every score of one query moves by the same q . center_k,
which the matched Softmax ignores (the pattern admits a scale and an additive mask only, no soft-cap). For values,
P (v - c) = P v - c since each row of P sums to 1, so c is added back to the output per query head.

Replacement: GroupQueryAttention(..., past_q_k, past_q_v, ..., k_scale=scale_k, v_scale=scale_v) whose
present outputs become the graph's present outputs (swap_presents, after the rules ran: the pattern has the
attention output only, and check() finds the present Concat from past_q). ORT's kernel quantizes the new tokens with the same arithmetic
(x * float32(1/scale), round half to even, clamp) and attends over the dequantized cache, new tokens included,
so the fused graph computes what the portable one does up to float summation order. The check refuses
(and says why) a scale that is not a constant [1, kv_heads, 1, head_dim], a reciprocal that is not exactly
float32(1/scale), or a clamp range other than the kernel's.

An asymmetric cache (zero points, per-token value scales) has no GroupQueryAttention form: its attention stays
unfused (the portable graph's SimQuant attention over a dequantized cache); `kv_attention_path` says which
path an artifact takes and why, for the compile warning, the pass report and the manifest.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from eqcompiler.compile.fusion import MS_DOMAIN, is_float32, scalar
from eqcompiler.passes.fuse_group_query_attention import GroupQueryAttentionRule, RotaryTables, _check_rotate_half

# The kernel's clamp per bit width (what quantize_kv_cache.SYMMETRIC_RANGE builds; duplicated so that a graph
# from elsewhere is checked against ORT's behaviour, not against eqc's own constant).
KERNEL_RANGE = {8: (-128.0, 127.0), 4: (-8.0, 7.0)}
INT4_BIAS = 8.0
FUSED_PATH = "fused quantized GroupQueryAttention"
UNFUSED_PATH = "unfused SimQuant attention"


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


class QuantizedCacheAttentionRule(GroupQueryAttentionRule):
    """fuse_group_query_attention's rule over quantize_kv_cache's symmetric cache of `bits` bits."""

    def __init__(self, bits: int, repeat_kv: bool, tables_for, lengths, bias_for,
                 swaps: list[tuple[ir.Value, ir.Value]], centered: bool = False) -> None:
        super().__init__(repeat_kv, tables_for, lengths, bias_for)
        self.name = (f"GroupQueryAttention[{'repeat_kv' if repeat_kv else 'mha'}, int{bits} "
                     f"{'centered ' if centered else ''}cache]")
        self.bits = bits
        self.swaps = swaps
        self.centered = centered

    # -- pattern pieces ------------------------------------------------------------------------------

    def _codes(self, op, x, tag: str):
        return op.Clip(op.Round(op.Mul(x, _allow_other_inputs=True, _outputs=[f"{tag}_scaled"])),
                       _allow_other_inputs=True, _outputs=[f"{tag}_codes"])

    def _dequant_past(self, op, past_q, scale, tag: str):
        codes = op.Cast(past_q, to=onnx.TensorProto.FLOAT)
        if self.bits == 4:
            high = op.Floor(op.Div(codes, _allow_other_inputs=True))
            low = op.Sub(codes, op.Mul(high, _allow_other_inputs=True))
            pairs = op.Concat(op.Unsqueeze(low, _allow_other_inputs=True), op.Unsqueeze(high, _allow_other_inputs=True),
                              axis=-1)
            codes = op.Sub(op.Reshape(pairs, _allow_other_inputs=True), _allow_other_inputs=True,
                           _outputs=[f"{tag}_past_unbiased"])
        return op.Mul(codes, scale)

    def _stored(self, past_q: ir.Value, codes: ir.Value) -> ir.Value | None:
        """The graph output Concat(past_q, store(codes), axis=2): what GroupQueryAttention's present replaces."""
        for use in past_q.uses():
            node = use.node
            if (node.op_type != "Concat" or len(node.inputs) != 2 or node.inputs[0] is not past_q
                    or node.attributes.get_int("axis", 0) not in (2, -2) or not node.outputs[0].is_graph_output()):
                continue
            cast = node.inputs[1].producer() if node.inputs[1] is not None else None
            want = ir.DataType.INT8 if self.bits == 8 else ir.DataType.UINT8
            if cast is None or cast.op_type != "Cast" or cast.attributes.get_int("to", 0) != want:
                continue
            if self.bits == 8 and cast.inputs[0] is codes:
                return node.outputs[0]
            if self.bits == 4 and self._packs(cast.inputs[0], codes):
                return node.outputs[0]
        return None

    @staticmethod
    def _packs(packed: ir.Value, codes: ir.Value) -> bool:
        """ReduceSum(Mul(Reshape(Add(codes, 8)), [1, 16])): nibble = code + 8, even channel low."""
        chain = []
        value = packed
        for op_type in ("ReduceSum", "Mul", "Reshape", "Add"):
            node = value.producer() if value is not None else None
            if node is None or node.op_type != op_type:
                return False
            chain.append(node)
            value = node.inputs[0]
        weights, bias = _const(chain[1].inputs[1]), _const(chain[3].inputs[1])
        return (value is codes and weights is not None and weights.reshape(-1).tolist() == [1.0, 16.0]
                and bias is not None and bias.size == 1 and float(bias.reshape(-1)[0]) == INT4_BIAS)

    def _read(self, op, x, center):
        """What attention reads of a dequantized cache part: x, or x + center in the centered layout."""
        return op.Add(x, center) if self.centered else x

    def pattern(self, op, q_in, k_in, v_in, past_k, past_v, cos, sin, scale, mask, k_scale, v_scale, k_center,
                v_center):
        q = op.Transpose(op.Reshape(q_in, _allow_other_inputs=True, _outputs=["q_heads"]), perm=[0, 2, 1, 3])
        k = op.Transpose(op.Reshape(k_in, _allow_other_inputs=True, _outputs=["k_heads"]), perm=[0, 2, 1, 3])
        v = op.Transpose(op.Reshape(v_in, _allow_other_inputs=True), perm=[0, 2, 1, 3])
        cos_u = op.Unsqueeze(cos, _allow_other_inputs=True)
        sin_u = op.Unsqueeze(sin, _allow_other_inputs=True)
        q_rot = self._rotate(op, q, cos_u, sin_u, "q")
        k_rot = self._rotate(op, k, cos_u, sin_u, "k")
        if self.centered:
            k_rot, v = op.Sub(k_rot, k_center), op.Sub(v, v_center)
        k_codes, v_codes = self._codes(op, k_rot, "k"), self._codes(op, v, "v")
        keys = op.Concat(self._read(op, self._dequant_past(op, past_k, k_scale, "k"), k_center),
                         self._read(op, op.Mul(k_codes, k_scale), k_center), axis=-2)
        values = op.Concat(self._read(op, self._dequant_past(op, past_v, v_scale, "v"), v_center),
                           self._read(op, op.Mul(v_codes, v_scale), v_center), axis=-2)
        keys_t = op.Transpose(self._repeat(op, keys), perm=[0, 1, 3, 2])
        scores = op.Add(op.Mul(op.MatMul(q_rot, keys_t), scale), mask)
        probs = op.Softmax(scores, axis=-1)
        context = op.MatMul(probs, self._repeat(op, values))
        # One output: the quantized present (Concat(past_q, store(codes))) is found from past_q in check();
        # as a second and third pattern output, unreachable from this one, it made the matcher try every Concat
        # pair of the graph (10x slower compiles).
        return op.Reshape(op.Transpose(context, perm=[0, 2, 1, 3]), _allow_other_inputs=True)

    # -- check ---------------------------------------------------------------------------------------

    def check(self, context, q_in, k_in, v_in, past_k, past_v, cos, sin, scale, mask, k_scale, v_scale,
              q_upper, q_lower, k_upper, k_lower, k_center=None, v_center=None, **bound: Any) -> MatchResult:
        result = MatchResult()
        for value, what in ((q_in, "query"), (k_in, "key"), (v_in, "value"), (mask, "mask")):
            if not is_float32(value):
                return result.fail(f"{what} is not float32 (or its type is unknown)", value)
        for past in (past_k, past_v):
            if past.producer() is not None or past.graph is None or past not in past.graph.inputs:
                return result.fail(f"quantized past '{past.name}' is not a graph input", past)
        s_k, s_v = _const(k_scale), _const(v_scale)
        if s_k is None or s_v is None or s_k.ndim != 4 or s_k.shape != s_v.shape or s_k.shape[0] != 1 or s_k.shape[2] != 1:
            return result.fail("cache scales are not constant [1, kv_heads, 1, head_dim] tensors", k_scale)
        if s_k.dtype != np.float32 or s_v.dtype != np.float32 or not (s_k > 0).all() or not (s_v > 0).all():
            return result.fail("cache scales are not positive float32", k_scale)
        kv_heads, head_dim = int(s_k.shape[1]), int(s_k.shape[3])
        centers = {}
        if self.centered:
            centers = {"k": _const(k_center), "v": _const(v_center)}
            if any(c is None or c.shape != s_k.shape or c.dtype != np.float32 or not np.isfinite(c).all()
                   for c in centers.values()):
                return result.fail("cache centers are not finite float32 constants shaped like the scales", k_center)
        presents = []
        for tag, s, past in (("k", s_k, past_k), ("v", s_v, past_v)):
            why = self._check_quantizer(s, bound[f"{tag}_scaled"], bound[f"{tag}_codes"]) or self._check_bias(tag, bound)
            stored = self._stored(past, bound[f"{tag}_codes"])
            if not why and stored is None:
                why = f"no graph output stores its codes as Concat('{past.name}', codes) in GroupQueryAttention's format"
            if why:
                return result.fail(f"{'key' if tag == 'k' else 'value'} cache: {why}")
            presents.append(stored)
        heads = self._query_heads(q_in, kv_heads, head_dim)
        if isinstance(heads, str):
            return result.fail(heads, q_in)
        why = _check_rotate_half(q_upper, q_lower, head_dim) or _check_rotate_half(k_upper, k_lower, head_dim)
        if why:
            return result.fail(why)
        s = scalar(scale)
        if s is None or not s > 0:
            return result.fail("attention scale is not a positive scalar constant", scale)
        tables = self.tables_for(cos, sin, head_dim)
        if isinstance(tables, str):
            return result.fail(tables, cos)
        self._pending = {"heads": heads, "kv_heads": kv_heads, "scale": s, "tables": tables, "bias": self.bias_for(mask),
                         "presents": presents, "centers": centers}
        return result

    def _check_quantizer(self, scale: np.ndarray, scaled: ir.Value, codes: ir.Value) -> str:
        """Mul(x, inv) by float32(1/scale) exactly, clamped to the kernel's range."""
        inv = _const(scaled.producer().inputs[1])
        if inv is None or inv.shape != scale.shape or not np.array_equal(inv, (np.float32(1) / scale).astype(np.float32)):
            return "the quantizer does not multiply by float32(1/scale) (ORT's kernel does)"
        clip = codes.producer()
        bounds = [_const(clip.inputs[i]) if len(clip.inputs) > i else None for i in (1, 2)]
        if any(b is None or b.size != 1 for b in bounds) or (float(bounds[0]), float(bounds[1])) != KERNEL_RANGE[self.bits]:
            return f"codes are not clamped to {KERNEL_RANGE[self.bits]} (ORT's int{self.bits} cache range)"
        return ""

    def _check_bias(self, tag: str, bound: dict[str, Any]) -> str:
        """4 bits: the past is read back as nibble - 8 (the kernel's bias)."""
        if self.bits != 4:
            return ""
        bias = _const(bound[f"{tag}_past_unbiased"].producer().inputs[1])
        if bias is None or bias.size != 1 or float(bias.reshape(-1)[0]) != INT4_BIAS:
            return "4-bit codes are not read back with the -8 bias ORT's kernel uses"
        return ""

    def rewrite(self, op, q_in, k_in, v_in, past_k, past_v, mask, k_scale, v_scale, **_: Any):
        p = self._pending
        tables: RotaryTables = p["tables"]
        q_r = op.RotaryEmbedding(q_in, tables.position_ids, tables.cos, tables.sin, num_heads=p["heads"],
                                 interleaved=0, _domain=MS_DOMAIN)
        k_r = op.RotaryEmbedding(k_in, tables.position_ids, tables.cos, tables.sin, num_heads=p["kv_heads"],
                                 interleaved=0, _domain=MS_DOMAIN)
        if self.centered:  # the kernel quantizes what it is given: x - center, as the portable graph stores it
            k_r = op.Sub(k_r, self._flat_center(op, "k", f"{past_k.name}/center"))
            v_in = op.Sub(v_in, self._flat_center(op, "v", f"{past_v.name}/center"))
        seqlens_k, total = self.lengths
        out, present_k, present_v = op.GroupQueryAttention(
            q_r, k_r, v_in, past_k, past_v, seqlens_k, total, None, None, None, p["bias"], None, k_scale, v_scale,
            num_heads=p["heads"], kv_num_heads=p["kv_heads"], scale=p["scale"], k_quant_type="PER_CHANNEL",
            v_quant_type="PER_CHANNEL", kv_cache_bit_width=self.bits, _domain=MS_DOMAIN, _outputs=3)
        self.swaps += list(zip(p["presents"], (present_k, present_v)))
        if self.centered:
            # Keys read without their center move every score of a query by the same q . center_k, which the
            # pattern's Softmax (scale, additive mask, no soft-cap) ignores. Values read without theirs give
            # P (v - c) = P v - c, since each row of P sums to 1: add c back per query head.
            out = op.Add(out, self._flat_center(op, "v", f"{past_v.name}/center_per_query_head",
                                                p["heads"] // p["kv_heads"]))
        return out

    def _flat_center(self, op, tag: str, name: str, per_query_head: int = 1):
        """The [1, kv_heads, 1, head_dim] center as [kv_heads * head_dim] (GQA's [batch, seq, heads * dim] inputs),
        or repeated for each query head of a kv head (its output)."""
        center = self._pending["centers"][tag][0, :, 0, :]
        flat = np.repeat(center, per_query_head, axis=0).reshape(-1).astype(np.float32)
        return op.initializer(ir.tensor(flat, name=name), name=name)


def quantized_cache_rules(tables_for, lengths, bias_for, swaps: list[tuple[ir.Value, ir.Value]]) -> list:
    """The rules; each fused block appends (graph output, GroupQueryAttention present) pairs to `swaps`."""
    return [QuantizedCacheAttentionRule.rule(bits, repeat, tables_for, lengths, bias_for, swaps, centered=centered)
            for centered in (True, False) for bits in (8, 4) for repeat in (True, False)]


def swap_presents(graph: ir.Graph, swaps: list[tuple[ir.Value, ir.Value]]) -> None:
    """Make each fused GroupQueryAttention's present the graph output (same name, place and type) that the
    portable Concat(past_q, store(codes)) was; the Concat is then dead and removed with the other nodes."""
    for old, new in swaps:
        index = list(graph.outputs).index(old)
        name, shape = old.name, old.shape
        old.name = f"{name}__portable"
        new.name, new.shape, new.dtype = name, shape, old.dtype
        graph.outputs[index] = new
    swaps.clear()


def kv_attention_path(graph: ir.Graph, manifest: dict[str, Any], unfused: int) -> dict[str, str] | None:
    """Which attention an artifact with a quantized KV cache runs, and why; None for a float cache."""
    quantized = ((manifest.get("kv_cache") or {}).get("quantized")) or {}
    pasts = [v for v in graph.inputs if v.name.startswith("past_key_values.") and v.dtype != ir.DataType.FLOAT]
    if not quantized and not pasts:
        return None
    fused = [n for n in graph if n.op_type == "GroupQueryAttention" and n.attributes.get_int("kv_cache_bit_width", 0)]
    bits = quantized.get("bits")
    if fused and not unfused:
        return {"path": FUSED_PATH, "why": f"the cache is symmetric per channel (int{bits}, frozen scales), the layout "
                                           "ORT's CPU GroupQueryAttention reads (k_quant_type/v_quant_type PER_CHANNEL)"}
    symmetric = str(quantized.get("scheme", "")).startswith("symmetric")
    if symmetric:
        why = ("the cache is GroupQueryAttention's symmetric layout but the graph around it did not match the rule "
               "(a quantizer other than the kernel's, non-constant scales, or attention the float fusion leaves "
               "unfused too)")
    else:
        granularity = {k: (quantized.get(k) or {}).get("granularity") for k in ("key", "value")}
        why = (f"the cache is asymmetric with zero points (keys per {granularity['key']}, values per "
               f"{granularity['value']}), which GroupQueryAttention cannot read (symmetric per-tensor or per-channel "
               "scales only); compile with --kv-scheme symmetric (per-channel keys and values from --calib) to fuse it")
    return {"path": UNFUSED_PATH + (f" ({len(fused)} block(s) fused)" if fused else ""), "why": why}
