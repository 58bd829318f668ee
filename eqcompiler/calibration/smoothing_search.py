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


def search_smoothing_step(model: ir.Model, steps: list[dict[str, Any]], index: int, context: Any) -> list[str]:
    """Store in `context.stats` (in memory) the search of the smooth_quant step `steps[index]` when it needs a
    model run and the statistics lack its result; returns the key searched ([] when none was needed).

    The search is smooth_quant's own scoring on the graph it would see, on rows sampled through ONNX Runtime,
    so the stored scales are those a search inside the compile would pick.
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
    _refuse_big_model(pathlib.Path(context.source_folder))
    rows = sample_activation_rows(pathlib.Path(context.source_folder), names, context.stats.meta, opts.search_windows,
                                  opts.search_rows, opts.data)
    # smooth_quant's own scoring on those rows, of a coarse-to-fine subset of alpha_grid, site by site, each
    # site's rows dropped once scored (alpha_search.py); the graph is only read
    searcher = NarrowedSmoothQuant(scratch_context(context), **{**options, "search": "sample"})
    choices = searcher.search(graph_model, rows)
    key = search_key(opts)
    for name, choice in choices.items():
        store_choice(context.stats.get(name), key, choice)
    return [key]


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
