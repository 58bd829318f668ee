"""Rewrite constant weight DequantizeLinear nodes into standard integer-to-float ops that ONNX Runtime's
constant folding evaluates once, at session creation (`--target web`).

Why: onnxruntime-web's WASM backend runs a QDQ graph as written: it does not fuse DequantizeLinear into the
MatMul, so every run dequantizes every weight (SmolLM2 w8: ~2 tok/s against 12-20 for fp32). Measured on
8 layers of SmolLM2's MLP shapes in Chromium (tools/web/bench_forms.py, tools/results/edge.md): a decode step
takes 20 ms as int8 QDQ, 42 ms as int4 QDQ, 30-41 ms as MatMulNBits (4- or 8-bit: the WASM kernel has no int8
dot product and dequantizes per call), 1.1-1.3 ms as DynamicQuantizeLinear + MatMulInteger, and 1.0-1.4 ms
for float weights. Folded weights are float weights after loading, so they decode at fp32 speed while the
download keeps the int8 / int4 size, and they are the QDQ graph's own numbers (float activations, the very
dequantized values); MatMulInteger is faster on a prefill but quantizes the activations per tensor, which
changes the model's numbers, so it is not the default.

Matched: DequantizeLinear(q, scale[, zero_point]) with every input a constant (weights, embedding tables;
activation and KV-cache quantizers are left alone), int8/uint8/int4/uint4 codes, per tensor, per axis or
blocked. Rewritten as the ONNX definition of DequantizeLinear, (q - zero_point) * scale, with
  8-bit codes:  Cast(q -> float)
  4-bit codes:  stored packed two per uint8 byte (offset-binary, the halves of the first axis in the low and
                high nibbles), unpacked by BitwiseAnd / BitShift / Concat on uint8, u - zp in int8, one Cast to float
  blocked scales (and zero points): one Gather of the block rows, [K/B, N] -> [K, N]
ORT's constant folding keeps every intermediate it computes until the pass ends, so the chains are kept short:
a first 4-bit form (int32 unpacking, Expand/Reshape/Slice scales) needed 6 GB to load SmolLM2 natively and ran
out of WASM memory in Chromium; the int8 form peaks at 1.3 GB. The weight storage stays int8 / packed int4
(the QDQ artifact's size); in memory, after loading, the weights take float32 size (reported, and a warning
above 2 GiB: wasm32 memory ends at 4 GiB).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.graph import is_constant, new_initializer
from eqcompiler.compile.pass_base import EqcPass

_CODES = {ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False),
          ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False)}
WASM_FLOAT_WARN_BYTES = 2 << 30


@dataclasses.dataclass
class LowerWeightsForWebOptions:
    include: str | None = None  # regex on the weight (DequantizeLinear input) name
    exclude: str | None = None


def _match(node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return False
    inputs = [v for v in node.inputs if v is not None]
    q = node.inputs[0]
    return (all(is_constant(v) for v in inputs) and q.shape is not None and q.const_value is not None
            and q.const_value.dtype in _CODES)


class LowerWeightsForWebPass(EqcPass):
    name = "lower_weights_for_web"
    Options = LowerWeightsForWebOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import re

        graph, opts = model.graph, self.options
        self._shared: dict[tuple, ir.Value] = {}
        lowered, float_bytes = [], 0
        for dq in [n for n in graph if _match(n)]:
            name = dq.inputs[0].name or ""
            if (opts.include and not re.search(opts.include, name)) or (opts.exclude and re.search(opts.exclude, name)):
                continue
            float_bytes += self._rewrite(graph, dq)
            lowered.append(name)
        if not lowered:  # a float model runs in the browser as it is
            self.context.warn("web: no quantized weight to lower (DequantizeLinear of a constant int8/int4 weight); "
                              "the graph is left as it is")
        if float_bytes > WASM_FLOAT_WARN_BYTES:
            self.context.warn(f"web: the folded float weights take {float_bytes / 2**30:.1f} GiB of WASM memory after "
                              "loading (wasm32 ends at 4 GiB)")
        self.report({"lowered": len(lowered), "float_weight_bytes_after_load": float_bytes})
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(self, graph: ir.Graph, dq: ir.Node) -> int:
        q_value, scale_value = dq.inputs[0], dq.inputs[1]
        zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
        bits, signed = _CODES[q_value.const_value.dtype]
        shape = [int(d) for d in q_value.shape]
        rank = len(shape)
        axis = dq.attributes.get_int("axis", 1) % max(rank, 1)
        block = dq.attributes.get_int("block_size", 0)
        scale = scale_value.const_value.numpy()
        float_type = scale_value.const_value.dtype
        base = (q_value.name or "w").removesuffix("_quantized")
        nodes: list[ir.Node] = []

        def op(op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
            node = ir.node(op_type, list(inputs), attrs, name=f"{base}/web/{op_type}_{len(nodes)}")
            nodes.append(node)
            return node.outputs[0]

        def const(suffix: str, array: np.ndarray) -> ir.Value:
            return new_initializer(graph, f"{base}_web_{suffix}", array)

        def shared(suffix: str, array: np.ndarray) -> ir.Value:
            """A small constant (a shape, an axis, 16) every weight's ops read from one initializer."""
            key = (suffix, array.dtype.str, array.shape, array.tobytes())
            if key not in self._shared:
                self._shared[key] = new_initializer(graph, f"web_{suffix}", array)
            return self._shared[key]

        zp = zp_value.const_value.numpy().astype(np.int32) if zp_value is not None else None
        if bits == 8:
            codes = op("Cast", q_value, to=float_type)
            if zp is not None and zp.any():  # stored as 8-bit integers, cast at load
                zp_codes = self._per_axis(zp.astype(np.int8 if signed else np.uint8), shape, axis, block, op, const,
                                          shared, "zero_point")
                codes = op("Sub", codes, op("Cast", zp_codes, to=float_type))
            weight = op("Mul", codes, self._per_axis(scale, shape, axis, block, op, const, shared, "scale", scale_value))
        else:
            weight = self._int4_weight(q_value, zp, scale, shape, axis, block, signed, float_type, op, const, shared)
        for node in nodes:
            graph.insert_before(dq, node)
        weight.shape, weight.dtype = dq.outputs[0].shape, dq.outputs[0].dtype or float_type
        dq.outputs[0].replace_all_uses_with(weight, replace_graph_outputs=True)
        weight.name, dq.outputs[0].name = dq.outputs[0].name, None
        graph.remove(dq, safe=True)
        return int(np.prod(shape)) * np.dtype(scale.dtype).itemsize

    @staticmethod
    def _per_axis(arr: np.ndarray, shape: list[int], axis: int, block: int, op, const, shared, suffix: str,
                  stored: ir.Value | None = None) -> ir.Value:
        """`arr` (a scale or zero points, as DequantizeLinear reads them) as a value that broadcasts against the
        weight: a scalar, [d_axis, 1, ...] per axis, or for blocks the rows of [n_blocks, ...] gathered for every
        index along the axis (one Gather: the folded result is the only full-size copy). Per axis, `stored` (the
        initializer `arr` came from) is reshaped at load rather than copied: a tied table's row scales, which the
        embedding's Gather also reads, are then stored once (SmolLM2: 0.2 MB)."""
        rank = len(shape)
        if arr.size == 1 and not block:
            return const(suffix, arr.reshape(()))
        if not block:
            per_axis = [shape[axis]] + [1] * (rank - 1 - axis)
            if stored is not None and stored.is_initializer() and stored.const_value is not None:
                if list(arr.shape) == per_axis:
                    return stored
                return op("Reshape", stored, shared(f"shape_{'x'.join(map(str, per_axis))}", np.array(per_axis, np.int64)))
            return const(suffix, arr.reshape(per_axis))
        rows = shared(f"block_rows_{shape[axis]}_{block}", np.arange(shape[axis], dtype=np.int64) // block)
        return op("Gather", const(suffix, arr), rows, axis=axis)

    def _int4_weight(self, q_value, zp, scale, shape, axis, block, signed, float_type, op, const, shared) -> ir.Value:
        """(q - zp) * scale from 4-bit codes stored two per byte, with as few full-size constants for ORT's
        constant folding to hold as possible (it keeps every intermediate until the end of the pass: WASM memory).

        Codes are stored offset-binary, u = q + 8 for int4 (so u is 0..15 and q - zp = u - (zp + 8)), the first
        half of the rows of the first axis in the low nibbles and the second half in the high nibbles; unpacked
        with BitwiseAnd / BitShift on uint8 and one Concat, the difference u - zp taken in int8, then one Cast to
        float and one Mul."""
        q = q_value.const_value.numpy().astype(np.int32)
        offset = 8 if signed else 0
        u = (q + offset).astype(np.uint8)
        rows = shape[0]
        if rows % 2:  # an odd first axis: pad one row, sliced off after unpacking
            u = np.concatenate([u, np.zeros((1,) + u.shape[1:], np.uint8)])
        half = u.shape[0] // 2
        packed = const("packed", (u[:half] | (u[half:] << 4)).astype(np.uint8))
        low = op("BitwiseAnd", packed, shared("low_nibble", np.array(15, np.uint8)))
        high = op("BitShift", packed, shared("four", np.array(4, np.uint8)), direction="RIGHT")
        codes = op("Concat", low, high, axis=0)
        if rows % 2:
            codes = op("Slice", codes, shared("zero", np.array([0], np.int64)), shared(f"end_{rows}", np.array([rows], np.int64)))
        codes = op("Cast", codes, to=ir.DataType.INT8)
        zp_total = (np.zeros(1, np.int32) if zp is None else zp) + offset  # q - zp = u - (zp + offset), in -23..15
        if zp_total.any():
            if np.all(zp_total == zp_total.flat[0]):
                zp_value = shared(f"zero_point_{zp_total.flat[0]}", np.array(zp_total.flat[0], np.int8))
            else:
                zp_value = self._per_axis(zp_total.astype(np.int8), shape, axis, block, op, const, shared, "zero_point")
            codes = op("Sub", codes, zp_value)
        return op("Mul", op("Cast", codes, to=float_type), self._per_axis(scale, shape, axis, block, op, const, shared, "scale"))
