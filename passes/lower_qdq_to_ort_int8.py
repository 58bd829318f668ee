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
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.graph import const_array, static_activation_quantize
from eqcompiler.compile.layer_selection import EVERY_LAYER, LayerSelection
from eqcompiler.compile.patterns import (LinearSiteRule, RuleRecord, lower_with_rules, optional_input, per_channel_int8,
                                         quantize_dequantize)
from eqcompiler.compile.pass_base import EqcPass

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class LowerQdqToOrtInt8Options(LayerSelection):
    pass


class MatMulIntegerToFloatRule(LinearSiteRule):
    """MatMul(static Q->DQ activation, [Transpose] per-channel int8 DequantizeLinear) -> MatMulIntegerToFloat.

    `transposed`: a tied [N, K] table gets one transposed [K, N] int8 copy (`kn_for`, shared by the
    variants), and the embedding Gathers of its rows are redirected to read columns of the copy."""

    def __init__(self, transposed: bool = False, select: LayerSelection = EVERY_LAYER, record: RuleRecord | None = None,
                 kn_for: dict[int, ir.Value] | None = None) -> None:
        super().__init__(f"LowerQdqToOrtInt8[{'tied' if transposed else 'kn'}]", transposed=transposed, select=select,
                         record=record)
        self.kn_for = kn_for if kn_for is not None else {}
        self.originals: list[ir.Value] = []  # tied tables, dropped when nothing reads them any more

    def activation(self, op, x):
        return quantize_dequantize(op, x)

    def check_site(self, w_dq: ir.Value, q: ir.Value, a_dq: ir.Value, **_: Any) -> str:
        if static_activation_quantize(a_dq.producer()) is not q.producer():
            return "activation Q->DQ is not a per-tensor int8/uint8 pair with the same constant scale and zero point"
        return per_channel_int8(w_dq.producer(), self.transposed, zero_zp=False)

    def rewrite(self, op, q: ir.Value, a_scale: ir.Value, a_zp: ir.Value, wq: ir.Value, w_scale: ir.Value,
                w_dq: ir.Value, y: ir.Value, **_: Any):
        matmul = self.matched(y)
        w_zp = optional_input(w_dq.producer(), 2)
        if w_zp is None:
            w_zp = self.initializer(op, f"{wq.name}_zp0", np.zeros(w_scale.shape[0], np.int8))
        if self.transposed:
            self.originals.append(wq)
            if id(wq) not in self.kn_for:
                self.kn_for[id(wq)] = self._transpose_table(op, wq)
            wq = self.kn_for[id(wq)]
        out = op.MatMulIntegerToFloat(q, wq, a_scale, w_scale, a_zp, w_zp, _domain=MS_DOMAIN, _version=1,
                                      _name=f"{matmul.name}/MatMulIntegerToFloat")
        out.dtype = ir.DataType.FLOAT
        return out

    def _transpose_table(self, op, wq: ir.Value) -> ir.Value:
        """[N,K] int8 table -> [K,N] copy; Gathers of its rows read columns of the copy instead."""
        kn = self.initializer(op, f"{wq.name}_kn", np.ascontiguousarray(const_array(wq).T))
        graph = self._graph
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


def rules(select: LayerSelection = EVERY_LAYER, record: RuleRecord | None = None) -> list[MatMulIntegerToFloatRule]:
    record = record if record is not None else RuleRecord()
    kn_for: dict[int, ir.Value] = {}
    return [MatMulIntegerToFloatRule(transposed, select, record, kn_for) for transposed in (False, True)]


class LowerQdqToOrtInt8Pass(EqcPass):
    name = "lower_qdq_to_ort_int8"
    Options = LowerQdqToOrtInt8Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        variants = rules(self.options, RuleRecord())
        lowered = lower_with_rules(model, variants, (MS_DOMAIN, 1), prune=True)
        if lowered:
            for original in (v for rule in variants for v in rule.originals):  # the [N,K] table, now read by nothing
                if not list(original.uses()) and original.name in graph.initializers:
                    graph.initializers.pop(original.name)
        self.report({"lowered": len(lowered), "layers": lowered, "op": f"{MS_DOMAIN}::MatMulIntegerToFloat"})
        return ir.passes.PassResult(model, modified=bool(lowered))
