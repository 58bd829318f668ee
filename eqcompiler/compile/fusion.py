"""Shared steps and checks for the fusion lowerings (passes/fuse_*.py).

Fusion rules match value types and constant operands, so the graph is first given types (ONNX shape
inference, only possible while it holds standard ops) and the exporter's identity Casts (float -> float,
which the TorchScript tracer leaves around every norm and softmax) are removed with onnxscript's own rules,
as are single-input Concats (copies) in front of the past inputs.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import cast_cast_rule, no_op_cast_rule

from eqcompiler.compile.graph import const_array

MS_DOMAIN = "com.microsoft"


def prepare_for_fusion(model: ir.Model) -> None:
    """Types on every value, identity Casts gone. Values that already carry a type keep it."""
    common_passes.ShapeInferencePass()(model)
    if RewriteRuleSet([no_op_cast_rule, cast_cast_rule]).apply_to_model(model):
        common_passes.IdentityEliminationPass()(model)  # the rules leave Identity nodes behind
    _drop_single_input_concats(model.graph)


def _drop_single_input_concats(graph: ir.Graph) -> None:
    """Concat of one input is a copy (the tracer leaves one on the first layer's past key): readers take the
    input itself, so the fused attention reads the past directly."""
    for node in list(graph):
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx") and len(node.inputs) == 1:
            out = node.outputs[0]
            if out.is_graph_output() or node.inputs[0] is None:
                continue
            out.replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)


def scalar(value: ir.Value | None) -> float | None:
    """A constant's single element as a float, else None."""
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(np.ravel(arr)[0])


def const_ints(value: ir.Value | None) -> list[int] | None:
    arr = const_array(value)
    return None if arr is None or arr.dtype.kind not in "iu" else [int(v) for v in np.ravel(arr)]


def is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def use_ms_domain(model: ir.Model) -> None:
    model.opset_imports.setdefault(MS_DOMAIN, 1)


def name_fused_nodes(graph: ir.Graph, prefix: str, op_types: set[str]) -> None:
    """Stable names for the nodes a fusion made and their outputs (graph outputs keep theirs).

    The rewriter names what it creates from a counter that depends on everything created before in the
    process, so the same graph would get different names when lowered in the same run as its recipe and
    when lowered later from the saved artifact: named by position instead, both give the same bytes."""
    counts: dict[str, int] = {}
    for node in graph:
        if node.op_type not in op_types or node.domain != MS_DOMAIN:
            continue
        k = counts.get(node.op_type, 0)
        counts[node.op_type] = k + 1
        node.name = f"{prefix}/{node.op_type}_{k}"
        for i, value in enumerate(node.outputs):
            if not value.is_graph_output():
                value.name = f"{node.name}/output_{i}"
