"""Token rows of a model's activations, read through ONNX Runtime: the model run SmoothQuant's alpha search
scores candidate scales on (calibration/smoothing_search.py).

The rows come from the first windows of the statistics' own calibration text (or `text`), tokenized with the
artifact's tokenizer, so a search repeats exactly from the same statistics.

`eqc calibrate --for` asks its statistics pass for the same rows (RowRequest -> RowTaker -> TakenRows): when
the search's windows are that run's first windows, the pass keeps them as it goes (the same keep_rows draw and
cut_rows), and the search takes them instead of opening a second session.
"""
from __future__ import annotations

import dataclasses
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


def keep_rows(names: list[str], total: int, rows: int) -> dict[str, np.ndarray]:
    """Each tensor's kept row ids among `total` (every row when they fit in `rows`, else a sorted uniform draw):
    one draw per tensor, in the order of `names`, from one generator, so the same names give the same rows."""
    rng = np.random.default_rng(0)
    return {n: np.arange(total) if total <= rows else np.sort(rng.choice(total, rows, replace=False)) for n in names}


def cut_rows(keep: np.ndarray, start: int, size: int, value: np.ndarray) -> np.ndarray:
    """The kept rows of one window's `value` (its rows are ids start .. start + size - 1), compacted."""
    mine = keep[(keep >= start) & (keep < start + size)] - start
    return _compact(value.reshape(-1, value.shape[-1])[mine])


@dataclasses.dataclass(frozen=True)
class RowRequest:
    """What an alpha search will sample (its search_windows, search_rows), asked of the statistics pass so that
    it keeps those rows as it runs the same windows."""

    count: int
    rows: int


@dataclasses.dataclass
class TakenRows:
    """Rows the statistics pass kept for an alpha search: sample_activation_rows' rows of `names` for the first
    windows of the same model file, text, tokenizer and seq_len (`data`: the statistics' meta["data"] fields)."""

    model_path: str
    data: dict[str, Any]
    count: int
    rows: int
    total: int
    keep: dict[str, np.ndarray]
    kept: dict[str, np.ndarray]

    def take(self, model_path: str, stats_meta: dict[str, Any], count: int, rows: int, names: list[str]
             ) -> dict[str, np.ndarray] | None:
        """The rows of `names` (handed over: no longer held here) when they are exactly what
        sample_activation_rows(model, names, stats_meta, count, rows) would sample, else None."""
        if not self.serves(model_path, stats_meta, count, rows, names):
            return None
        return {n: self.kept.pop(n) for n in names}

    def serves(self, model_path: str, stats_meta: dict[str, Any], count: int, rows: int, names: list[str]) -> bool:
        data = stats_meta.get("data") or {}
        if (model_path, count, rows) != (self.model_path, self.count, self.rows):
            return False
        if any(data.get(k) != v for k, v in self.data.items()) or any(n not in self.kept for n in names):
            return False
        # The draw depends on the names and their order (one generator): compare it rather than assume it.
        wanted = keep_rows(names, self.total, rows)
        return all(np.array_equal(wanted[n], self.keep[n]) for n in names)


# meta["data"] fields that decide a search's windows (text, tokenizer, window length)
RUN_FIELDS = ("path", "sha256", "seq_len", "tokenizer", "tokenizer_sha256", "format")


class RowTaker:
    """Keeps, window by window as the statistics pass runs them, the rows sample_activation_rows would keep
    from its first `count` windows; the caller has checked that those are the search's windows."""

    def __init__(self, names: list[str], count: int, seq_len: int, rows: int) -> None:
        self.names, self.count, self.seq_len, self.rows = list(names), count, seq_len, rows
        self.keep = keep_rows(self.names, count * seq_len, rows)
        self.parts: dict[str, dict[int, np.ndarray]] = {n: {} for n in self.names}

    def observe(self, index: int, name: str, value: np.ndarray) -> None:
        """Window `index`'s activation `name` (ORT's output, before any observer reads it)."""
        if index < self.count and name in self.parts:
            self.parts[name][index] = cut_rows(self.keep[name], index * self.seq_len, self.seq_len, value)

    def finish(self, model_path: str, data: dict[str, Any]) -> TakenRows | None:
        """The kept rows, in window order as sample_activation_rows concatenates them; None unless every
        window was seen."""
        if any(len(p) != self.count for p in self.parts.values()):
            return None
        kept = {}
        for name in self.names:  # each tensor's parts freed as it is joined
            parts = self.parts.pop(name)
            kept[name] = np.concatenate([parts.pop(i) for i in range(self.count)])
        return TakenRows(model_path, {k: data.get(k) for k in RUN_FIELDS}, self.count, self.rows,
                         self.count * self.seq_len, self.keep, kept)


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
    keep = keep_rows(names, total, rows)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    start = 0
    for window in chosen:
        feed = causal_feed(session, window) if causal else _encoder_feed(window)
        for name, value in zip(names, session.run(names, feed)):
            parts[name].append(cut_rows(keep[name], start, int(window.size), value))
        start += int(window.size)
    del session
    rows_kept = {name: np.concatenate(parts.pop(name)) for name in names}
    release_freed_memory()  # the session's memory, before the search stacks its own on top
    return rows_kept
