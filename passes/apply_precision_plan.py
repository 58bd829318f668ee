"""Mixed precision: give each linear layer its own weight precision, from a plan or a budget.

A plan maps every linear layer (by name) to one of int4-g128, int4-g64, int8 or float
(eqcompiler.bitwidth.PRECISIONS). Without a plan, one is solved from the calibration Gram
matrices under a budget (see eqcompiler.bitwidth for the proxy and the solvers). Quantization
is the same round-to-nearest as quantize_weights, and token-embedding tables (and a tied lm_head)
are int8 per row as quantize_weights stores them. The plan used is reported in full so that
`eqc compile --save-plan` can write it and `--plan` re-apply it byte for byte.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler import bitwidth as bw
from eqcompiler.errors import EqcError
from eqcompiler.graph import LinearSite, embedding_gathers, find_linear_sites, node_order
from eqcompiler.pass_base import EqcPass
from eqcompiler.passes.gptq import gram_of, site_matrix, weight_only_sites
from eqcompiler.passes.quantize_weights import (QuantizeWeightsPass, _checked_weight, _describe, _group_gathers,
                                                _release, _stored_bytes, quantize_site_weight)
from eqcompiler.qdq import emit_dequantize


@dataclasses.dataclass
class ApplyPrecisionPlanOptions:
    budget: str | None = None  # "6bits", "120MB"; compile option "budget" fills it
    plan: str | None = None  # plan file; compile option "plan" (path or dict) fills it
    solver: str = "dp"  # dp | greedy | grid

    def validate(self) -> None:
        if self.solver not in bw.SOLVERS:
            raise EqcError(f"apply_precision_plan: solver must be one of {', '.join(bw.SOLVERS)}, got {self.solver!r}")
        if self.budget is not None:
            bw.parse_budget(self.budget)


class ApplyPrecisionPlanPass(EqcPass):
    name = "apply_precision_plan"
    Options = ApplyPrecisionPlanOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups = weight_only_sites(graph, None, None)
        by_name = {g[0].name: g for g in groups}
        if len(by_name) != len(groups):
            raise EqcError("apply_precision_plan: two linear layers share a name; cannot key a plan by name")
        plan = self._plan(graph, by_name)
        missing = sorted(set(by_name) - set(plan["layers"]))
        extra = sorted(set(plan["layers"]) - set(by_name))
        if missing or extra:
            what = f"has no entry for layer '{missing[0]}'" if missing else f"names layer '{extra[0]}' the model lacks"
            raise EqcError(f"apply_precision_plan: the plan {what} ({len(missing)} missing, {len(extra)} unknown); "
                           "was it made for another model?")
        layers: dict[str, str] = {}
        params = linear_bytes = 0
        for name, group in by_name.items():
            precision = plan["layers"][name]
            params += int(np.prod(group[0].weight.shape))
            linear_bytes += self._apply(graph, group, precision, layers)
        self._quantize_embeddings(graph, layers)
        self.report({"plan": plan, "layers": layers, "linear_bytes": int(linear_bytes),
                     "average_bits": 8 * linear_bytes / max(params, 1)})
        return ir.passes.PassResult(model, modified=True)

    def _plan(self, graph: ir.Graph, by_name: dict[str, list[LinearSite]]) -> dict[str, Any]:
        # The compile's --budget/--plan (context options) override the recipe's own default.
        ctx_plan, ctx_budget = self.context.options.get("plan"), self.context.options.get("budget")
        if ctx_plan is not None and ctx_budget is not None:
            raise EqcError("apply_precision_plan: give a budget or a plan, not both")
        plan = ctx_plan if ctx_plan is not None else (self.options.plan if ctx_budget is None else None)
        budget = ctx_budget if ctx_budget is not None else (self.options.budget if plan is None else None)
        if plan is not None and budget is not None:
            raise EqcError("apply_precision_plan: give a budget or a plan, not both")
        if isinstance(plan, dict):
            return bw.validate_plan(plan, "(inline)")
        if plan is not None:
            return bw.load_plan(plan)
        if budget is None:
            raise EqcError("recipe 'mixed' needs --budget (e.g. 6bits, 120MB) or --plan FILE")
        if self.context.stats is None:
            raise EqcError("a --budget needs calibration statistics with the 'gram' observer: "
                           "run `eqc calibrate --observers minmax,gram` and pass --calib STATS")
        parsed = bw.parse_budget(budget)
        table = [self._sensitivity(name, group) for name, group in by_name.items()]
        fixed = _fixed_bytes(graph, by_name) if parsed.kind == "bytes" else 0
        return bw.make_plan(table, parsed, self.options.solver, fixed)

    def _sensitivity(self, name: str, group: list[LinearSite]) -> bw.Layer:
        w = site_matrix(group[0])
        gram = None
        for site in group:  # a weight read by several MatMuls: their inputs' Gram matrices add up
            g, _ = gram_of(self.context.stats, site.activation.name, "recipe 'mixed' (apply_precision_plan)")
            if g.shape != (w.shape[0], w.shape[0]):
                raise EqcError(f"apply_precision_plan: gram for '{site.activation.name}' is {g.shape}, "
                               f"layer '{name}' has K={w.shape[0]}")
            gram = g if gram is None else gram + g
        return bw.layer_sensitivity(name, w, gram)

    def _apply(self, graph: ir.Graph, group: list[LinearSite], precision: str, layers: dict[str, str]) -> int:
        """Quantize one weight as planned; returns its stored bytes."""
        weight = group[0].weight
        spec = bw.PRECISIONS[precision]
        if spec is None:
            for site in group:
                layers[site.name] = "float"
            return int(weight.const_value.nbytes)
        bits, block, symmetric = spec
        qw = quantize_site_weight(_checked_weight(weight), group[0].transposed, bits, symmetric, block)
        _release(weight)
        order = node_order(graph)
        first = min(group, key=lambda s: order[id(s.node)])
        dq = emit_dequantize(graph, qw, weight.name, before=first.node)
        for site in group:
            site.node.replace_input_with(1, dq)
            layers[site.name] = _describe(qw)
        graph.initializers.pop(weight.name)
        return _stored_bytes(qw)

    def _quantize_embeddings(self, graph: ir.Graph, layers: dict[str, str]) -> None:
        """Embedding tables (and a tied lm_head) int8 per row, exactly as quantize_weights does."""
        gathers = embedding_gathers(graph)
        if not gathers:
            return
        helper = QuantizeWeightsPass(self.context, embedding_bits=8)
        sites = [s for s in find_linear_sites(graph) if not s.quantized]
        for table, users in _group_gathers(gathers).items():
            helper._quantize_table(graph, users, [s for s in sites if id(s.weight) == table], layers)


def _fixed_bytes(graph: ir.Graph, by_name: dict[str, list[LinearSite]]) -> int:
    """Bytes of every initializer the plan does not choose: embedding tables as int8 rows + scales."""
    planned = {id(g[0].weight) for g in by_name.values()}
    tables = {id(g.inputs[0]) for g in embedding_gathers(graph)}
    total = 0
    for value in graph.initializers.values():
        if id(value) in planned or value.const_value is None:
            continue
        if id(value) in tables and len(value.shape) == 2:
            rows, cols = (int(d) for d in value.shape)
            total += rows * cols + rows * 4 + rows
        else:
            total += int(value.const_value.nbytes)
    return total
