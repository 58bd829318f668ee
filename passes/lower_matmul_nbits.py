"""Lower blocked weight-only QDQ linear layers to ONNX Runtime's com.microsoft::MatMulNBits.

Matched (as quantize_weights / gptq / awq emit it):

    w = DequantizeLinear(Wq [K, N] int4|uint4|int8|uint8, scale [n_blocks, N][, zp], axis=0, block_size=B)
    y = MatMul(A [..., K], w)

Replacement: y = MatMulNBits(A, Bp, scales, [zero_points]; K, N, bits, block_size=B, accuracy_level).
ORT stores the weight transposed and packed along K: Bp is uint8 [N, n_blocks, B * bits / 8], the
first value of a pair in the low nibble; scales are [N, n_blocks]. MatMulNBits has unsigned values
only, so a signed weight q becomes q + 2^(bits-1) with zero point 2^(bits-1), which is also the
op's default zero point, so symmetric weights need no zero-point input at all. Zero points of
4-bit weights are packed two per byte per row of N ([N, ceil(n_blocks / 2)]). K need not be a
multiple of B: the last block is padded with its zero point (the op ignores the padding).

accuracy_level 0 keeps float32 compute (bit-close to the QDQ graph); 4 lets the CPU kernel quantize
A to int8 per block (faster decode, slightly different numerics).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import is_constant
from eqcompiler.compile.layer_selection import EVERY_LAYER, LayerSelection
from eqcompiler.compile.patterns import LinearSiteRule, RuleRecord, lower_with_rules, optional_input
from eqcompiler.compile.pass_base import EqcPass

MS_DOMAIN = "com.microsoft"
_BITS = {ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False),
         ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False)}


@dataclasses.dataclass
class LowerMatMulNBitsOptions(LayerSelection):
    accuracy_level: int = 0  # 0/1 float32 compute; 4 int8 compute of A
    # False where a target schedules it for a graph that may hold no blocked layer (a mixed-precision plan)
    required: bool = True

    def validate(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EqcError(f"lower_matmul_nbits: accuracy_level must be 0..4, got {self.accuracy_level}")


def pack_rows(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values along the last axis: two 4-bit values per byte (low nibble first)."""
    u = u.astype(np.uint8)
    if bits == 8:
        return u
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)


def to_matmul_nbits(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int, signed: bool,
                    block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B packed [N, n_blocks, blob], scales [N, n_blocks], zero points or None) from [K, N] blocked QDQ."""
    k, n = q.shape
    n_blocks = -(-k // block_size)
    offset = 2 ** (bits - 1) if signed else 0
    zp = np.zeros((n_blocks, n), np.int32) if zero_point is None else np.asarray(zero_point, np.int32).reshape(n_blocks, n)
    u = q.astype(np.int32) + offset  # [K, N]
    zp_u = zp + offset  # [n_blocks, N]
    pad = n_blocks * block_size - k
    if pad:  # pad the last block with its zero point: a zero weight
        u = np.concatenate([u, np.repeat(zp_u[-1:], pad, axis=0)], axis=0)
    blocks = u.T.reshape(n, n_blocks, block_size)
    packed = pack_rows(blocks, bits)
    scales = np.ascontiguousarray(np.asarray(scale, np.float32).reshape(n_blocks, n).T)
    if np.all(zp_u == 2 ** (bits - 1)):
        return np.ascontiguousarray(packed), scales, None  # the op's default zero point
    zps = pack_rows(zp_u.T, bits)  # [N, ceil(n_blocks * bits / 8)]
    return np.ascontiguousarray(packed), scales, np.ascontiguousarray(zps)


class MatMulNBitsRule(LinearSiteRule):
    """MatMul(A, blocked DequantizeLinear(const [K, N] 4/8-bit, axis=0)) -> MatMulNBits."""

    def __init__(self, accuracy_level: int = 0, select: LayerSelection = EVERY_LAYER,
                 record: RuleRecord | None = None) -> None:
        super().__init__("LowerMatMulNBits", select=select, record=record)
        self.accuracy_level = accuracy_level

    def check_site(self, wq: ir.Value, w_scale: ir.Value, w_dq: ir.Value, **_: Any) -> str:
        dq = w_dq.producer()
        block = dq.attributes.get_int("block_size", 0)
        if not block or block < 16 or block & (block - 1):
            return f"weight DequantizeLinear block_size {block} is not a power of two >= 16"
        if dq.attributes.get_int("axis", 1) not in (0, -2):
            return "weight DequantizeLinear is not blocked along K (axis=0)"
        zp = optional_input(dq, 2)
        if not is_constant(w_scale) or (zp is not None and not is_constant(zp)):
            return "weight scale or zero point is not a constant"
        if wq.const_value.dtype not in _BITS:
            return f"weight type {wq.const_value.dtype} is not int4/uint4/int8/uint8"
        return ""

    def rewrite(self, op, x: ir.Value, wq: ir.Value, w_scale: ir.Value, w_dq: ir.Value, y: ir.Value, **_: Any):
        dq = w_dq.producer()
        matmul = self.matched(y)
        bits, signed = _BITS[wq.const_value.dtype]
        block = dq.attributes.get_int("block_size")
        zp = optional_input(dq, 2)
        q = wq.const_value.numpy()
        k, n = q.shape
        packed, scales, zps = to_matmul_nbits(q, w_scale.const_value.numpy(),
                                              zp.const_value.numpy() if zp is not None else None, bits, signed, block)
        base = wq.name.removesuffix("_quantized")
        inputs = [x, self.initializer(op, f"{base}_nbits", packed), self.initializer(op, f"{base}_nbits_scales", scales)]
        if zps is not None:
            inputs.append(self.initializer(op, f"{base}_nbits_zero_points", zps))
        return op.MatMulNBits(*inputs, K=k, N=n, bits=bits, block_size=block, accuracy_level=self.accuracy_level,
                              _domain=MS_DOMAIN, _version=1, _name=f"{matmul.name}/MatMulNBits")


class LowerMatMulNBitsPass(EqcPass):
    name = "lower_matmul_nbits"
    Options = LowerMatMulNBitsOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        lowered = lower_with_rules(model, [MatMulNBitsRule(opts.accuracy_level, opts, RuleRecord())], (MS_DOMAIN, 1))
        if not lowered and opts.required:
            raise EqcError("lower_matmul_nbits matched no layer: it needs MatMul(A, blocked DequantizeLinear(4- or "
                           "8-bit weight, axis=0)) as written by quantize_weights/gptq/awq with block_size set")
        self.report({"lowered": lowered, "count": len(lowered), "accuracy_level": opts.accuracy_level})
        return ir.passes.PassResult(model, modified=bool(lowered))
