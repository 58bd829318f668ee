"""Fold the graph's small constant computations and drop what nothing reads (`--target web`, last).

Why: an exported decoder computes shapes and masks per layer (SmolLM2's TorchScript export: 7,384 nodes, 2,439 of
them Constant), and every node costs bytes in model.onnx (1.44 MB of its 137.1 MB as `w8 --target web`) and time in
a runtime without graph fusions. Folding them once leaves 4,162 nodes in a 0.98 MB graph, the same logits bit for
bit (folded values are the ones the runtime would compute).

Built from kept library passes, not hand-written folding: onnxscript's constant folder (ONNX reference
evaluation of nodes whose inputs are all constant), then onnx-ir's cleanup passes (unused nodes, Constant nodes
lifted to initializers, duplicate initializers and common subexpressions merged). Weights are never folded (web
weights must stay int8 / int4 in the file; ONNX Runtime folds them once at load, passes/lower_weights_for_web.py):
a node reading integer codes (int8 / uint8 / int4 / uint4 constants) or one of lower_weights_for_web's own nodes
stays, and so does any node with an input or output above the size limits. onnxscript's default rewrite rules are left out: they
add nothing here and take 100 s on SmolLM2's graph (the folding and cleanup take 0.6 s).
"""
from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common

from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.errors import EqcError


_CODES = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}


def _not_a_weight(node: ir.Node) -> bool | None:
    """False for a node that would turn a quantized weight into floats in the file; None: the folder decides."""
    if "/web/" in (node.name or ""):  # lower_weights_for_web's unpacking, casts and scale gathers
        return False
    if any(v is not None and v.const_value is not None and v.const_value.dtype in _CODES for v in node.inputs):
        return False
    return None


@dataclasses.dataclass
class SimplifyGraphOptions:
    input_size_limit: int = 1024  # elements: a node reading a bigger constant is not folded
    output_size_limit: int = 4096  # elements: a folded value bigger than this is not stored

    def validate(self) -> None:
        if self.input_size_limit < 0 or self.output_size_limit < 0:
            raise EqcError("simplify_graph: size limits must be >= 0")


class SimplifyGraphPass(EqcPass):
    name = "simplify_graph"
    Options = SimplifyGraphOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import constant_folding

        before = sum(1 for _ in model.graph.all_nodes())
        fold = constant_folding.FoldConstantsPass(shape_inference=False,
                                                   input_size_limit=self.options.input_size_limit,
                                                   output_size_limit=self.options.output_size_limit,
                                                   should_fold=_not_a_weight)
        ir.passes.Sequential(
            ir.passes.PassManager([fold, common.RemoveUnusedNodesPass()], steps=2, early_stop=True),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.DeduplicateInitializersPass(),
            common.CommonSubexpressionEliminationPass(),
            common.RemoveUnusedNodesPass(),
        )(model)
        after = sum(1 for _ in model.graph.all_nodes())
        self.report({"nodes_before": before, "nodes_after": after})
        return ir.passes.PassResult(model, modified=after != before)
