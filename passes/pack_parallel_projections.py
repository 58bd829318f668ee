"""Pack projections that read the same input into one GEMM (ort-cpu lowering, after the integer lowerings).

Matched: two or more linear nodes of one kind on the same activation, each with constant weights in the
same format, e.g. a decoder layer's q/k/v projections (three MatMulNBits on the norm's output) or its
gate/up projections. Kinds and how their weights are joined along N:

    com.microsoft::MatMulNBits(A, B [N, blocks, blob], scales [N*blocks], [zero_points [N, ...]])
        same K, bits, block_size, accuracy_level; all with zero points or none
    ai.eqc::FusedInt8Gemm(A, B [N, K] int8, scale [N])    same attributes, no bias
    ai.eqc::Int8WeightGemm(A, B [N, K] int8, scale [N])   no bias
    MatMul(A, W [K, N] float32)

Replacement: one node with the joined weights, then Split(axis=-1) into the original outputs. Each output
column is computed exactly as before (same weights, same per-column scales, same activation quantization,
which depends on A only), so the numbers do not change: fewer, wider GEMMs keep both threads busier at
decode, where every projection is a thin matrix-vector product.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.fusion import MS_DOMAIN
from eqcompiler.compile.graph import const_array, int_constant, new_initializer
from eqcompiler.compile.pass_base import EqcPass

EQC_DOMAIN = "ai.eqc"
# (domain, op) -> (weight inputs joined along N, the axis of N in each)
PACKABLE = {
    (MS_DOMAIN, "MatMulNBits"): ((1, 0), (2, 0), (3, 0)),
    (EQC_DOMAIN, "FusedInt8Gemm"): ((1, 0), (2, 0)),
    (EQC_DOMAIN, "Int8WeightGemm"): ((1, 0), (2, 0)),
    ("", "MatMul"): ((1, 1),),
}


def _weight(node: ir.Node, index: int) -> ir.TensorProtocol | None:
    """The constant tensor at input `index` (its shape and dtype are read without loading the data)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    return None if value is None else ir.convenience.get_const_tensor(value)


def _kind(node: ir.Node) -> tuple[str, str] | None:
    key = (node.domain or "", node.op_type)
    if key not in PACKABLE:
        return None
    weights = PACKABLE[key]
    present = [i for i, _ in weights if i < len(node.inputs) and node.inputs[i] is not None]
    if any(_weight(node, i) is None for i in present):
        return None
    allowed = {0} | {i for i, _ in weights}
    if any(v is not None for i, v in enumerate(node.inputs) if i not in allowed):
        return None  # a bias or g_idx: not joined here
    if key == ("", "MatMul"):
        w = _weight(node, 1)
        if len(w.shape) != 2 or w.dtype != ir.DataType.FLOAT:
            return None
    return key


def _signature(node: ir.Node) -> tuple:
    """What must agree between nodes packed together: attributes but N, which inputs are present, and the
    weights' shapes but N (K, blocks, blob; for MatMul, K)."""
    attrs = tuple(sorted((k, repr(v.value)) for k, v in node.attributes.items() if k != "N"))
    present = tuple(v is not None for v in node.inputs)
    if node.op_type == "MatMul":
        shapes: tuple = (_weight(node, 1).shape[0],)
    else:
        shapes = tuple(tuple(_weight(node, i).shape[1:]) if i > 0 and _weight(node, i) is not None else None
                       for i in range(len(node.inputs)))
    return (node.domain or "", node.op_type, attrs, present, shapes)


def _out_features(node: ir.Node) -> int:
    return int(_weight(node, 1).shape[1 if node.op_type == "MatMul" else 0])


@dataclasses.dataclass
class PackParallelProjectionsOptions:
    pass


class PackParallelProjectionsPass(EqcPass):
    name = "pack_parallel_projections"
    Options = PackParallelProjectionsOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:
            if _kind(node) is None or any(o.is_graph_output() for o in node.outputs):
                continue
            groups.setdefault((id(node.inputs[0]), _signature(node)), []).append(node)
        packable = [g for g in groups.values() if len(g) > 1]
        for index, nodes in enumerate(packable):
            self._pack(graph, nodes, index)
        packed = sum(len(g) for g in packable)
        self.report({"packed_nodes": packed, "groups": len(packable)})
        return ir.passes.PassResult(model, modified=bool(packed))

    @staticmethod
    def _pack(graph: ir.Graph, nodes: list[ir.Node], index: int) -> None:
        first = nodes[0]
        key = (first.domain or "", first.op_type)
        inputs = list(first.inputs)
        name = f"packed_projection_{index}"
        for i, axis in PACKABLE[key]:
            if i >= len(first.inputs) or first.inputs[i] is None:
                continue
            joined = np.concatenate([const_array(n.inputs[i]) for n in nodes], axis=axis)
            inputs[i] = new_initializer(graph, f"{name}.input_{i}", joined)
        sizes = [_out_features(n) for n in nodes]
        attrs = dict(first.attributes)
        if "N" in attrs:
            attrs["N"] = ir.AttrInt64("N", sum(sizes))
        gemm = ir.Node(first.domain, first.op_type, inputs, attributes=list(attrs.values()), name=name,
                       outputs=[ir.Value(name=f"{name}/output_0")], version=first.version)
        split_sizes = int_constant(graph, f"{name}.split", sizes)
        split = ir.Node("", "Split", [gemm.outputs[0], split_sizes], attributes=[ir.AttrInt64("axis", -1)],
                        name=f"{name}/split", outputs=[ir.Value(name=f"{name}/split_{k}") for k in range(len(nodes))])
        # Insert before the earliest of the group: every consumer of any of them comes after it.
        graph.insert_before(first, [gemm, split])
        for node, out in zip(nodes, split.outputs):
            old = node.outputs[0]
            out.shape, out.dtype = old.shape, old.dtype
            old.replace_all_uses_with(out)
            graph.remove(node, safe=True)
        for node in nodes:  # their weight initializers are now unused
            for i, _ in PACKABLE[key]:
                value = node.inputs[i] if i < len(node.inputs) else None
                if value is not None and not value.uses() and value.name in graph.initializers:
                    graph.initializers.pop(value.name)
