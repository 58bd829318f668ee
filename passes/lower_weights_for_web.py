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
  4-bit codes:  stored packed two per uint8 byte (the same bytes as int4), unpacked by Cast/Mod/Div/Concat/
                Reshape on int32 (every op onnxruntime-web has), sign-extended for int4, then Cast to float
  blocked scales: Unsqueeze/Expand/Reshape(/Slice) from [.., K/B, ..] to [.., K, ..]
The weight storage stays int8 / packed int4 (the file size of the QDQ artifact); in memory, after loading,
the weights take float32 size (reported, and a warning above 2 GiB: wasm32 memory ends at 4 GiB).
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

        if bits == 8:
            codes = op("Cast", q_value, to=float_type)
        else:
            codes = op("Cast", self._unpacked_int4(q_value, shape, signed, op, const, shared), to=float_type)

        def broadcast(arr: np.ndarray, suffix: str) -> ir.Value:
            """`arr` (a scale, or zero points as int8/uint8) shaped to broadcast against the codes, as float."""
            if arr.size == 1 and not block:
                value = const(suffix, arr.reshape(()))
            elif not block:  # per axis: [d_axis] -> [d_axis, 1, ...]
                value = const(suffix, arr.reshape([shape[axis]] + [1] * (rank - 1 - axis)))
            else:
                blocks = arr.shape[axis]
                value = op("Unsqueeze", const(suffix, arr), shared("axis", np.array([axis + 1], np.int64)))
                expanded = list(arr.shape[:axis]) + [blocks, block] + list(arr.shape[axis + 1:])
                value = op("Expand", value, shared("expand", np.array(expanded, np.int64)))
                merged = list(arr.shape[:axis]) + [blocks * block] + list(arr.shape[axis + 1:])
                value = op("Reshape", value, shared("merge", np.array(merged, np.int64)))
                if blocks * block != shape[axis]:
                    value = op("Slice", value, shared("zero", np.array([0], np.int64)),
                               shared("end", np.array([shape[axis]], np.int64)), shared("axis", np.array([axis], np.int64)))
            return value if arr.dtype == scale.dtype else op("Cast", value, to=float_type)

        if zp_value is not None:
            zp = zp_value.const_value.numpy().astype(np.int32)
            if zp.any():  # stored as 8-bit integers (a float copy would cost as much as the scales), cast at load
                codes = op("Sub", codes, broadcast(zp.astype(np.int8 if signed else np.uint8), "zero_point"))
        weight = op("Mul", codes, broadcast(scale, "scale"))
        for node in nodes:
            graph.insert_before(dq, node)
        weight.shape, weight.dtype = dq.outputs[0].shape, dq.outputs[0].dtype or float_type
        dq.outputs[0].replace_all_uses_with(weight, replace_graph_outputs=True)
        weight.name, dq.outputs[0].name = dq.outputs[0].name, None
        graph.remove(dq, safe=True)
        return int(np.prod(shape)) * np.dtype(scale.dtype).itemsize

    @staticmethod
    def _unpacked_int4(q_value, shape, signed, op, const, shared) -> ir.Value:
        """int32 codes of shape `shape` from the 4-bit weight stored packed two per uint8 (low nibble first)."""
        q = q_value.const_value.numpy().astype(np.int32).ravel()
        nibbles = (q & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = const("packed", (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8))
        as_int = op("Cast", packed, to=ir.DataType.INT32)
        sixteen = shared("sixteen", np.array(16, np.int32))
        last = shared("last", np.array([-1], np.int64))
        low = op("Unsqueeze", op("Mod", as_int, sixteen), last)
        high = op("Unsqueeze", op("Div", as_int, sixteen), last)
        flat = op("Reshape", op("Concat", low, high, axis=-1), last)
        if q.size % 2:
            flat = op("Slice", flat, shared("zero", np.array([0], np.int64)), shared("end", np.array([q.size], np.int64)))
        codes = op("Reshape", flat, shared("shape", np.array(shape, np.int64)))
        if signed:  # two's complement nibble: ((u + 8) mod 16) - 8
            eight = shared("eight", np.array(8, np.int32))
            codes = op("Sub", op("Mod", op("Add", codes, eight), sixteen), eight)
        return codes
