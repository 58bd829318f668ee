"""Quantized KV cache: the graph's past inputs and present outputs carry 8- or 4-bit integers.

Interface after the pass, per layer i and kind k in (key, value):
  inputs   past_key_values.{i}.{k}              uint8 [batch, kv_heads, past_sequence, head_dim*bits/8]
                                                (int8 for the symmetric 8-bit layout, below)
           past_key_values.{i}.{k}_scale        float16 [batch, kv_heads, past_sequence, 1]   (per-token only)
           past_key_values.{i}.{k}_zero_point   uint8   [batch, kv_heads, past_sequence, 1]   (per-token only)
  outputs  present.{i}.{k}, present.{i}.{k}_scale, present.{i}.{k}_zero_point  (same shapes, total_sequence)
4-bit codes are packed two per byte along head_dim: channel 2j in the low nibble, 2j+1 in the high one.
Dequantization is x = (q - zero_point) * scale (asymmetric min/max with 0 kept inside the range, so the
zero point is an exact integer and a constant or all-zero group dequantizes without NaN or bias).

Design (why it looks like this):
- The exported graph computes present = Concat(past, new) and runs attention on it. A cache that stays
  quantized must never re-quantize the past (error would compound every step), so only the NEW tokens
  are quantized each call: present_q = Concat(past_q, quant(new)); attention runs on
  Concat(dequant(past_q), dequant(quant(new))). Prefill (past empty) therefore sees exactly the error
  later decode steps see, and a chunked pass over a text reproduces token-by-token decoding.
- Values: per token (one scale/zero point per token and head over head_dim), computed in the graph for
  each new token (KIVI/KVQuant: value error is mixed per token by the attention weights).
- Keys: per channel (KVQuant: keys have fixed outlier channels, so per-token key scales waste the range on
  a few channels). Per-channel scales need a grouping along tokens that never changes once written;
  decode adds one token per call, so scales computed over "this call's tokens" would be per element.
  We freeze them instead: one scale/zero point per (kv head, channel) from calibration statistics
  (`eqc calibrate --observers kv`: extra kv_min_channel / kv_max_channel of present.{i}.key). They are
  graph constants, cost no cache bytes and make decode and prefill identical. Values outside the
  calibrated range saturate. key_granularity="token" (dynamic per token, like values) needs no
  calibration and is the fallback when none is given.
- Scales are stored as float16 (the quantizer uses the float16-rounded scale, so storage is exact);
  zero points as uint8. Per-token groups cost 3 bytes per (token, head), which is why an int8 cache
  with per-token values is 0.5x + 3/(2*head_dim) of an fp16 cache, not exactly 0.5x
  (value_granularity="channel" freezes value scales from calibration too and gets exactly 0.5x / 0.25x).
- Keys are quantized after RoPE (the graph's present tensors); pre-RoPE key quantization is not done.

Symmetric layout (asymmetric=False; the cache ONNX Runtime's CPU GroupQueryAttention reads, so that the ort-cpu
lowering fuses attention over it: passes/gqa_quantized_cache.py). Keys and values both per channel, frozen from
calibration, no zero points; x = q * scale with scale = max(|min|, |max|) / qmax (127 or 7) per (kv head,
channel), stored as a float32 constant [1, kv_heads, 1, head_dim] (GQA's k_scale / v_scale). New tokens are
quantized exactly as ORT's kernel does it (MLAS MlasKVQuantize, checked bit for bit in tests/test_kv_gqa.py):
  8 bits: q = clamp(round_half_even(x * float32(1 / scale)), -128, 127), stored int8
  4 bits: q = clamp(round_half_even(x * float32(1 / scale)), -8, 7), stored as q + 8 in a uint8 nibble,
          even channel in the low nibble (two per byte along head_dim)
(a multiplication by the float32 reciprocal, not a division: the two differ in the last bit now and then, and a
code then flips). With `center` (the default), x - center is quantized and read back as q * scale + center, where
scale and center are the asymmetric min/max parameters written for signed codes (centered_params): a channel
whose range sits off zero gets the asymmetric step, and GroupQueryAttention still reads it (the fused rule
subtracts the center before the kernel and restores the result after it). Attention reads dequantized past +
dequantized new tokens, which is also what the kernel does on a prompt, so the portable graph and the fused one
compute the same numbers up to float summation order.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from eqcompiler.errors import EqcError
from eqcompiler.io_names import PAST, PRESENT
from eqcompiler.compile.graph import new_initializer
from eqcompiler.compile.pass_base import EqcPass, ObserverNeeds

# The cache tensors (and, once quantized, their scales and zero points); other carried state, e.g.
# quantize_activations_ema's running scales, shares the past_key_values. prefix.
KV_PAST = re.compile(r"^past_key_values\.[0-9]+\.(key|value)(_scale|_zero_point)?$")
GRANULARITIES = ("channel", "token")
SCALE_FLOOR = 1e-5  # float16-representable; a zero-range group gets this step and quantizes to zp exactly
# Scales are stored as float16; widening by one float16 ulp before rounding keeps the stored scale >= the
# exact one, so the group's min and max stay representable (error <= scale/2 everywhere, no clipping).
SCALE_WIDEN = np.float32(1 + 2 ** -10)


# ----------------------------------------------------------------------------- numpy reference

def quant_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero_point float32 integer-valued) for asymmetric min/max over [min(lo,0), max(hi,0)].

    The scale is rounded to float16 (how per-token scales are stored) so quantizer and dequantizer agree.
    """
    qmax = float(2 ** bits - 1)
    lo = np.minimum(np.asarray(lo, np.float32), 0.0)
    hi = np.maximum(np.asarray(hi, np.float32), 0.0)
    scale = np.maximum((hi - lo) / np.float32(qmax), np.float32(SCALE_FLOOR)) * SCALE_WIDEN
    scale = scale.astype(np.float16).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.float32)
    return scale, zp


def quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes (uint8 container): saturate(round_half_even(x / scale) + zp)."""
    return np.clip(np.rint(x / scale) + zp, 0, 2 ** bits - 1).astype(np.uint8)


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


def fake_quant_per_token(x: np.ndarray, bits: int) -> np.ndarray:
    """Reference for per-token groups (reduce over the last axis, head_dim)."""
    scale, zp = quant_params(x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True), bits)
    return dequantize(quantize(x, scale, zp, bits), scale, zp)


def fake_quant_per_channel(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Reference for frozen per-channel groups; lo/hi are [kv_heads, head_dim], x [batch, heads, tokens, dim]."""
    scale, zp = quant_params(lo[None, :, None, :], hi[None, :, None, :], bits)
    return dequantize(quantize(x, scale, zp, bits), scale, zp)


def clip_error(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, ratio: float, bits: int) -> float:
    """Squared error of frozen per-channel quantization of x with the calibrated range shrunk by `ratio`."""
    r = np.float32(ratio)
    return float(((fake_quant_per_channel(x, lo * r, hi * r, bits) - x) ** 2).sum(dtype=np.float64))


def search_clip_ratio(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], bits: int,
                      grid: np.ndarray | None = None) -> tuple[float, list[float]]:
    """The range factor (one for all channels) minimising total squared error over calibration samples.

    samples: (x [batch, heads, tokens, dim], lo [heads, dim], hi [heads, dim]) per cache tensor of one kind.
    Returns (best ratio, error per grid point). One shared factor rather than one per channel: on SmolLM2 the
    per-channel MSE optimum measured on held-out text is no better than the best shared factor, and a single
    number is what a recipe option can carry (the kv observer keeps only min/max, no per-channel histogram).
    """
    grid = np.linspace(1.0, 0.3, 15) if grid is None else np.asarray(grid, np.float64)
    if not samples:
        raise EqcError("search_clip_ratio: no calibration samples")
    errs = [sum(clip_error(x, lo, hi, float(r), bits) for x, lo, hi in samples) for r in grid]
    return float(grid[int(np.argmin(errs))]), errs


SYMMETRIC_RANGE = {8: (-128.0, 127.0), 4: (-8.0, 7.0)}  # clamp of ORT's GQA quantizer (MLAS)
SYMMETRIC_QMAX = {8: 127.0, 4: 7.0}  # the calibrated absmax maps here; -128 / -8 only on saturation
INT4_BIAS = 8.0  # a 4-bit code q in [-8, 7] is stored as the nibble q + 8


def centered_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, center) float32 per channel of the centered symmetric layout: the asymmetric layout's min/max
    parameters (quant_params: 0 kept in range, float16 scale) written as signed codes, x = q * scale + center with
    center = (2^(bits-1) - zero_point) * scale. The center is a whole number of steps, so 0 stays exactly
    representable; measured on SmolLM2 (int4 cache, 8,176 tokens) a center at the range's midpoint instead,
    where 0 falls between two codes, lost +17.5% ppl against +9.1% without centers."""
    scale, zp = quant_params(lo, hi, bits)
    center = (np.float32(2 ** (bits - 1)) - zp) * scale
    return scale.astype(np.float32), center.astype(np.float32)


def symmetric_scale(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """float32 per-channel scale max(|lo|, |hi|) / qmax (floored so a constant-zero channel stays 0, not NaN)."""
    absmax = np.maximum(np.abs(np.asarray(lo, np.float32)), np.abs(np.asarray(hi, np.float32)))
    return np.maximum(absmax / np.float32(SYMMETRIC_QMAX[bits]), np.float32(SCALE_FLOOR)).astype(np.float32)


def quantize_symmetric(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes as float32, the way ORT's CPU GroupQueryAttention quantizes new tokens."""
    inv = (np.float32(1.0) / np.asarray(scale, np.float32)).astype(np.float32)
    lo, hi = SYMMETRIC_RANGE[bits]
    return np.clip(np.rint(np.asarray(x, np.float32) * inv), lo, hi).astype(np.float32)


def fake_quant_symmetric(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, centered: bool = False) -> np.ndarray:
    """Reference for the symmetric frozen per-channel layout; lo/hi [kv_heads, head_dim], x [batch, heads, tokens, dim].
    Centered: codes of x - center, read back as codes * scale + center."""
    if not centered:
        scale = symmetric_scale(lo, hi, bits)[None, :, None, :]
        return (quantize_symmetric(x, scale, bits) * scale).astype(np.float32)
    scale, center = (a[None, :, None, :] for a in centered_params(lo, hi, bits))
    shifted = (np.asarray(x, np.float32) - center).astype(np.float32)
    return (quantize_symmetric(shifted, scale, bits) * scale + center).astype(np.float32)


def pack4_signed(q: np.ndarray) -> np.ndarray:
    """GQA's 4-bit storage of signed codes: nibble q + 8, even channel low."""
    return pack4((np.asarray(q) + INT4_BIAS).astype(np.uint8))


def unpack4_signed(p: np.ndarray) -> np.ndarray:
    return unpack4(p).astype(np.float32) - np.float32(INT4_BIAS)


def pack4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis (even channel in the low nibble)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack4(p: np.ndarray) -> np.ndarray:
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = p & 15, p >> 4
    return out


# ----------------------------------------------------------------------------- the pass

@dataclasses.dataclass
class QuantizeKVCacheOptions:
    bits: int = 8
    key_granularity: str = "channel"  # "channel": frozen calibrated per-channel scales; "token": dynamic per token
    value_granularity: str = "token"  # "token": dynamic per token; "channel": frozen calibrated per channel
    # False: the symmetric layout GroupQueryAttention reads (int8 codes, or biased 4-bit nibbles; frozen per-channel
    # scales for keys and values, no zero points); needs both granularities "channel". See the module docstring.
    asymmetric: bool = True
    margin: float = 1.0  # calibrated ranges are widened by this factor (>= 1) before freezing
    # Frozen ranges are shrunk by these factors (0 < clip <= 1; 1 = raw calibrated min/max). At 4 bits the raw
    # min/max of a channel is set by a few outlier tokens and wastes most of the 16 levels on them; clipping
    # trades saturation of those rare entries for a finer step everywhere else (pick with search_clip_ratio).
    key_clip: float = 1.0
    value_clip: float = 1.0
    # Symmetric layout only: quantize x - center per channel and read back codes * scale + center, with the
    # asymmetric layout's scale and its zero point as a center (centered_params), so a channel whose range sits
    # off zero (keys after RoPE, some value channels) keeps the asymmetric step instead of wasting codes on the
    # empty side. GroupQueryAttention has no zero points; the fused rule feeds it x - center and restores the
    # exact result outside (passes/gqa_quantized_cache.py).
    center: bool = True

    def validate(self) -> None:
        if self.bits not in (8, 4):
            raise EqcError(f"quantize_kv_cache: bits must be 8 or 4, got {self.bits}")
        for what, g in (("key_granularity", self.key_granularity), ("value_granularity", self.value_granularity)):
            if g not in GRANULARITIES:
                raise EqcError(f"quantize_kv_cache: {what} must be one of {', '.join(GRANULARITIES)}, got '{g}'")
        if not self.asymmetric and "token" in (self.key_granularity, self.value_granularity):
            raise EqcError("quantize_kv_cache: the symmetric layout (asymmetric: false, what GroupQueryAttention reads) "
                           "needs per-channel keys and values frozen from calibration (key_granularity and "
                           "value_granularity 'channel')")
        if not self.margin >= 1.0:
            raise EqcError(f"quantize_kv_cache: margin must be >= 1, got {self.margin}")
        for what, c in (("key_clip", self.key_clip), ("value_clip", self.value_clip)):
            if not 0.0 < c <= 1.0:
                raise EqcError(f"quantize_kv_cache: {what} must be in (0, 1], got {c}")


class _Builder:
    """Appends nodes to the graph with readable unique names (a topological sort runs afterwards)."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.count = graph, prefix, 0

    def op(self, op_type: str, inputs: list[ir.Value], **attrs: Any) -> ir.Value:
        self.count += 1
        node = ir.node(op_type, inputs, attributes=attrs or None, name=f"{self.prefix}/{op_type}_{self.count}")
        node.outputs[0].name = f"{self.prefix}/{op_type}_{self.count}_output"
        # value_info needs a type: Cast gives `to`, every other op here keeps its first input's type.
        # (exported intermediates may carry no type: those are the float32 keys/values).
        node.outputs[0].dtype = attrs["to"] if op_type == "Cast" else (inputs[0].dtype or ir.DataType.FLOAT)
        self.graph.append(node)
        return node.outputs[0]

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return new_initializer(self.graph, f"{self.prefix}/{name}", array)


class QuantizeKVCachePass(EqcPass):
    name = "quantize_kv_cache"
    Options = QuantizeKVCacheOptions

    @classmethod
    def observers_needed(cls, options: QuantizeKVCacheOptions) -> ObserverNeeds:
        frozen = "channel" in (options.key_granularity, options.value_granularity)
        return ObserverNeeds(required=frozenset({"kv"} if frozen else set()))

    def __init__(self, context: Any = None, **options: Any) -> None:
        super().__init__(context, **options)
        # Checked here, not in call(): errors raised inside a PassManager run arrive wrapped in a PassError.
        frozen = "channel" in (self.options.key_granularity, self.options.value_granularity)
        stats = self.context.stats
        if frozen and (stats is None or "kv" not in stats.observers):
            raise EqcError("quantize_kv_cache: per-channel KV scales are frozen from calibration: run "
                           "`eqc calibrate --observers kv` and pass --calib STATS (or use per-token granularity)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pasts = {v.name: v for v in graph.inputs if v.name and KV_PAST.match(v.name)}
        presents = {v.name: v for v in graph.outputs if v.name and v.name.startswith(PRESENT)}
        if not pasts:
            raise EqcError("quantize_kv_cache: the graph has no past_key_values.* inputs (export a causal LM with a KV cache)")
        if any(v.dtype != ir.DataType.FLOAT for v in pasts.values()):
            raise EqcError("quantize_kv_cache: the KV cache is already quantized (past inputs are not float32)")
        layers = sorted({int(n.split(".")[1]) for n in pasts})
        groups: dict[str, str] = {}
        for layer in layers:
            for kind in ("key", "value"):
                gran = self.options.key_granularity if kind == "key" else self.options.value_granularity
                self._rewrite(graph, layer, kind, gran, pasts, presents)
                groups[kind] = gran
        TopologicalSortPass()(model)
        self._update_manifest(graph, layers)
        self.report({"bits": self.options.bits, "layers": len(layers), "key_granularity": groups["key"],
                     "value_granularity": groups["value"], "symmetric": not self.options.asymmetric,
                     **({"centered": self.options.center} if not self.options.asymmetric else {}),
                     "key_clip": self.options.key_clip,
                     "value_clip": self.options.value_clip,
                     "bytes_per_token": self.context.manifest["kv_cache"]["bytes_per_token"],
                     "ratio_vs_fp16": self.context.manifest["kv_cache"]["ratio_vs_fp16"]})
        return ir.passes.PassResult(model, modified=True)

    # -- one cache tensor ------------------------------------------------------------------------

    def _rewrite(self, graph: ir.Graph, layer: int, kind: str, gran: str, pasts: dict[str, ir.Value],
                 presents: dict[str, ir.Value]) -> None:
        past_name, present_name = f"{PAST}{layer}.{kind}", f"{PRESENT}{layer}.{kind}"
        past, present = pasts.get(past_name), presents.get(present_name)
        if past is None or present is None:
            raise EqcError(f"quantize_kv_cache: '{past_name}' or '{present_name}' is missing from the graph interface")
        concat = present.producer()
        if concat is not None and concat.op_type == "GroupQueryAttention":
            raise EqcError(f"quantize_kv_cache: '{present_name}' comes from a fused GroupQueryAttention (an ort-cpu "
                           "lowering); quantize the KV cache of the portable artifact, then lower that with --target")
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
            raise EqcError(f"quantize_kv_cache: '{present_name}' is not Concat(past, new); unsupported graph")
        shape = past.shape
        heads, dim = shape[1], shape[3]
        if not (isinstance(heads, int) and isinstance(dim, int)):
            raise EqcError(f"quantize_kv_cache: '{past_name}' needs static kv_heads and head_dim, has {shape}")
        bits = self.options.bits
        if bits == 4 and dim % 2:
            raise EqcError(f"quantize_kv_cache: 4-bit packing needs an even head_dim, '{past_name}' has {dim}")
        b = _Builder(graph, f"kvq/{layer}.{kind}")
        new = concat.inputs[1]
        if not self.options.asymmetric:
            self._rewrite_symmetric(graph, b, layer, kind, past, present, concat, new)
            return
        qmax = b.const("qmax", np.array(2 ** bits - 1, np.float32))
        zero = b.const("zero", np.array(0.0, np.float32))
        stored_dim = dim * bits // 8

        # The graph input keeps its name but now carries codes; its float consumers get the dequantized past.
        past_q = ir.Value(name=past_name, shape=ir.Shape([shape[0], heads, shape[2], stored_dim]),
                          type=ir.TensorType(ir.DataType.UINT8))
        if gran == "token":
            past_s = ir.Value(name=f"{past_name}_scale", shape=ir.Shape([shape[0], heads, shape[2], 1]),
                              type=ir.TensorType(ir.DataType.FLOAT16))
            past_z = ir.Value(name=f"{past_name}_zero_point", shape=ir.Shape([shape[0], heads, shape[2], 1]),
                              type=ir.TensorType(ir.DataType.UINT8))
            new_s, new_z = self._token_params(b, new, qmax, zero)
            deq_past = self._dequant(b, past_q, b.op("Cast", [past_s], to=ir.DataType.FLOAT),
                                     b.op("Cast", [past_z], to=ir.DataType.FLOAT), dim)
            extra_inputs = [past_s, past_z]
        else:
            scale, zp = self._frozen_params(f"{PRESENT}{layer}.{kind}", heads, dim)
            new_s, new_z = b.const("scale", scale), b.const("zero_point", zp)
            deq_past = self._dequant(b, past_q, new_s, new_z, dim)
            extra_inputs = []
        codes = b.op("Clip", [b.op("Add", [b.op("Round", [b.op("Div", [new, new_s])]), new_z]), zero, qmax])
        deq_new = b.op("Mul", [b.op("Sub", [codes, new_z]), new_s])
        new_q = b.op("Cast", [self._pack(b, codes, dim) if bits == 4 else codes], to=ir.DataType.UINT8)

        past.replace_all_uses_with(deq_past)
        concat.replace_input_with(1, deq_new)
        present_q = b.op("Concat", [past_q, new_q], axis=2)
        outputs = [(present_name, present_q)]
        if gran == "token":
            s16 = b.op("Cast", [new_s], to=ir.DataType.FLOAT16)
            z8 = b.op("Cast", [new_z], to=ir.DataType.UINT8)
            outputs += [(f"{present_name}_scale", b.op("Concat", [past_s, s16], axis=2)),
                        (f"{present_name}_zero_point", b.op("Concat", [past_z, z8], axis=2))]

        total = present.shape[2] if present.shape is not None else "total_sequence"
        for name, value in outputs:
            value.shape = ir.Shape([shape[0], heads, total, 1 if name.endswith(("_scale", "_zero_point")) else stored_dim])
        self._swap_interface(graph, past, [past_q, *extra_inputs], present, outputs)

    def _rewrite_symmetric(self, graph: ir.Graph, b: _Builder, layer: int, kind: str, past: ir.Value, present: ir.Value,
                           concat: ir.Node, new: ir.Value) -> None:
        """GroupQueryAttention's layout: codes = Clip(Round(new * inv_scale)), attention reads codes * scale.
        The node shapes here are what passes/gqa_quantized_cache.py matches: change both together."""
        bits, shape = self.options.bits, past.shape
        heads, dim = shape[1], shape[3]
        lo, hi = self._frozen_range(f"{PRESENT}{layer}.{kind}", heads, dim)
        if self.options.center:
            scale, center_array = (a.reshape(1, heads, 1, dim) for a in centered_params(lo, hi, bits))
        else:
            scale, center_array = symmetric_scale(lo, hi, bits).reshape(1, heads, 1, dim), None
        s = b.const("scale", scale)
        inv = b.const("inv_scale", (np.float32(1.0) / scale).astype(np.float32))
        qlo, qhi = (b.const(n, np.array(v, np.float32)) for n, v in zip(("qmin", "qmax"), SYMMETRIC_RANGE[bits]))
        center = b.const("center", center_array) if center_array is not None else None
        shifted = b.op("Sub", [new, center]) if center is not None else new
        codes = b.op("Clip", [b.op("Round", [b.op("Mul", [shifted, inv])]), qlo, qhi])
        deq_new = b.op("Mul", [codes, s])
        stored_dim = dim * bits // 8
        if bits == 8:
            dtype = ir.DataType.INT8
            new_q = b.op("Cast", [codes], to=dtype)
        else:
            dtype = ir.DataType.UINT8
            bias = b.const("int4_bias", np.array(INT4_BIAS, np.float32))
            new_q = b.op("Cast", [self._pack(b, b.op("Add", [codes, bias]), dim)], to=dtype)
        past_q = ir.Value(name=past.name, shape=ir.Shape([shape[0], heads, shape[2], stored_dim]), type=ir.TensorType(dtype))
        past_codes = b.op("Cast", [past_q], to=ir.DataType.FLOAT)
        if bits == 4:
            past_codes = b.op("Sub", [self._unpack(b, past_codes, dim), bias])
        deq_past = b.op("Mul", [past_codes, s])
        if center is not None:
            deq_new, deq_past = b.op("Add", [deq_new, center]), b.op("Add", [deq_past, center])

        past.replace_all_uses_with(deq_past)
        concat.replace_input_with(1, deq_new)
        present_q = b.op("Concat", [past_q, new_q], axis=2)
        present_q.dtype = dtype
        total = present.shape[2] if present.shape is not None else "total_sequence"
        present_q.shape = ir.Shape([shape[0], heads, total, stored_dim])
        self._swap_interface(graph, past, [past_q], present, [(present.name, present_q)])

    def _token_params(self, b: _Builder, x: ir.Value, qmax: ir.Value, zero: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Per-token scale (rounded through float16, as stored) and integer zero point, over head_dim."""
        axes = b.const("axes", np.array([-1], np.int64))
        lo = b.op("Min", [b.op("ReduceMin", [x, axes], keepdims=1), zero])
        hi = b.op("Max", [b.op("ReduceMax", [x, axes], keepdims=1), zero])
        floor = b.const("scale_floor", np.array(SCALE_FLOOR, np.float32))
        scale = b.op("Max", [b.op("Div", [b.op("Sub", [hi, lo]), qmax]), floor])
        scale = b.op("Mul", [scale, b.const("scale_widen", np.array(SCALE_WIDEN, np.float32))])
        scale = b.op("Cast", [b.op("Cast", [scale], to=ir.DataType.FLOAT16)], to=ir.DataType.FLOAT)
        zp = b.op("Clip", [b.op("Round", [b.op("Div", [b.op("Neg", [lo]), scale])]), zero, qmax])
        return scale, zp

    def _frozen_params(self, stat_name: str, heads: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._frozen_range(stat_name, heads, dim)
        scale, zp = quant_params(lo, hi, self.options.bits)
        return scale.reshape(1, heads, 1, dim), zp.reshape(1, heads, 1, dim)

    def _frozen_range(self, stat_name: str, heads: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated per-channel [lo, hi] of one cache tensor ([kv_heads, head_dim]), with margin and clip applied."""
        stats = self.context.stats
        if stats is None:
            raise EqcError("quantize_kv_cache: per-channel KV scales are frozen from calibration: run "
                           "`eqc calibrate --observers kv` and pass --calib STATS (or use per-token granularity)")
        lo = np.asarray(stats.require(stat_name, "kv_min_channel", "kv", "quantize_kv_cache"), np.float32)
        hi = np.asarray(stats.require(stat_name, "kv_max_channel", "kv", "quantize_kv_cache"), np.float32)
        if lo.shape != (heads, dim) or hi.shape != (heads, dim):
            raise EqcError(f"quantize_kv_cache: kv statistics of '{stat_name}' have shape {lo.shape}, expected {(heads, dim)}")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise EqcError(f"quantize_kv_cache: kv statistics of '{stat_name}' are not finite")
        clip = self.options.key_clip if stat_name.endswith(".key") else self.options.value_clip
        m = np.float32(self.options.margin * clip)
        return lo * m, hi * m

    def _dequant(self, b: _Builder, codes_u8: ir.Value, scale: ir.Value, zp: ir.Value, codes_dim: int) -> ir.Value:
        codes = b.op("Cast", [codes_u8], to=ir.DataType.FLOAT)
        if self.options.bits == 4:
            codes = self._unpack(b, codes, codes_dim)
        return b.op("Mul", [b.op("Sub", [codes, zp]), scale])

    @staticmethod
    def _pack(b: _Builder, codes: ir.Value, dim: int) -> ir.Value:
        """float codes [.., D] -> float bytes [.., D/2]: even channel + 16 * odd channel (exact in float32)."""
        pairs = b.op("Reshape", [codes, b.const("pair_shape", np.array([0, 0, 0, dim // 2, 2], np.int64))])
        weights = b.const("nibble_weights", np.array([1.0, 16.0], np.float32))
        return b.op("ReduceSum", [b.op("Mul", [pairs, weights]), b.const("last", np.array([-1], np.int64))], keepdims=0)

    @staticmethod
    def _unpack(b: _Builder, packed: ir.Value, dim: int) -> ir.Value:
        # Explicit dims (no -1): ORT cannot infer -1 when the past has zero tokens.
        sixteen = b.const("sixteen", np.array(16.0, np.float32))
        high = b.op("Floor", [b.op("Div", [packed, sixteen])])
        low = b.op("Sub", [packed, b.op("Mul", [high, sixteen])])
        last = b.const("unsq_axis", np.array([-1], np.int64))
        pairs = b.op("Concat", [b.op("Unsqueeze", [low, last]), b.op("Unsqueeze", [high, last])], axis=-1)
        return b.op("Reshape", [pairs, b.const("unpair_shape", np.array([0, 0, 0, dim], np.int64))])

    @staticmethod
    def _swap_interface(graph: ir.Graph, past: ir.Value, new_inputs: list[ir.Value], present: ir.Value,
                        outputs: list[tuple[str, ir.Value]]) -> None:
        """Put the quantized tensors where the float past/present were, keeping the interface order."""
        pos = list(graph.inputs).index(past)
        graph.inputs.pop(pos)
        past.name = f"{past.name}__float"
        for k, value in enumerate(new_inputs):
            graph.inputs.insert(pos + k, value)
        pos = list(graph.outputs).index(present)
        graph.outputs.pop(pos)
        present_name = present.name
        present.name = f"{present_name}__float"
        for k, (name, value) in enumerate(outputs):
            value.name = name
            graph.outputs.insert(pos + k, value)

    # -- manifest ----------------------------------------------------------------------------------

    def _update_manifest(self, graph: ir.Graph, layers: list[int]) -> None:
        from eqcompiler.export.hf import _io_spec

        manifest = self.context.manifest
        manifest["inputs"] = _io_spec(graph.inputs)
        manifest["outputs"] = _io_spec(graph.outputs)
        kv = dict(manifest.get("kv_cache") or {})
        per_token = 0
        fp16 = 0
        for v in graph.inputs:
            if KV_PAST.match(v.name):
                dims = [int(d) for d in (v.shape[1], v.shape[3])]
                per_token += dims[0] * dims[1] * v.dtype.itemsize
                if not v.name.endswith(("_scale", "_zero_point")):
                    heads = dims[0]
                    fp16 += heads * int(kv.get("head_dim") or 0) * 2
        opts = self.options
        entry = lambda kind, gran: {  # noqa: E731
            "granularity": gran,
            **({"clip": opts.key_clip if kind == "key" else opts.value_clip} if gran == "channel" else {}),
            "data": "past_key_values.{layer}." + kind,
            "scale": ("past_key_values.{layer}." + kind + "_scale") if gran == "token" else "constant",
            "zero_point": ("past_key_values.{layer}." + kind + "_zero_point") if gran == "token" else "constant",
            "present": {"data": "present.{layer}." + kind,
                        **({"scale": "present.{layer}." + kind + "_scale",
                            "zero_point": "present.{layer}." + kind + "_zero_point"} if gran == "token" else {})},
        }
        if opts.asymmetric:
            quantized = {
                "bits": opts.bits,
                "scheme": "asymmetric min/max, x = (q - zero_point) * scale, 0 kept in range",
                "packing": "two 4-bit codes per byte along head_dim, even channel in the low nibble" if opts.bits == 4 else None,
                "scale_dtype": "float16",
                "zero_point_dtype": "uint8",
                "key": entry("key", opts.key_granularity),
                "value": entry("value", opts.value_granularity),
            }
        else:
            quantized = {
                "bits": opts.bits,
                "scheme": ("symmetric per channel about a center (the min/max zero point), x = q * scale + center "
                           "(GroupQueryAttention's quantized cache holds q = clamp(round((x - center) * (1/scale)), "
                           if opts.center else
                           "symmetric absmax per channel, x = q * scale (GroupQueryAttention's quantized cache: "
                           "q = clamp(round(x * (1/scale)), ") + ("-128, 127)" if opts.bits == 8 else "-8, 7)") + ")",
                "center": "constant" if opts.center else None,
                "packing": ("two 4-bit codes per byte along head_dim, stored as q + 8, even channel in the low nibble"
                            if opts.bits == 4 else None),
                "scale_dtype": "float32",
                "zero_point_dtype": None,
                "key": {**entry("key", "channel"), "zero_point": None},
                "value": {**entry("value", "channel"), "zero_point": None},
            }
        kv.update({
            "dtype": ("uint8" if opts.bits == 8 else "uint4x2") if opts.asymmetric else ("int8" if opts.bits == 8 else "int4x2"),
            "quantized": quantized,
            "bytes_per_token": per_token,
            "fp16_bytes_per_token": fp16,
            "ratio_vs_fp16": round(per_token / fp16, 4) if fp16 else None,
        })
        manifest["kv_cache"] = kv

