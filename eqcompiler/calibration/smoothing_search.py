"""SmoothQuant's alpha search as calibration data.

smooth_quant's search "ort" scores each site's candidate scales on token rows of the model's own activations,
which takes a model run. That run belongs to calibration, not to the pass: `eqc calibrate --for RECIPE` runs
the search once and stores each site's chosen scale with the statistics, so every compile from them runs no
model and gives the same bytes; `eqc compile` runs it (in memory) only when its statistics lack it.

Stored per activation tensor, under a key of the pass's options (other options choose other scales):
  extra["smooth_<key>_scale"]   float32 [K]  the scale s folded into the producer (1/s) and the weights (s)
  extra["smooth_<key>_choice"]  float64 [4]  alpha, score, unsmoothed score (NaN: none), 1 if scored per token
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.calibration.activation_rows import RowRequest, TakenRows
from eqcompiler.calibration.stats import TensorStats


@dataclasses.dataclass
class SmoothChoice:
    """One site's search result: what smooth_quant folds and what it reports."""

    scale: np.ndarray
    alpha: float | None
    score: float | None
    base: float | None
    granularity: str  # the activation quantizer the scale was scored for: "tensor" | "token"


def search_key(options: Any) -> str:
    """The key results are stored under: a hash of every smooth_quant option (a dataclass).

    exclude_lm_head only removes a site (each site's search is its own), and is left out so that statistics
    searched before the option existed stay valid."""
    fields = dataclasses.asdict(options)
    fields.pop("exclude_lm_head", None)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stored_choice(t: TensorStats, key: str) -> SmoothChoice | None:
    scale, choice = t.extra.get(f"smooth_{key}_scale"), t.extra.get(f"smooth_{key}_choice")
    if scale is None or choice is None or choice.shape != (4,):
        return None
    alpha, score, base, token = (None if np.isnan(v) else float(v) for v in choice)
    return SmoothChoice(np.asarray(scale, dtype=np.float32), alpha, score, base, "token" if token else "tensor")


def store_choice(t: TensorStats, key: str, choice: SmoothChoice) -> None:
    nan = float("nan")
    t.extra[f"smooth_{key}_scale"] = np.asarray(choice.scale, dtype=np.float32)
    t.extra[f"smooth_{key}_choice"] = np.array(
        [nan if v is None else v for v in (choice.alpha, choice.score, choice.base)] + [choice.granularity == "token"],
        dtype=np.float64)


def rows_request(recipe_names: list[str], observers: tuple[str, ...] | list[str]) -> RowRequest | None:
    """The rows the first smooth_quant step of these recipes that will search on the model run samples (None: no
    such step), so that `eqc calibrate --for` keeps them during its statistics pass; `observers`: those the
    statistics collect (search "auto" scores on gram or sample statistics when they are there)."""
    from eqcompiler.compile.pass_base import available_passes
    from eqcompiler.compile.recipes import load_recipe

    options_class = available_passes()["smooth_quant"].Options
    for name in recipe_names:
        for step in load_recipe(name)["passes"]:
            if step["pass"] != "smooth_quant":
                continue
            try:
                opts = options_class(**dict(step.get("options") or {}))
            except TypeError:
                return None  # refused with its message when the search builds the pass
            if _runs_model(opts, set(observers)) and opts.data is None:  # other text: its own model run
                return RowRequest(opts.search_windows, opts.search_rows)
    return None


def _runs_model(opts: Any, observers: set[str]) -> bool:
    """Whether the step's search will score on the model run (smooth_quant's _method, from the observers)."""
    if opts.search != "auto":
        return opts.search == "ort"
    if "gram" in observers and opts.activation_granularity == "tensor" and opts.score_norm == "total":
        return False
    return "sample" not in observers


def search_smoothing_step(model: ir.Model, steps: list[dict[str, Any]], index: int, context: Any,
                          taken: TakenRows | None = None) -> list[str]:
    """Store in `context.stats` (in memory) the search of the smooth_quant step `steps[index]` when it needs a
    model run and the statistics lack its result; returns the key searched ([] when none was needed).

    The search is smooth_quant's own scoring on the graph it would see, on rows sampled through ONNX Runtime,
    so the stored scales are those a search inside the compile would pick. `taken`: rows the statistics pass
    kept (run_calibration), used (and handed over) when they are exactly the rows the sampling would give.
    """
    from eqcompiler.calibration.activation_rows import sample_activation_rows
    from eqcompiler.calibration.alpha_search import NarrowedSmoothQuant
    from eqcompiler.calibration.model_runs import graph_before_step, scratch_context
    from eqcompiler.compile.pass_base import make_pass

    options = dict(steps[index].get("options") or {})
    graph_model = graph_before_step(model, steps, index, context)
    probe = make_pass("smooth_quant", scratch_context(context), options)
    names = probe.model_rows_needed(graph_model)
    if not names:
        return []
    opts = probe.options
    source = pathlib.Path(context.source_folder)
    _refuse_big_model(source)
    rows = _taken_rows(taken, source, names, context.stats.meta, opts)
    if rows is None:
        rows = sample_activation_rows(source, names, context.stats.meta, opts.search_windows, opts.search_rows,
                                      opts.data)
    # smooth_quant's own scoring on those rows, of a coarse-to-fine subset of alpha_grid, site by site, each
    # site's rows dropped once scored (alpha_search.py); the graph is only read
    searcher = NarrowedSmoothQuant(scratch_context(context), **{**options, "search": "sample"})
    choices = searcher.search(graph_model, rows)
    key = search_key(opts)
    for name, choice in choices.items():
        store_choice(context.stats.get(name), key, choice)
    return [key]


def _taken_rows(taken: TakenRows | None, source: pathlib.Path, names: list[str], stats_meta: dict[str, Any],
                opts: Any) -> dict[str, np.ndarray] | None:
    """The statistics pass's rows of `names` when they are the ones sample_activation_rows would sample here."""
    from eqcompiler.artifact import folder as art_mod

    if taken is None or opts.data is not None:  # other text: its own model run
        return None
    model_path = str(art_mod.model_file(art_mod.resolve_artifact(source)))
    return taken.take(model_path, stats_meta, opts.search_windows, opts.search_rows, names)


def _refuse_big_model(source: pathlib.Path) -> None:
    """The search runs the whole graph in one ONNX Runtime session: refuse a model whose weights would not fit
    beside it, naming the observer that scores without a session."""
    from eqcompiler.artifact import folder as art_mod
    from eqcompiler.calibration.layer_stream import auto_stream
    from eqcompiler.errors import EqcError

    big, why = auto_stream(art_mod.model_file(art_mod.resolve_artifact(source)))
    if big:
        raise EqcError(f"smooth_quant's alpha search needs the 'sample' (or 'gram') calibration observer on this "
                       f"model ({why.split(':')[0]}: too big for a whole-model ORT session); rerun `eqc calibrate "
                       "--observers minmax,absmax_channel,sample`, or set search='none'")
