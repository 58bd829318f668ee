"""Lower per-channel int8 weight-only QDQ linear layers to eqc's `ai.eqc::Int8WeightGemm` (CPU).

Matched (the same layers as lower_weight_only_int8: quantize_weights with block_size=0, run after
the integer lowerings so it takes what they left, e.g. every layer of w8, or the tied lm_head of
w8a8-dynamic):

    w = DequantizeLinear(Wq int8 [K,N], scale [N], zp=0, axis=1)          -> MatMul(x, w) [+ bias]
    w = Transpose(DequantizeLinear(T int8 [N,K], scale [N], zp=0, axis=0)) -> MatMul(x, w) [+ bias]

Why: ONNX Runtime's CPU provider dequantizes a weight DequantizeLinear on every run, and for the
tied 49152x576 lm_head that alone (73 ms per SmolLM2 decode step on the 2-core CI machine) costs
more than the whole fp32 step; MatMulNBits bits=8 (lower_weight_only_int8) was slower still. The op
reads the int8 weight directly and multiplies in float: y = (x . float(Wq[n,:])) * scale[n] (+ bias),
the QDQ graph's value up to float summation order, with no activation quantization. The tied
table is read in place ([N,K] is the op's layout), so the embedding Gathers keep sharing it; an
untied [K,N] weight is replaced by its transpose. Needs the eqc op library at run time (CPU kernel
only: the CUDA provider runs the weight-only QDQ graph as is).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from eqcompiler.compile.graph import find_linear_sites, new_initializer, substitute_output
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.passes.lower_fused_int8_gemm import DOMAIN, OP_VERSION, foldable_bias
from eqcompiler.passes.lower_weight_only_int8 import weight_only_dq

OP_TYPE = "Int8WeightGemm"


@dataclasses.dataclass
class LowerInt8WeightGemmOptions(LayerSelection):
    pass


class LowerInt8WeightGemmPass(EqcPass):
    name = "lower_int8_weight_gemm"
    Options = LowerInt8WeightGemmOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered: list[str] = []
        skipped: dict[str, str] = {}
        b_nk_for: dict[int, ir.Value] = {}  # a weight shared by several MatMuls is transposed once
        for site in find_linear_sites(graph, self.options):
            dq = weight_only_dq(site)
            if dq is None:
                continue
            if site.node.op_type != "MatMul":  # Gemm's alpha/beta/transA would need their own handling
                skipped[site.name] = f"{site.node.op_type}, not MatMul"
                continue
            x = site.node.inputs[0]
            if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
                skipped[site.name] = f"activation is {x.dtype}, not float32"
                continue
            scale = dq.inputs[1]
            if scale.const_value.dtype != ir.DataType.FLOAT:
                skipped[site.name] = "weight scale is not float32"
                continue
            wq = dq.inputs[0]
            if id(wq) not in b_nk_for:
                if site.transposed:  # tied table: already [N, K]
                    b_nk_for[id(wq)] = wq
                else:
                    base = (wq.name or "weight").removesuffix("_quantized")
                    arr = np.ascontiguousarray(wq.const_value.numpy().T)
                    b_nk_for[id(wq)] = new_initializer(graph, f"{base}_nk", arr)
            self._replace(graph, site, x, b_nk_for[id(wq)], scale)
            lowered.append(site.name)
        if lowered:
            model.opset_imports.setdefault(DOMAIN, OP_VERSION)
            common_passes.RemoveUnusedNodesPass()(model)  # also drops the [K, N] originals now read by nothing
        if skipped:  # stays correct (QDQ), but slow: say so instead of leaving it silent
            name, why = next(iter(skipped.items()))
            self.context.warn(f"{self.name}: {len(skipped)} int8 weight-only layer(s) stay QDQ (dequantized every run), "
                              f"e.g. {name}: {why}")
        self.report({"lowered": len(lowered), "op": f"{DOMAIN}::{OP_TYPE}", "skipped": skipped})
        return ir.passes.PassResult(model, modified=bool(lowered))

    @staticmethod
    def _replace(graph: ir.Graph, site, x: ir.Value, b_nk: ir.Value, scale: ir.Value) -> None:
        out = site.node.outputs[0]
        bias = foldable_bias(out, site.out_features)
        last = next(iter(out.uses())).node if bias is not None else site.node
        result = last.outputs[0]
        node = ir.node(OP_TYPE, [x, b_nk, scale] + ([bias] if bias is not None else []), domain=DOMAIN,
                       version=OP_VERSION, name=f"{site.node.name}/{OP_TYPE}")
        substitute_output(graph, result, node, before=site.node, dtype=ir.DataType.FLOAT)
        if last is not site.node:
            graph.remove(last, safe=True)
        graph.remove(site.node, safe=True)
