"""Mixed precision: give each linear layer its own weight precision, from a plan or a budget.

A plan maps every linear layer (by name) to one of int4-g128, int4-g64, int8, w8a8 or float
(eqcompiler.compile.bitwidth.PRECISIONS). Without a plan, one is solved from the calibration Gram
matrices under a budget (see eqcompiler.compile.bitwidth for the proxy and the solvers). Quantization
is the same round-to-nearest as quantize_weights, and token-embedding tables (and a tied lm_head)
are int8 per row as quantize_weights stores them; w8a8 layers also get quantize_activations'
static int8 per-tensor QDQ on their input (minmax range from the statistics). The plan used is
reported in full so that `eqc compile --save-plan` can write it and `--plan` re-apply it byte for byte.

Option sensitivity "kl" (or `eqc compile --sensitivity kl`) ranks layers by MEASURED logits KL
instead of the Gram proxy (eqcompiler.calibration.sensitivity: one ORT forward per layer and quantized
precision, kl_windows x kl_tokens held-out calibration tokens; no 'gram' observer needed). The
table is cached by model fingerprint + calibration text + options (sensitivity_cache), so changing
only the budget does not re-measure; the plan records how it was obtained ("sensitivity").

Both need the model run, which is not this pass's: eqcompiler.calibration.precision_search measures the
table and searches the plan before the passes run (`eqc compile` does it; CompileContext.precision_search
carries the result here), and `--save-plan` / `--plan` repeat a compile without it.

A perplexity budget (ppl+X%) scores candidate plans for real: each probe clones the graph, applies
the plan, saves it to a temporary folder and runs ONNX Runtime over `ppl_windows` windows of the
statistics' calibration text that FOLLOW the windows calibration used (held out from the Gram
statistics; never the test split). Cost per probe: one RTN quantization of the planned layers
(cached across probes), one save, one session and ppl_windows forward passes; at most
4 + ppl_steps probes plus the float reference (eqcompiler.compile.bitwidth.search_ppl). On SmolLM2-135M
(shared 2-core CPU, 4 windows of 512) about 25 s per probe: ~5-6 minutes for a whole compile.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from eqcompiler.compile import bitwidth as bw
from eqcompiler.calibration import sensitivity as sens
from eqcompiler.calibration.precision_search import NEEDS_STATS, needs_model_run
from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import LinearSite, embedding_gathers, find_linear_sites, node_order
from eqcompiler.compile.pass_base import CompileContext, EqcPass, ObserverNeeds
from eqcompiler.passes.gptq import gram_of, site_matrix, weight_only_sites
from eqcompiler.passes.quantize_activations import QuantizeActivationsPass, activation_range
from eqcompiler.passes.quantize_weights import (QuantizeWeightsPass, _checked_weight, _describe, _group_gathers,
                                                _release, _stored_bytes)
from eqcompiler.compile.qdq import QuantizedWeight, activation_scale, emit_dequantize, quantize_site_weight


@dataclasses.dataclass
class ApplyPrecisionPlanOptions:
    budget: str | None = None  # "6bits", "120MB", "ppl+2%"; compile option "budget" fills it
    plan: str | dict | None = None  # plan file (or the plan itself); compile option "plan" fills it
    solver: str = "dp"  # dp | greedy | grid
    choices: str = ",".join(bw.DEFAULT_CHOICES)  # candidate precisions a budget chooses from
    ppl_windows: int = bw.PPL_WINDOWS  # ppl+X%: held-out calibration windows per probe (compile option too)
    ppl_steps: int = bw.PPL_STEPS  # ppl+X%: bisection steps
    sensitivity: str = "proxy"  # proxy (Gram, needs the 'gram' observer) | kl (measured logits KL; compile option too)
    kl_windows: int = sens.KL_WINDOWS  # sensitivity kl: held-out calibration windows per probe
    kl_tokens: int = sens.KL_TOKENS  # sensitivity kl: tokens scored per window
    sensitivity_cache: str | None = None  # kl table cache file/folder; None: $XDG_CACHE_HOME/eqc/sensitivity; "none": off
    probe: bool = False  # internal: applying a candidate plan for a perplexity probe (no sensitivity table)

    # `eqc compile --plan` replaces the recipe's default budget and `--budget` its plan (pass overrides).
    REPLACES: ClassVar[dict[str, tuple[str, ...]]] = {"plan": ("budget",), "budget": ("plan",)}

    def validate(self) -> None:
        if self.solver not in bw.SOLVERS:
            raise EqcError(f"apply_precision_plan: solver must be one of {', '.join(bw.SOLVERS)}, got {self.solver!r}")
        if self.budget is not None:
            bw.parse_budget(self.budget)
        bw.parse_choices(self.choices)
        if int(self.ppl_windows) < 1 or int(self.ppl_steps) < 0:
            raise EqcError("apply_precision_plan: ppl_windows must be >= 1 and ppl_steps >= 0")
        if self.sensitivity not in bw.SENSITIVITIES:
            raise EqcError(f"apply_precision_plan: sensitivity must be one of {', '.join(bw.SENSITIVITIES)}, "
                           f"got {self.sensitivity!r}")
        if int(self.kl_windows) < 1 or int(self.kl_tokens) < 2:
            raise EqcError("apply_precision_plan: kl_windows must be >= 1 and kl_tokens >= 2")
        sens.check_cache_option(self.sensitivity_cache)  # confined to the user cache folder, refused up front


class ApplyPrecisionPlanPass(EqcPass):
    name = "apply_precision_plan"
    Options = ApplyPrecisionPlanOptions

    @classmethod
    def observers_needed(cls, options: ApplyPrecisionPlanOptions) -> ObserverNeeds:
        # The proxy sensitivity reads Gram matrices; a given --plan or --sensitivity kl does without them.
        return ObserverNeeds(helpful=frozenset({"gram"} if options.sensitivity == "proxy" else set()))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sensitivity: dict[str, bw.Layer] = {}  # proxy (or KL) table, when one was computed
        self.method = "proxy"  # what self.sensitivity's errors are
        self.quantized: dict[tuple[str, str], QuantizedWeight] = {}  # (weight, precision): shared by ppl probes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = self.layer_groups(model)
        plan = self._plan(model, by_name)
        missing = sorted(set(by_name) - set(plan["layers"]))
        extra = sorted(set(plan["layers"]) - set(by_name))
        if missing or extra:
            what = f"has no entry for layer '{missing[0]}'" if missing else f"names layer '{extra[0]}' the model lacks"
            raise EqcError(f"apply_precision_plan: the plan {what} ({len(missing)} missing, {len(extra)} unknown); "
                           "was it made for another model?")
        layers: dict[str, str] = {}
        params = linear_bytes = 0
        table = []
        act_sites = [s for name, g in by_name.items() if plan["layers"][name] in bw.ACTIVATION_QUANTIZED for s in g]
        for name, group in by_name.items():
            precision = plan["layers"][name]
            size = int(np.prod(group[0].weight.shape))
            nbytes = self._apply(graph, group, precision, layers)
            params, linear_bytes = params + size, linear_bytes + nbytes
            known = self.sensitivity.get(name)
            proxy = known.error[known.choices.index(precision)] if known and precision in known.choices else None
            table.append({"layer": name, "precision": precision, "bits": 8 * nbytes / size, "proxy": proxy})
        ranges = self._quantize_inputs(graph, act_sites)
        self._quantize_embeddings(graph, layers)
        self.report({"plan": plan, "layers": layers, "linear_bytes": int(linear_bytes), "table": table,
                     "average_bits": 8 * linear_bytes / max(params, 1), "activation_ranges": ranges,
                     "sensitivity": self.method})
        return ir.passes.PassResult(model, modified=True)

    def layer_groups(self, model: ir.Model) -> dict[str, list[LinearSite]]:
        """The planned linear layers by name (the sites reading one weight form a group)."""
        groups = weight_only_sites(model.graph)
        by_name = {g[0].name: g for g in groups}
        if len(by_name) != len(groups):
            raise EqcError("apply_precision_plan: two linear layers share a name; cannot key a plan by name")
        return by_name

    def _plan(self, model: ir.Model, by_name: dict[str, list[LinearSite]]) -> dict[str, Any]:
        plan, budget = self.options.plan, self.options.budget
        if plan is not None and budget is not None:
            raise EqcError("apply_precision_plan: give a budget or a plan, not both")
        if plan is not None:
            plan = bw.validate_plan(plan, "(inline)") if isinstance(plan, dict) else bw.load_plan(plan)
            if not self.options.probe:  # a perplexity probe needs no table
                self._table_if_possible(by_name, plan)
            return plan
        if budget is None:
            raise EqcError("recipe 'mixed' needs --budget (e.g. 6bits, 120MB) or --plan FILE")
        if needs_model_run(self.options):  # solved before the passes ran (calibration/precision_search.py)
            searched = self.context.precision_search
            if searched is None:
                raise EqcError("apply_precision_plan: a ppl+X% budget or sensitivity kl needs the model run "
                               "`eqc compile` makes before its passes (eqcompiler.calibration.precision_search)")
            self.method = searched.method
            self.sensitivity = {layer.name: layer for layer in searched.table}
            return searched.plan
        if self.context.stats is None:
            raise EqcError(NEEDS_STATS)
        parsed = bw.parse_budget(budget)
        table = self.proxy_table(by_name, bw.parse_choices(self.options.choices))
        self.sensitivity = {layer.name: layer for layer in table}
        plan = self.solve(model, by_name, table, parsed)
        plan["sensitivity"] = {"method": "proxy"}
        return plan

    def solver(self) -> str:
        """The compile's --solver (context option) overrides the recipe's."""
        solver = str(self.options.solver)
        if solver not in bw.SOLVERS:
            raise EqcError(f"unknown solver '{solver}' (known: {', '.join(bw.SOLVERS)})")
        return solver

    def proxy_table(self, by_name: dict[str, list[LinearSite]], choices: tuple[str, ...]) -> list[bw.Layer]:
        """The Gram proxy sensitivity of every layer (compile.bitwidth)."""
        return [self._sensitivity(name, group, choices) for name, group in by_name.items()]

    def layer_costs(self, group: list[LinearSite], choices: tuple[str, ...]) -> tuple[int, list[int], float]:
        """A layer's parameter count, stored bytes per choice and weight entropy."""
        k, n = (int(d) for d in site_matrix(group[0]).shape)
        return k * n, [bw.stored_bytes(c, k, n) for c in choices], sens.weight_entropy(_checked_weight(group[0].weight))

    def solve(self, model: ir.Model, by_name: dict[str, list[LinearSite]], table: list[bw.Layer],
              budget: bw.Budget) -> dict[str, Any]:
        """The plan a bits or bytes budget gives from a sensitivity table (a bytes budget counts what no plan
        chooses: embedding tables and other initializers)."""
        fixed = _fixed_bytes(model.graph, by_name) if budget.kind == "bytes" else 0
        return bw.make_plan(table, budget, self.solver(), fixed)

    def apply_probe(self, model: ir.Model, plan: dict[str, Any]) -> None:
        """Apply a candidate plan to `model` for a perplexity probe, sharing this pass's quantized weights."""
        inner = ApplyPrecisionPlanPass(CompileContext(stats=self.context.stats), plan=plan, probe=True)
        inner.quantized = self.quantized
        inner.call(model)

    def _table_if_possible(self, by_name: dict[str, list[LinearSite]], plan: dict[str, Any]) -> None:
        """With a plan and Gram statistics, still compute the proxy of the chosen precisions for the table."""
        stats = self.context.stats
        if stats is None or not by_name or any(g[0].activation.name not in stats.tensors
                                               or "gram" not in stats.tensors[g[0].activation.name].extra
                                               for g in by_name.values()):
            return
        choices = bw.parse_choices(sorted(set(plan["layers"].values())))
        self.sensitivity = {name: self._sensitivity(name, group, choices) for name, group in by_name.items()
                            if name in plan["layers"]}

    def _sensitivity(self, name: str, group: list[LinearSite], choices: tuple[str, ...] = bw.DEFAULT_CHOICES) -> bw.Layer:
        w = site_matrix(group[0])
        gram = None
        noise = 0.0
        needs_act = any(c in bw.ACTIVATION_QUANTIZED for c in choices)
        for site in group:  # a weight read by several MatMuls: their inputs' Gram matrices add up
            g, rows = gram_of(self.context.stats, site.activation.name, "recipe 'mixed' (apply_precision_plan)")
            if g.shape != (w.shape[0], w.shape[0]):
                raise EqcError(f"apply_precision_plan: gram for '{site.activation.name}' is {g.shape}, "
                               f"layer '{name}' has K={w.shape[0]}")
            gram = g if gram is None else gram + g
            if needs_act:  # int8 rounding noise of this input: T tokens x variance s^2/12 (see bitwidth)
                scale, _ = activation_scale(*activation_range(self.context.stats, site.activation.name, "minmax"))
                noise += rows * scale ** 2 / 12.0
        layer = bw.layer_sensitivity(name, w, gram, choices, noise if needs_act else None)
        layer.entropy = sens.weight_entropy(w)
        return layer

    def _apply(self, graph: ir.Graph, group: list[LinearSite], precision: str, layers: dict[str, str]) -> int:
        """Quantize one weight as planned; returns its stored bytes."""
        weight = group[0].weight
        spec = bw.PRECISIONS[precision]
        if spec is None:
            for site in group:
                layers[site.name] = "float"
            return int(weight.const_value.nbytes)
        bits, block, symmetric = spec
        key = (str(weight.name), f"{bits}/{block}/{symmetric}")  # w8a8 shares int8's weights
        qw = self.quantized.get(key)
        if qw is None:
            qw = quantize_site_weight(_checked_weight(weight), group[0].transposed, bits, symmetric, block)
            self.quantized[key] = qw
        _release(weight)
        order = node_order(graph)
        first = min(group, key=lambda s: order[id(s.node)])
        dq = emit_dequantize(graph, qw, weight.name, before=first.node)
        for site in group:
            site.node.replace_input_with(1, dq)
            layers[site.name] = _describe(qw) + (" + int8 input per-tensor" if precision in bw.ACTIVATION_QUANTIZED else "")
        graph.initializers.pop(weight.name)
        return _stored_bytes(qw)

    def _quantize_inputs(self, graph: ir.Graph, sites: list[LinearSite]) -> dict[str, list[float]]:
        """w8a8 layers: quantize_activations' static int8 QDQ on the input, only for those consumers."""
        if not sites:
            return {}
        if self.context.stats is None:
            raise EqcError(f"the plan puts layer '{sites[0].name}' at w8a8, which quantizes its input: "
                           "pass --calib STATS (any statistics of this model)")
        helper = QuantizeActivationsPass(self.context)  # int8 symmetric, zero point 0
        order = node_order(graph)
        by_input: dict[int, list[LinearSite]] = {}
        for site in sites:
            by_input.setdefault(id(site.activation), []).append(site)
        ranges: dict[str, list[float]] = {}
        for group in by_input.values():
            x = group[0].activation
            if x.name is None:
                raise EqcError("a w8a8 layer's input has no name; cannot look up its statistics")
            lo, hi = activation_range(self.context.stats, x.name, "minmax")
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise EqcError(f"statistics for '{x.name}' are not finite (min={lo}, max={hi})")
            scale, zp = activation_scale(lo, hi, 8, True)
            dq = helper._insert_qdq(graph, x, scale, zp, before=min((s.node for s in group), key=lambda n: order[id(n)]))
            for site in group:
                site.node.replace_input_with(0, dq)
            ranges[x.name] = [float(lo), float(hi), float(scale)]
        return ranges

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
