"""Store static W8A8 layers' int8 codes as uint8 with zero point 128: the same values, other kernels.

ONNX Runtime fuses a static per-tensor activation Q->DQ and an int8 weight DQ feeding a MatMul into
its integer GEMM. On x86 CPUs without VNNI its uint8 x int8 kernel (vpmaddubsw) sums pairs of
products in int16 and saturates on full-range weights (SmolLM2 W8A8: ppl 290,899 instead of 31.9);
its uint8 x uint8 kernel widens to int16 first and is exact. This pass re-encodes, per matched layer,

    QuantizeLinear(x, s, zp int8 z) -> DequantizeLinear(., s, z)   as   uint8, zero point z + 128
    DequantizeLinear(Wq int8, w_scale, 0)                            as   Wq + 128 (uint8), zero point 128

so every dequantized value is unchanged (q + 128 - (z + 128) == q - z) and ORT picks the exact
kernel. quantize_weights' 7-bit `reduce_range` is the other remedy; it costs a bit of weight
precision (SmolLM2 w8a8-smooth: +3.7% ppl at 7 bits vs +2.6% at 8), this pass costs nothing in
accuracy but makes an artifact TensorRT does not accept (TensorRT wants int8, zero point 0).

`when`: "always"; "never"; "auto" = only when compiling for such a CPU (`eqc compile --cpu avx2`, or `--cpu host` on one)
for the portable target (tensorrt needs int8; ort-cpu lowers to MatMulIntegerToFloat from int8 and
uses quantize_weights' reduce_range instead). Weights that are not symmetric per-channel int8
and activations without a static int8 pair are left as they are; a tied embedding table is re-encoded
with its Gather rows (their zero points move with it). Layers left int8 are listed and warned.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.lowering.cpu_features import int8_saturates_on
from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import (const_array, find_linear_sites, is_constant, new_initializer, static_activation_quantize,
                              weight_dequantize_node)
from eqcompiler.compile.pass_base import EqcPass

WHEN = ("auto", "always", "never")


@dataclasses.dataclass
class EncodeInt8AsUint8Options:
    when: str = "auto"

    def validate(self) -> None:
        if self.when not in WHEN:
            raise EqcError(f"encode_int8_as_uint8: when must be one of {', '.join(WHEN)}, got '{self.when}'")


def _symmetric_int8_weight(dq: ir.Node | None) -> bool:
    """A per-channel (unblocked) int8 weight DequantizeLinear with constant zero point 0, whose codes and
    zero points are read only by DequantizeLinear or Gather nodes (a tied table's embedding rows)."""
    if dq is None or dq.attributes.get_int("block_size", 0) or len(dq.inputs) < 3:
        return False
    wq, zp_value = dq.inputs[0], dq.inputs[2]
    if wq is None or not is_constant(wq) or wq.dtype != ir.DataType.INT8:
        return False
    zp = const_array(zp_value)
    if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
        return False
    return all(u.node.op_type in ("DequantizeLinear", "Gather") for v in (wq, zp_value) for u in v.uses())


def _retype_downstream(value: ir.Value) -> None:
    """uint8 element type on the Gather/Unsqueeze outputs between a re-encoded table and its DequantizeLinears."""
    todo = [value]
    while todo:
        for use in todo.pop().uses():
            if use.node.op_type in ("Gather", "Unsqueeze", "Reshape", "Squeeze", "Transpose") and use.idx == 0:
                out = use.node.outputs[0]
                if out.dtype == ir.DataType.INT8:
                    out.dtype = ir.DataType.UINT8
                todo.append(out)


def _reencode_everywhere(graph: ir.Graph, old: ir.Value, array: np.ndarray) -> None:
    """Replace constant `old` by `array` in every node that reads it."""
    new = new_initializer(graph, f"{old.name}_u8", array)
    old.replace_all_uses_with(new)
    if old.name in graph.initializers and not old.is_graph_output():
        graph.initializers.pop(old.name)
    _retype_downstream(new)


def _plus_128(value: ir.Value) -> np.ndarray:
    """An int8 constant's codes as uint8 + 128 (the same dequantized values with zero point + 128)."""
    return (const_array(value).astype(np.int16) + 128).astype(np.uint8)


def _replace(graph: ir.Graph, node: ir.Node, index: int, new: ir.Value) -> None:
    old = node.inputs[index]
    node.replace_input_with(index, new)
    if not old.uses() and old.name in graph.initializers and not old.is_graph_output():
        graph.initializers.pop(old.name)


class EncodeInt8AsUint8Pass(EqcPass):
    name = "encode_int8_as_uint8"
    Options = EncodeInt8AsUint8Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        applies, why = self._applies()
        if not applies:
            self.report({"applied": False, "why": why})
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        pairs: dict[int, tuple[ir.Node, ir.Node]] = {}  # activation (Q, DQ) with int8 zero points, by DQ
        weights: dict[int, ir.Node] = {}  # weight DequantizeLinears, by node
        left: dict[str, str] = {}
        for site in find_linear_sites(graph):
            act_dq = site.activation.producer()
            q = static_activation_quantize(act_dq)
            if not site.quantized or q is None:
                continue  # per-token chains and float inputs run in float in ORT: nothing saturates
            w_dq = weight_dequantize_node(site.node)
            if not _symmetric_int8_weight(w_dq):
                left[site.name] = "weight is not a symmetric per-channel int8 DequantizeLinear"
                continue
            if const_array(q.inputs[2]).dtype == np.int8:
                pairs[id(act_dq)] = (q, act_dq)
            weights[id(w_dq)] = w_dq
        for q, dq in pairs.values():
            zp = new_initializer(graph, f"{q.inputs[2].name}_u8", _plus_128(q.inputs[2]))
            _replace(graph, q, 2, zp)
            _replace(graph, dq, 2, zp)
            q.outputs[0].dtype = ir.DataType.UINT8
        for dq in weights.values():
            codes, zp = dq.inputs[0], dq.inputs[2]
            _reencode_everywhere(graph, codes, _plus_128(codes))
            _reencode_everywhere(graph, zp, np.full(const_array(zp).shape, 128, np.uint8))
        if left:
            self.context.warn(f"encode_int8_as_uint8: {len(left)} static int8 layer(s) keep int8 weights "
                              f"(e.g. {next(iter(left))}: {next(iter(left.values()))}); on such CPUs ORT's int8 "
                              "kernels may saturate on them")
        self.report({"applied": True, "why": why, "weights": len(weights), "activation_pairs": len(pairs),
                     "left_int8": left})
        return ir.passes.PassResult(model, modified=bool(weights or pairs))

    def _applies(self) -> tuple[bool, str]:
        when = self.options.when
        target = self.context.target
        if when == "always" and target in ("tensorrt", "ort-cpu"):
            raise EqcError(f"encode_int8_as_uint8: --target {target} needs int8 weights (TensorRT: int8 with zero point 0; "
                           "ort-cpu: MatMulIntegerToFloat lowering); use --reduce-range there, or --target portable")
        if when != "auto":
            return when == "always", f"when={when}"
        if target != "portable":
            return False, f"auto: target {target} (only portable artifacts are re-encoded)"
        if not int8_saturates_on(self.context.cpu):
            return False, f"auto: --cpu {self.context.cpu}: ORT's int8 kernels are exact there (VNNI/AMX, or not x86)"
        return True, f"auto: --cpu {self.context.cpu} (x86 without VNNI), portable target"
