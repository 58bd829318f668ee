"""Check that a QDQ graph is placed the way TensorRT's explicit quantization expects (reports only).

The rules follow NVIDIA's "Working with Quantized Types" / "Explicit Quantization" chapters of the
TensorRT developer guide (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/):

- R1 "TensorRT employs a symmetric quantization scheme": every Q/DQ zero point must be 0.
- R2 Supported quantized types are INT8, INT4 (weight-only), FP8, FP4: no UINT8/UINT4 Q/DQ.
- R3 Per-channel quantization of weights must be along the output-channel axis (for a MatMul
  weight [K, N] that is axis 1; for a transposed [N, K] weight axis 0); block quantization runs
  along the reduction (K) axis and is for 4-bit weight-only quantization.
- R4 "When using pre-quantized weights, an IDequantizeLayer is required between the weights and the
  linear operator": the DequantizeLinear feeding a weight must read a constant initializer (TensorRT
  folds it at build time); Q/DQ scales must be build-time constants too (a scale computed in the
  graph, as in per-token dynamic quantization, is not an explicit-quantization Q/DQ).
- R5 Placement recommendation "quantize all inputs of weighted operations": when a linear layer's
  activation goes through Q/DQ, its weight must come through DQ too (else TensorRT runs the layer
  in float and the activation Q/DQ only adds rounding). INT8 activations are per tensor.
- R6 Keep the attention mask and softmax in high precision: no Q/DQ on a tensor computed from the
  attention mask on its way to Softmax, nor on Softmax's own output (TensorRT's MHA fusion and
  accuracy guidance keep the additive mask and probabilities in float for INT8).

The pass never edits the graph: it reports `violations`, and with `fail=True` (what
`eqc compile --target tensorrt` uses) raises an EqcError listing the first ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import const_array, find_linear_sites, is_constant
from eqcompiler.compile.pass_base import EqcPass

ALLOWED_TYPES = {ir.DataType.INT8, ir.DataType.INT4, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT4E2M1}
MASK_INPUTS = ("attention_mask",)


@dataclasses.dataclass
class CheckTensorrtPlacementOptions:
    fail: bool = False  # raise an EqcError listing the first violations
    max_listed: int = 5


def _qdq_dtype(node: ir.Node) -> ir.DataType | None:
    """The integer type a QuantizeLinear produces / a DequantizeLinear reads."""
    if node.op_type == "DequantizeLinear":
        return node.inputs[0].dtype
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return node.inputs[2].dtype
    out = node.attributes.get_int("output_dtype", 0)
    return ir.DataType(out) if out else ir.DataType.UINT8  # ONNX default without a zero point


def _is_qdq(node: ir.Node | None) -> bool:
    return node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx")


def _is_embedding_rows(node: ir.Node) -> bool:
    """DequantizeLinear of rows gathered from a constant quantized table (quantize_weights' embeddings)."""
    if node.op_type != "DequantizeLinear":
        return False
    src = node.inputs[0].producer()
    return src is not None and src.op_type == "Gather" and is_constant(src.inputs[0])


def _mask_path(graph: ir.Graph) -> set[int]:
    """ids of values computed from the attention mask, up to and including Softmax outputs (R6)."""
    start = [v for v in graph.inputs if v.name in MASK_INPUTS]
    seen: set[int] = set()
    stack = list(start)
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        for use in value.uses():
            node = use.node
            for out in node.outputs:
                if node.op_type == "Softmax":
                    seen.add(id(out))  # the probabilities themselves, but not what follows
                else:
                    stack.append(out)
    for node in graph:
        if node.op_type == "Softmax":
            seen.update(id(o) for o in node.outputs)
    return seen


class CheckTensorrtPlacementPass(EqcPass):
    name = "check_tensorrt_placement"
    Options = CheckTensorrtPlacementOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        violations: list[str] = []
        qdq_nodes = [n for n in graph if _is_qdq(n)]
        notes: list[str] = []
        for node in qdq_nodes:
            if _is_embedding_rows(node):
                # Per-row dequantization of gathered embedding rows is weight compression of a
                # lookup table, not a Q/DQ pair around a linear layer; TensorRT would need the
                # table stored dequantized (quantize_weights embeddings=false) or a plugin.
                notes.append(f"{node.name}: embedding rows dequantized with gathered scales (not a TensorRT Q/DQ)")
                continue
            violations += self._check_node(node)
        layers = 0
        for site in find_linear_sites(graph):
            found = self._check_site(site)
            violations += found
            layers += 1
        mask = _mask_path(graph)
        for node in qdq_nodes:
            if node.op_type == "QuantizeLinear" and id(node.inputs[0]) in mask:
                violations.append(f"R6 {node.name}: Q/DQ on the attention-mask/softmax path "
                                  f"('{node.inputs[0].name}'); keep the mask and softmax in float")
        self.report({"violations": violations, "notes": notes, "qdq_nodes": len(qdq_nodes), "linear_layers": layers,
                     "ok": not violations})
        if violations and self.options.fail:
            shown = "; ".join(violations[: self.options.max_listed])
            more = f" (and {len(violations) - self.options.max_listed} more)" if len(violations) > self.options.max_listed else ""
            raise EqcError(f"graph is not TensorRT-ready: {len(violations)} violation(s): {shown}{more}")
        return ir.passes.PassResult(model, modified=False)

    @staticmethod
    def _check_node(node: ir.Node) -> list[str]:
        out: list[str] = []
        dtype = _qdq_dtype(node)
        if dtype is not None and dtype not in ALLOWED_TYPES:
            out.append(f"R2 {node.name}: {node.op_type} uses {dtype.name}; TensorRT takes INT8/INT4/FP8/FP4 only")
        zp = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if zp is not None and np.any(zp.astype(np.int64) != 0):
            out.append(f"R1 {node.name}: non-zero zero point (TensorRT quantization is symmetric)")
        elif len(node.inputs) > 2 and node.inputs[2] is not None and zp is None:
            out.append(f"R4 {node.name}: zero point is not a constant")
        if not is_constant(node.inputs[1]) and const_array(node.inputs[1]) is None:
            out.append(f"R4 {node.name}: scale is computed in the graph (dynamic); TensorRT needs a build-time constant scale")
        return out

    @staticmethod
    def _check_site(site: Any) -> list[str]:
        out: list[str] = []
        mm = site.node
        where = mm.name or site.name
        act = mm.inputs[0].producer()
        act_quantized = act is not None and act.op_type == "DequantizeLinear"
        w_in = mm.inputs[1]
        w_node = w_in.producer()
        if w_node is not None and w_node.op_type == "Transpose":
            w_node = w_node.inputs[0].producer()
        w_dq = w_node if w_node is not None and w_node.op_type == "DequantizeLinear" else None
        if act_quantized and w_dq is None:
            out.append(f"R5 {where}: activation has Q/DQ but the weight does not; quantize both MatMul inputs")
        if act_quantized:
            scale = const_array(act.inputs[1])
            if scale is not None and scale.size != 1:
                out.append(f"R5 {where}: INT8 activation quantization must be per tensor (scale has {scale.size} values)")
            elif act.attributes.get_int("block_size", 0):
                out.append(f"R5 {where}: activation Q/DQ is blocked (per token); TensorRT INT8 activations are per tensor")
        if w_dq is None:
            return out
        if not is_constant(w_dq.inputs[0]):
            out.append(f"R4 {where}: weight DequantizeLinear does not read a constant initializer")
        block = w_dq.attributes.get_int("block_size", 0)
        scale = const_array(w_dq.inputs[1])
        axis = w_dq.attributes.get_int("axis", 1)
        rank = len(site.weight.shape)
        axis = axis + rank if axis < 0 else axis
        # Output channel of the stored weight: N is axis 1 of [K,N], axis 0 of a transposed [N,K].
        out_axis = 0 if site.transposed else 1
        if block:
            if axis != 1 - out_axis:
                out.append(f"R3 {where}: blocked weight quantization along axis {axis}; TensorRT blocks along K (axis {1 - out_axis})")
            if w_dq.inputs[0].dtype == ir.DataType.INT8 and act_quantized:
                out.append(f"R3 {where}: blocked INT8 weights with quantized activations; TensorRT blocks 4-bit weight-only layers")
        elif scale is not None and scale.size > 1 and axis != out_axis:
            out.append(f"R3 {where}: per-channel weight scale along axis {axis}; must be the output-channel axis {out_axis}")
        return out
