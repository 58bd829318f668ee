"""Lower static W8A8 QDQ linear layers to ONNX Runtime's integer `com.microsoft::MatMulIntegerToFloat`.

Matched (what quantize_weights + quantize_activations emit):

    q  = QuantizeLinear(x, s, zp)                    # per tensor, int8 or uint8, constant s/zp
    dq = DequantizeLinear(q, s, zp)
    w  = DequantizeLinear(Wq int8, w_scale[N], w_zp, axis=<output channel>)   [-> Transpose for tied lm_head]
    y  = MatMul(dq, w)

Replacement: y = MatMulIntegerToFloat(q, Wq[K,N], s, w_scale, zp, w_zp). ORT's CPU kernel multiplies
int8 x int8 with int32 accumulation and applies s * w_scale[n] once per output, so the weights are
never dequantized at run time (the QDQ graph dequantizes every weight on every run: ORT's CPU QDQ
fusion does not turn a DQ->MatMul without an output Q into an integer kernel). The result equals the
QDQ graph up to float32 summation order. A tied lm_head weight stored [N, K] gets a transposed int8
copy, and the embedding Gather is redirected to read that copy (axis 1), so the table is stored once.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from eqcompiler.compile.graph import (LinearSite, const_array, find_linear_sites, is_constant, new_initializer,
                              static_activation_quantize, substitute_output, weight_dequantize_node)
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class LowerQdqToOrtInt8Options(LayerSelection):
    pass


def _weight_dq(site: LinearSite) -> ir.Node | None:
    """The per-output-channel int8 weight DequantizeLinear of a site, else None."""
    src = weight_dequantize_node(site.node)
    if src is None or src.attributes.get_int("block_size", 0):
        return None
    if src.inputs[0].dtype != ir.DataType.INT8 or not is_constant(src.inputs[0]):
        return None
    scale = const_array(src.inputs[1])
    axis = src.attributes.get_int("axis", 1) % 2
    if scale is None or scale.ndim != 1 or axis != (0 if site.transposed else 1):
        return None
    return src


class LowerQdqToOrtInt8Pass(EqcPass):
    name = "lower_qdq_to_ort_int8"
    Options = LowerQdqToOrtInt8Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered: list[str] = []
        transposed_copies: dict[int, ir.Value] = {}
        originals: list[ir.Value] = []
        for site in find_linear_sites(graph, self.options):
            if site.node.op_type != "MatMul":
                continue
            q = static_activation_quantize(site.node.inputs[0].producer())
            w_dq = _weight_dq(site)
            if q is None or w_dq is None:
                continue
            wq, w_scale = w_dq.inputs[0], w_dq.inputs[1]
            w_zp = w_dq.inputs[2] if len(w_dq.inputs) > 2 and w_dq.inputs[2] is not None else None
            if w_zp is None:
                w_zp = new_initializer(graph, f"{wq.name}_zp0", np.zeros(w_scale.shape[0], np.int8))
            if site.transposed:
                originals.append(wq)
                wq = transposed_copies.get(id(wq)) or self._transpose_table(graph, wq, transposed_copies)
            node = ir.node("MatMulIntegerToFloat", [q.outputs[0], wq, q.inputs[1], w_scale, q.inputs[2], w_zp],
                           domain=MS_DOMAIN, name=f"{site.node.name}/MatMulIntegerToFloat")
            substitute_output(graph, site.node.outputs[0], node, before=site.node, dtype=ir.DataType.FLOAT)
            graph.remove(site.node, safe=True)
            lowered.append(site.name)
        if lowered:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
            for original in originals:  # the [N,K] table, now read by nothing
                if not list(original.uses()) and original.name in graph.initializers:
                    graph.initializers.pop(original.name)
        self.report({"lowered": len(lowered), "layers": lowered, "op": f"{MS_DOMAIN}::MatMulIntegerToFloat"})
        return ir.passes.PassResult(model, modified=bool(lowered))

    @staticmethod
    def _transpose_table(graph: ir.Graph, wq: ir.Value, cache: dict[int, ir.Value]) -> ir.Value:
        """[N,K] int8 table -> [K,N] copy; Gathers of its rows read columns of the copy instead."""
        arr = np.ascontiguousarray(const_array(wq).T)
        kn = new_initializer(graph, f"{wq.name}_kn", arr)
        cache[id(wq)] = kn
        for use in list(wq.uses()):
            node = use.node
            if node.op_type == "Gather" and use.idx == 0 and node.attributes.get_int("axis", 0) == 0:
                # rows of [N,K] = columns of [K,N]: Gather axis 1 gives [K, *ids]; move K last.
                ids_shape = node.inputs[1].shape
                rank = len(ids_shape) + 1 if ids_shape is not None else None
                if rank is None:
                    continue
                node.replace_input_with(0, kn)
                node.attributes["axis"] = ir.AttrInt64("axis", 1)
                cols = node.outputs[0]
                perm = list(range(1, rank)) + [0]
                tr = ir.node("Transpose", [cols], {"perm": perm}, name=f"{node.name}/to_rows")
                graph.insert_after(node, tr)
                cols.replace_all_uses_with(tr.outputs[0], replace_graph_outputs=True)
                tr.replace_input_with(0, cols)
                tr.outputs[0].name, cols.name = cols.name, f"{cols.name}_cols" if cols.name else None
                tr.outputs[0].dtype = ir.DataType.INT8
                cols.dtype = ir.DataType.INT8
                tr.outputs[0].shape = cols.shape
                cols.shape = None
        return kn
