"""Every model run a recipe's passes need, made before the passes (passes only rewrite the graph):
SmoothQuant's alpha search (smoothing_search.py, stored with the statistics) and a mixed-precision budget's
sensitivity measurement and perplexity search (precision_search.py, the plan handed to apply_precision_plan).

Each search sees the graph its step will see: the recipe's earlier steps applied to a scratch copy.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.calibration.activation_rows import TakenRows
from eqcompiler.calibration.stats import CalibrationStats


def run_model_searches(model: ir.Model, recipe: dict[str, Any], passes: list[Any], context: Any) -> list[str]:
    """Run the searches `recipe`'s steps need on `model` (not changed); `passes` are the compile's pass instances
    in recipe order. Returns what was searched."""
    from eqcompiler.calibration.precision_search import needs_model_run, search_precision

    steps = list(recipe["passes"])
    done: list[str] = run_smoothing_searches(model, recipe, context) if context.stats is not None else []
    for i, step in enumerate(steps):
        if step["pass"] == "apply_precision_plan" and needs_model_run(passes[i].options):
            context.precision_search = search_precision(graph_before_step(model, steps, i, context), passes[i])
            done.append("apply_precision_plan")
    return done


def run_smoothing_searches(model: ir.Model, recipe: dict[str, Any], context: Any,
                           taken: TakenRows | None = None) -> list[str]:
    """The alpha search of every smooth_quant step of `recipe` that needs one, stored in context.stats (what
    `eqc calibrate --for` saves); returns the keys searched. `taken`: the statistics pass's rows, used by
    a search they fit."""
    from eqcompiler.calibration.smoothing_search import search_smoothing_step

    steps = list(recipe["passes"])
    return [key for i, step in enumerate(steps) if step["pass"] == "smooth_quant"
            for key in search_smoothing_step(model, steps, i, context, taken)]


def graph_before_step(model: ir.Model, steps: list[dict[str, Any]], index: int, context: Any) -> ir.Model:
    """The graph step `index` sees: `model` itself for the first step, else a copy with the earlier steps applied."""
    from eqcompiler.compile.pass_base import make_pass

    if not index:
        return model
    copy = model.clone()
    for earlier in steps[:index]:
        make_pass(earlier["pass"], scratch_context(context), dict(earlier.get("options") or {}))(copy)
    return copy


def scratch_context(context: Any, rows: dict[str, np.ndarray] | None = None) -> Any:
    """A copy of the compile context whose statistics and report a scratch run may change; `rows` become the
    'sample' observer's rows of those tensors."""
    stats = context.stats
    if stats is not None:
        tensors = {name: dataclasses.replace(t, extra=dict(t.extra)) for name, t in stats.tensors.items()}
        for name, x in (rows or {}).items():
            tensors[name].extra["sample_rows"] = x
        stats = CalibrationStats(meta=dict(stats.meta), tensors=tensors)
    return dataclasses.replace(context, stats=stats, manifest=dict(context.manifest), report={}, warnings=[],
                               per_token_inputs=[])
