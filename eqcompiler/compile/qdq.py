"""Quantization arithmetic (numpy) and the QDQ node patterns eqc emits.

Conventions, shared by every pass so that later passes (lowering, TensorRT checks, inspect)
can recognise what earlier ones wrote:
- weights: DequantizeLinear(Wq, scale, zero_point, axis=<output-channel axis>[, block_size]) feeding
  the MatMul/Gemm weight input; int8 symmetric (zero point 0) per channel, or int4/uint4 blocked.
- static activations: QuantizeLinear(x, s, zp) -> DequantizeLinear(q, s, zp), per tensor, int8
  symmetric by default (TensorRT needs zero point 0).
- Rounding is round-half-to-even, as QuantizeLinear does, so numpy and ORT agree bit for bit.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.graph import new_initializer

INT_RANGES = {  # (qmin, qmax, numpy storage dtype, onnx-ir dtype)
    ("int", 8): (-128, 127, np.int8, ir.DataType.INT8),
    ("uint", 8): (0, 255, np.uint8, ir.DataType.UINT8),
    ("int", 4): (-8, 7, np.int8, ir.DataType.INT4),
    ("uint", 4): (0, 15, np.uint8, ir.DataType.UINT4),
}


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized weight in the orientation it is stored: `q` has the original weight's shape."""

    q: np.ndarray  # integer values (int8/uint8 container even for 4-bit)
    scale: np.ndarray  # float32, shape per ONNX DequantizeLinear rules for the axis/block
    zero_point: np.ndarray  # same shape as scale, q's dtype
    axis: int
    block_size: int  # 0 = per channel (per tensor when scale is a scalar)
    bits: int
    signed: bool

    @property
    def onnx_dtype(self) -> ir.DataType:
        return INT_RANGES[("int" if self.signed else "uint", self.bits)][3]

    def dequantize(self) -> np.ndarray:
        scale, zp = self.scale, self.zero_point.astype(np.float32)
        if self.block_size:
            scale = np.repeat(scale, self.block_size, axis=self.axis).take(
                np.arange(self.q.shape[self.axis]), axis=self.axis)
            zp = np.repeat(zp, self.block_size, axis=self.axis).take(np.arange(self.q.shape[self.axis]), axis=self.axis)
        elif scale.ndim == 1:
            shape = [1] * self.q.ndim
            shape[self.axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return ((self.q.astype(np.float32) - zp) * scale).astype(np.float32)


def quantize_with_scale(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """QuantizeLinear semantics: saturate(round_half_even(x / scale) + zero_point)."""
    return np.clip(np.rint(x / scale) + zero_point, qmin, qmax)


# ONNX Runtime's int8 GEMMs on x86 CPUs without VNNI multiply uint8 activations by int8 weights with
# vpmaddubsw, whose int16 pair sums saturate unless |weight| <= 64 (2 * 255 * 64 < 32768): the
# "reduce_range" weight range, 7 bits in an int8 container.
REDUCED_INT8_RANGE = (-64, 63)


def quantize_channelwise(w: np.ndarray, axis: int, bits: int = 8, symmetric: bool = True,
                         block_size: int = 0, clip_ratio: float | np.ndarray = 1.0,
                         reduce_range: bool = False) -> QuantizedWeight:
    """Per-channel (block_size=0) or blocked quantization of a 2-D weight.

    `axis` is the output-channel axis for per-channel scales; for blocked quantization it is the
    reduction (input-feature) axis along which blocks of `block_size` share one scale, as in ONNX
    opset-21 blocked DequantizeLinear. `reduce_range` (symmetric int8 only) keeps codes in
    REDUCED_INT8_RANGE.
    """
    signed = symmetric
    qmin, qmax, store, _ = INT_RANGES[("int" if signed else "uint", bits)]
    if reduce_range:
        if not (signed and bits == 8):
            raise ValueError("reduce_range applies to symmetric int8 weights only")
        qmin, qmax = REDUCED_INT8_RANGE
    w = np.asarray(w, dtype=np.float32)
    if block_size:
        red_axis = axis
        k = w.shape[red_axis]
        nblocks = -(-k // block_size)
        pad = nblocks * block_size - k
        wp = np.moveaxis(w, red_axis, -1)
        if pad:
            wp = np.concatenate([wp, np.zeros(wp.shape[:-1] + (pad,), np.float32)], axis=-1)
        blocks = wp.reshape(wp.shape[:-1] + (nblocks, block_size))
        lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    else:
        red_axes = tuple(i for i in range(w.ndim) if i != axis)
        lo, hi = w.min(axis=red_axes), w.max(axis=red_axes)
    lo, hi = lo * clip_ratio, hi * clip_ratio
    if symmetric:
        # Symmetric uses the full negative range [-2^(b-1), 2^(b-1)-1] scaled by the positive max,
        # so 0 stays exact and zero point is 0 (TensorRT requires it for int8).
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        zp = np.zeros_like(scale, dtype=store)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0).astype(np.float32)
        zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(store)
    if block_size:
        s_full = np.repeat(scale, block_size, axis=-1)[..., :k]
        z_full = np.repeat(zp, block_size, axis=-1)[..., :k].astype(np.float32)
        q = quantize_with_scale(np.moveaxis(w, red_axis, -1), s_full, z_full, qmin, qmax)
        q = np.moveaxis(q, -1, red_axis).astype(store)
        scale, zp = np.moveaxis(scale, -1, red_axis), np.moveaxis(zp, -1, red_axis)
    else:
        shape = [1] * w.ndim
        shape[axis] = -1
        q = quantize_with_scale(w, scale.reshape(shape), zp.reshape(shape).astype(np.float32), qmin, qmax).astype(store)
    return QuantizedWeight(q=q, scale=np.ascontiguousarray(scale, dtype=np.float32),
                           zero_point=np.ascontiguousarray(zp), axis=axis, block_size=block_size,
                           bits=bits, signed=signed)


def quantize_site_weight(w: np.ndarray, transposed: bool, bits: int, symmetric: bool, block_size: int,
                         reduce_range: bool = False) -> QuantizedWeight:
    """Per output channel, or blocks along the input features, for a [K,N] (or [N,K] if transposed) weight."""
    if block_size:
        return quantize_channelwise(w, axis=1 if transposed else 0, bits=bits, symmetric=symmetric, block_size=block_size,
                                    reduce_range=reduce_range)
    return quantize_channelwise(w, axis=0 if transposed else 1, bits=bits, symmetric=symmetric, reduce_range=reduce_range)


def output_error(dw: np.ndarray, gram: np.ndarray) -> float:
    """trace(dW^T G dW): summed squared output error over the calibration tokens (G: their Gram matrix X^T X)."""
    dw = np.asarray(dw, dtype=np.float64)
    return float(np.einsum("kn,kn->", gram @ dw, dw))


def int8_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [M,K] @ b [K,N] of int8 codes, exact, as int32 (K <= 2^17 cannot overflow it).

    torch's int8 GEMM (VNNI where the CPU has it) is about 3.5x numpy's float32 product on the same
    codes; without it, float64 products are exact too (|sum| < 2^53), so either gives the same numbers.
    """
    try:
        import torch

        return torch._int_mm(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))).numpy()
    except (ImportError, RuntimeError, AttributeError):
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int32)


def step_ratio(t: object, scale: float) -> float:
    """step / typical |x| of one tensor's statistics (TensorStats): how coarse a static grid of step
    `scale` is for the ordinary elements (typical = median over channels of the mean |x|)."""
    from eqcompiler.errors import EqcError

    extra, name = t.extra, getattr(t, "name", "a linear input")  # type: ignore[attr-defined]
    if "abssum_channel" in extra:
        abssum = np.asarray(extra["abssum_channel"], dtype=np.float64)
        mean_abs = abssum / max(t.count / max(abssum.shape[0], 1), 1.0)  # type: ignore[attr-defined]
    elif "sample_rows" in extra:  # the same per-channel mean |x|, estimated on the stored token sample
        mean_abs = np.abs(np.asarray(extra["sample_rows"], dtype=np.float64)).mean(axis=0)
    else:
        raise EqcError(f"the static step ratio needs the 'abssum' calibration observer (missing for {name}); "
                       "rerun `eqc calibrate --observers minmax,absmax_channel,abssum`")
    typical = float(np.median(mean_abs))
    return float(scale / typical) if typical > 0 else float("inf")


def activation_scale(lo: float, hi: float, bits: int = 8, symmetric: bool = True) -> tuple[float, int]:
    """Per-tensor (scale, zero point) for an activation range."""
    if symmetric:
        amax = max(abs(lo), abs(hi))
        qmax = 2 ** (bits - 1) - 1
        return (amax / qmax if amax > 0 else 1.0), 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax if hi > lo else 1.0
    return scale, int(np.clip(round(-lo / scale), 0, qmax))


def _int_tensor(name: str, array: np.ndarray, dtype: ir.DataType) -> ir.TensorProtocol:
    """An integer tensor; 4-bit values go through ml_dtypes so onnx-ir packs them two per byte."""
    import ml_dtypes

    if dtype == ir.DataType.INT4:
        return ir.tensor(array.astype(ml_dtypes.int4), name=name)
    if dtype == ir.DataType.UINT4:
        return ir.tensor(array.astype(ml_dtypes.uint4), name=name)
    return ir.tensor(array, name=name)


def emit_quantized_initializers(graph: ir.Graph, qw: QuantizedWeight, base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Register Wq, scale and zero-point initializers named after `base`."""
    dtype = qw.onnx_dtype
    q_val = new_initializer(graph, f"{base}_quantized", _int_tensor(f"{base}_quantized", qw.q, dtype))
    s_val = new_initializer(graph, f"{base}_scale", qw.scale)
    z_val = new_initializer(graph, f"{base}_zero_point", _int_tensor(f"{base}_zero_point", qw.zero_point, dtype))
    return q_val, s_val, z_val


def emit_dequantize(graph: ir.Graph, qw: QuantizedWeight, base: str, before: ir.Node) -> ir.Value:
    """Add Wq/scale/zp initializers and a DequantizeLinear node before `before`; return its output."""
    q_val, s_val, z_val = emit_quantized_initializers(graph, qw, base)
    attrs: dict[str, int] = {"axis": qw.axis}
    if qw.block_size:
        attrs["block_size"] = qw.block_size
    node = ir.node("DequantizeLinear", [q_val, s_val, z_val], attrs, name=f"{base}/DequantizeLinear")
    graph.insert_before(before, node)
    node.outputs[0].name = f"{base}_dequantized"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(qw.q.shape)
    return node.outputs[0]
