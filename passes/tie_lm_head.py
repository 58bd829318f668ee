"""Tie an lm_head that stores its own copy of the token-embedding table back to the table (exact in float).

Optimum's export keeps an untied copy of a tied lm_head ([K, N] initializer equal to table^T) where eqc's export
(and torch.onnx dynamo's) read the embedding table through one Transpose. The copy is not only 28 MB of
duplicate weight on SmolLM2: ONNX Runtime 1.32 fuses an int8 per-channel `DequantizeLinear -> MatMul` into
8-bit MatMulNBits at accuracy level 4 (int8 activation blocks of 32) but leaves `Transpose(DequantizeLinear)
-> MatMul` in float, so a recipe that keeps the lm_head input float (w8a8-dynamic, w8a8-smooth) quietly got
int8 lm_head inputs on Optimum's graph and not on eqc export's (issue 20: +0.70% against +0.24% ppl on SmolLM2).
After this pass the foreign graph's lm_head is exactly eqc export's: MatMul(x, Transpose(table)), which
quantize_weights stores once for the Gather and the lm_head.

The lm_head is found by structure (compile/lm_head.py); it is tied only when its weight equals the transposed
table bit for bit, so an untied model (different weights) is left alone and the pass is a no-op there.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.graph import LinearSite, embedding_gathers, find_linear_sites
from eqcompiler.compile.lm_head import is_lm_head
from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.errors import EqcError


@dataclasses.dataclass
class TieLmHeadOptions:
    required: bool = False  # no untied copy found -> error (default: a no-op, as on eqc's own graphs)


def _matching_table(site: LinearSite, tables: list[ir.Value]) -> ir.Value | None:
    """The embedding table this lm_head's weight copies exactly (in the table's [N, K] layout), else None."""
    weight = site.weight
    n, k = site.out_features, site.in_features
    candidates = [t for t in tables if t is not weight and t.dtype == weight.dtype and list(t.shape) == [n, k]]
    if not candidates:
        return None
    stored = weight.const_value.numpy()
    as_table = stored if site.transposed else stored.T  # a Gemm with transB=1 already stores [N, K]
    for table in candidates:
        if np.array_equal(table.const_value.numpy(), as_table):
            return table
    return None


class TieLmHeadPass(EqcPass):
    name = "tie_lm_head"
    Options = TieLmHeadOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables = [g.inputs[0] for g in embedding_gathers(graph)]
        tied: dict[str, dict[str, object]] = {}
        for site in find_linear_sites(graph):
            if site.quantized or not is_lm_head(site.node) or site.node.inputs[1] is not site.weight:
                continue  # already quantized, not the lm_head, or already reading a table through Transpose
            table = _matching_table(site, tables)
            if table is None:
                continue
            old = site.weight
            if site.transposed:  # Gemm(transB=1) reads [N, K]: the table itself
                site.node.replace_input_with(1, table)
            else:
                transpose = ir.node("Transpose", [table], {"perm": [1, 0]}, name=f"{site.node.name}/TiedTranspose")
                out = transpose.outputs[0]
                out.name, out.dtype = f"{table.name}_transposed", table.dtype
                out.shape = ir.Shape([site.in_features, site.out_features])
                graph.insert_before(site.node, transpose)
                site.node.replace_input_with(1, out)
            if not old.uses() and not old.is_graph_output() and old.name in graph.initializers:
                graph.initializers.pop(old.name)
            tied[site.name] = {"table": table.name, "removed": old.name,
                               "float_mb_saved": round(old.const_value.nbytes / 2**20, 2)}
        if not tied and self.options.required:
            raise EqcError("tie_lm_head found no lm_head storing a copy of an embedding table "
                           "(set required=false for models whose lm_head is tied already or untied)")
        self.report({"tied": tied})
        return ir.passes.PassResult(model, modified=bool(tied))
