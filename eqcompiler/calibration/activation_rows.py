"""Token rows of a model's activations, read through ONNX Runtime: the model run SmoothQuant's alpha search
scores candidate scales on (calibration/smoothing_search.py).

The rows come from the first windows of the statistics' own calibration text (or `text`), tokenized with the
artifact's tokenizer, so a search repeats exactly from the same statistics.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from eqcompiler.errors import EqcError


def sample_activation_rows(source: pathlib.Path, names: list[str], stats_meta: dict[str, Any], count: int,
                           rows: int, text: str | None = None) -> dict[str, np.ndarray]:
    """Rows [R, K] (R <= `rows`, float32) of each activation in `names` from `count` windows of the text."""
    from eqcompiler.artifact import folder as art_mod
    from eqcompiler.calibration.calibrate import _encoder_feed, instrumented_session
    from eqcompiler.calibration.stats import recorded_text, recorded_tokenizer
    from eqcompiler.data import calibration_ids, load_tokenizer, read_text, windows
    from eqcompiler.runtime.memory import release_freed_memory
    from eqcompiler.runtime.session import causal_feed

    art = art_mod.resolve_artifact(source)
    if not text and not (stats_meta.get("data") or {}).get("path"):
        raise EqcError("the SmoothQuant alpha search needs calibration text: statistics from `eqc calibrate` "
                       "record theirs, or set the smooth_quant option 'data'")
    if (stats_meta.get("data") or {}).get("format") == "npz" and not text:
        raise EqcError("the SmoothQuant alpha search runs text windows; statistics from --data .npz have none: use "
                       "recipe w8a8 (or w8), or give smooth_quant a fixed alpha")
    seq_len = int((stats_meta.get("data") or {}).get("seq_len") or 512)
    content = read_text(text)[0] if text else recorded_text(stats_meta)[0]
    causal = art.task in ("causal-lm", "causal-lm-nocache")
    tokenizer = load_tokenizer(art.folder, recorded_tokenizer(stats_meta))  # calibration's own
    ids, _ = calibration_ids(tokenizer, content, seq_len, count, causal)
    session = instrumented_session(art_mod.model_file(art), names)
    available = {o.name for o in session.get_outputs()}
    missing = [n for n in names if n not in available]
    if missing:
        raise EqcError(f"smooth_quant: source model has no tensor '{missing[0]}'; run smooth_quant first in the recipe")
    # Each tensor's kept rows are drawn up front (a uniform draw over all windows' rows, as if they were
    # concatenated; one draw per tensor, in order, from one generator), so each window's outputs are cut to their
    # kept rows as they arrive: memory holds the kept rows and one window's outputs, not every window's
    # activations (SmolLM2, 121 tensors x 4 windows: 0.8 GB less at the peak).
    chosen = list(windows(ids, seq_len, count))
    total = sum(int(w.size) for w in chosen)
    rng = np.random.default_rng(0)
    keep = {n: np.arange(total) if total <= rows else np.sort(rng.choice(total, rows, replace=False)) for n in names}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    start = 0
    for window in chosen:
        feed = causal_feed(session, window) if causal else _encoder_feed(window)
        for name, value in zip(names, session.run(names, feed)):
            mine = keep[name][(keep[name] >= start) & (keep[name] < start + window.size)] - start
            parts[name].append(np.ascontiguousarray(value.reshape(-1, value.shape[-1])[mine], dtype=np.float32))
        start += int(window.size)
    del session
    rows_kept = {name: np.concatenate(parts.pop(name)) for name in names}
    release_freed_memory()  # the session's memory, before the search stacks its own on top
    return rows_kept
