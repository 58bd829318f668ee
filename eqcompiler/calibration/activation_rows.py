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


HALF_MAX = 65504.0  # the largest finite float16


def _compact(rows: np.ndarray) -> np.ndarray:
    """Kept rows as float16 (half the memory: SmolLM2's 121 tensors x 2048 rows, 0.81 -> 0.41 GB, beside the ORT
    session at the sampling's peak), float32 where a value would overflow it. Rounding to float16 moves a value by
    at most 2^-11 of itself, 1/16 of the finest int8 step the search scores (1/127 of the row's absmax)."""
    if rows.size and float(np.abs(rows).max()) < HALF_MAX:
        return rows.astype(np.float16)
    return np.ascontiguousarray(rows, dtype=np.float32)


def sample_activation_rows(source: pathlib.Path, names: list[str], stats_meta: dict[str, Any], count: int,
                           rows: int, text: str | None = None) -> dict[str, np.ndarray]:
    """Rows [R, K] (R <= `rows`; float16, or float32 where a value exceeds float16's range: _compact) of each
    activation in `names` from `count` windows of the text; the search reads each tensor's as float32."""
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
            parts[name].append(_compact(value.reshape(-1, value.shape[-1])[mine]))
        start += int(window.size)
    del session
    rows_kept = {name: np.concatenate(parts.pop(name)) for name in names}
    release_freed_memory()  # the session's memory, before the search stacks its own on top
    return rows_kept
