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
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for window in windows(ids, seq_len, count):
        feed = causal_feed(session, window) if causal else _encoder_feed(window)
        for name, value in zip(names, session.run(names, feed)):
            parts[name].append(value.reshape(-1, value.shape[-1]))
    rng = np.random.default_rng(0)
    out = {}
    for name, chunks in parts.items():
        x = np.concatenate(chunks)
        if len(x) > rows:
            x = x[np.sort(rng.choice(len(x), rows, replace=False))]
        out[name] = x.astype(np.float32)
    return out
