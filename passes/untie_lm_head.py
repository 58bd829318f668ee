"""Give a tied lm_head its own weight: a private [K, N] copy of the embedding table.

A tied lm_head reads the token-embedding table through Transpose, so it has no weight of its own:
smooth_quant cannot scale its rows (the Gather would see the scaled table), and its input (the final
norm output) has to stay float or be quantized unsmoothed. After this pass the lm_head is an ordinary
MatMul(x, W_head) with W_head = table^T stored in MatMul layout, which later passes smooth and
quantize like any other linear; the Gather keeps the original table.

Cost: one more [vocab, hidden] matrix. The report gives its float size and its size at the bit width
quantize_weights will most likely store it (int8: 1 byte per element + one float scale per column),
so a recipe that uses this pass states what it pays (SmolLM2-135M: 49152 x 576 -> 28.3 MB int8).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import embedding_gathers, find_linear_sites, new_initializer, weight_array
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass


@dataclasses.dataclass
class UntieLmHeadOptions(LayerSelection):  # include/exclude: the tied linear's layer name (default: every tied one)
    required: bool = True  # no tied linear found -> error (False: a no-op, for untied models)
    # Skip (and report) a head whose int8 copy would exceed this many MB: on a large-vocabulary
    # model (Llama-3.2-3B: 128256 x 3072 -> 376 MB) the copy costs more than smoothing its input gains.
    # 0: no limit.
    max_int8_mb: float = 64.0


class UntieLmHeadPass(EqcPass):
    name = "untie_lm_head"
    Options = UntieLmHeadOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables = {id(g.inputs[0]) for g in embedding_gathers(graph)}
        untied: dict[str, dict[str, object]] = {}
        skipped: dict[str, str] = {}
        for site in find_linear_sites(graph, self.options):
            b = site.node.inputs[1]
            transpose = b.producer()
            if (site.quantized or not site.transposed or transpose is None or transpose.op_type != "Transpose"
                    or id(site.weight) not in tables):
                continue
            n, k = (int(d) for d in site.weight.shape)
            int8_mb = round((n * k + n * 4) / 2**20, 2)
            if self.options.max_int8_mb and int8_mb > self.options.max_int8_mb:
                skipped[site.name] = f"int8 copy would be {int8_mb} MB > max_int8_mb {self.options.max_int8_mb}"
                continue
            table = weight_array(site.weight)
            head = new_initializer(graph, f"{site.name}.weight_t", np.ascontiguousarray(table.T))
            site.node.replace_input_with(1, head)
            if not b.uses() and not b.is_graph_output():
                graph.remove(transpose, safe=True)
            untied[site.name] = {"table": site.weight.name, "shape_kn": [k, n],
                                 "float_mb": round(table.size * 4 / 2**20, 2), "int8_mb": int8_mb}
        if not untied and self.options.required:
            raise EqcError("untie_lm_head found no linear layer reading an embedding table through Transpose "
                           "(set required=false for models without a tied lm_head)")
        self.report({"untied": untied, "skipped": skipped, "note": "each untied lm_head stores its own copy of the table"})
        return ir.passes.PassResult(model, modified=bool(untied))


def tied_names(graph: ir.Graph) -> list[str]:
    """Layer names of linears reading an embedding table (for tests and reports)."""
    tables = {id(g.inputs[0]) for g in embedding_gathers(graph)}
    return [s.name for s in find_linear_sites(graph) if id(s.weight) in tables and s.transposed]
