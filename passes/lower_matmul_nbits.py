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

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import is_constant, layer_name, new_initializer, substitute_output
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass

MS_DOMAIN = "com.microsoft"
_BITS = {ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False),
         ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False)}


@dataclasses.dataclass
class LowerMatMulNBitsOptions(LayerSelection):
    accuracy_level: int = 0  # 0/1 float32 compute; 4 int8 compute of A

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


def _match(node: ir.Node) -> tuple[ir.Node, int, bool] | None:
    """(DequantizeLinear, bits, signed) when `node` is MatMul(A, blocked-DQ(const [K, N]))."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    dq = node.inputs[1].producer() if node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    block = dq.attributes.get_int("block_size", 0)
    if not block or block < 16 or block & (block - 1) or dq.attributes.get_int("axis", 1) not in (0, -2):
        return None
    q = dq.inputs[0]
    if not is_constant(q) or q.shape is None or len(q.shape) != 2 or not is_constant(dq.inputs[1]):
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None and not is_constant(dq.inputs[2]):
        return None
    if q.const_value.dtype not in _BITS:
        return None
    bits, signed = _BITS[q.const_value.dtype]
    return dq, bits, signed


class LowerMatMulNBitsPass(EqcPass):
    name = "lower_matmul_nbits"
    Options = LowerMatMulNBitsOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        lowered: list[str] = []
        for node in list(graph):
            found = _match(node)
            if found is None:
                continue
            name = layer_name(node)
            if not opts.selects(name):
                continue
            dq, bits, signed = found
            block = dq.attributes.get_int("block_size")
            q = dq.inputs[0].const_value.numpy()
            scale = dq.inputs[1].const_value.numpy()
            zp = dq.inputs[2].const_value.numpy() if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
            k, n = q.shape
            packed, scales, zps = to_matmul_nbits(q, scale, zp, bits, signed, block)
            base = dq.inputs[0].name.removesuffix("_quantized")
            inputs = [node.inputs[0], new_initializer(graph, f"{base}_nbits", packed),
                      new_initializer(graph, f"{base}_nbits_scales", scales)]
            if zps is not None:
                inputs.append(new_initializer(graph, f"{base}_nbits_zero_points", zps))
            attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": opts.accuracy_level}
            fused = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{node.name}/MatMulNBits")
            substitute_output(graph, node.outputs[0], fused, before=node)  # keeps an unset dtype unset
            graph.remove(node, safe=True)
            if not list(dq.outputs[0].uses()) and not dq.outputs[0].is_graph_output():
                graph.remove(dq, safe=True)  # its initializers are dropped when the model is saved
            lowered.append(name)
        if not lowered:
            raise EqcError("lower_matmul_nbits matched no layer: it needs MatMul(A, blocked DequantizeLinear(4- or "
                           "8-bit weight, axis=0)) as written by quantize_weights/gptq/awq with block_size set")
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        self.report({"lowered": lowered, "count": len(lowered), "accuracy_level": opts.accuracy_level})
        return ir.passes.PassResult(model, modified=True)
