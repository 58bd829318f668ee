"""Calibration observers: mergeable sufficient statistics filled into `TensorStats.extra`.

Every observer keeps a fixed-size summary of the activations it has seen (never the activations),
and every summary merges exactly, so windows may be processed in any order, in any number of
processes, and merged afterwards.

Observer names (`calibrate(..., observers=[...])`, `eqc calibrate --observers a,b`):
- "minmax": per-tensor min, max and element count (always recorded: every consumer needs them).
- "absmax_channel": max |x| per last-dim channel (TensorStats.absmax_channel; SmoothQuant, AWQ).
- "abssum": extra["abssum_channel"], float64 sum of |x| per channel (mean = abssum / (count / channels)).
- "hist": extra["hist"], int64 counts of |x| over HIST_BINS bins on [0, hist_max), extra["hist_max"]
  float64 scalar (percentile / entropy / MSE range selection).
- "gram": extra["gram"], float32 [K, K] sum over tokens of x^T x, extra["gram_rows"] int64 token count
  (GPTQ-style Hessians; float32 as GPTQ's reference keeps H; consumers compute in float64 from it).
- "sample": extra["sample_rows"] float32 [R, K], R <= SAMPLE_ROWS token rows of the input itself, and
  extra["sample_keys"] uint64 [R] their sort keys (SmoothQuant's alpha search without a model session,
  passes/smooth_quant.py search="sample"). A bottom-k sample: every row gets the key
  splitmix64(window * 2**32 + position) of its place in the calibration text, and the R rows with the
  smallest keys are kept, so the sample is a uniform random subset that is the same whatever the
  order, grouping or streaming of the windows, and merges exactly (union, keep the R smallest keys).
- "kv": on the KV-cache outputs present.{i}.key/value: per-tensor min/max (TensorStats.min/max) and
  extra["kv_min_channel"] / extra["kv_max_channel"] shaped [kv_heads, head_dim] (per channel of each head).

Histogram range and exact merging: hist_max is always a power of two strictly greater than every
|x| seen. A bin index is floor(|x| * (HIST_BINS / hist_max)); multiplying by a power of two is exact
in floating point, and floor(floor(y) / 2) == floor(y / 2), so when the range doubles, adding
adjacent bin pairs gives exactly the histogram that binning every value at the new range would
have given. Histograms therefore do not depend on the order or grouping of windows: merges across
ranks are bit-identical to a single pass.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from eqcompiler.errors import EqcError

HIST_BINS = 2048
_MIN_HIST_MAX = 2.0 ** -24  # range floor for all-zero tensors

OBSERVERS = ("minmax", "absmax_channel", "abssum", "hist", "gram", "sample", "kv")
ALL = tuple(o for o in OBSERVERS if o != "sample")  # what "all" means
SAMPLE_ROWS = 512  # rows kept per tensor by the "sample" observer
ROW_STRIDE = 1 << 32  # row id = window index * ROW_STRIDE + token position in the window
DEFAULT_OBSERVERS = ("minmax", "absmax_channel", "abssum")  # abssum: w8a8-smooth's dynamic_above reads it
_ALIASES = {"absmax": "absmax_channel", "abssum_channel": "abssum", "histogram": "hist", "hessian": "gram", "samples": "sample"}

# How each `extra` key merges; "hist" is special (re-binned to the larger range first).
MERGE_RULES = {"abssum_channel": "sum", "gram": "sum", "gram_rows": "sum", "hist": "hist", "hist_max": "max",
               "kv_min_channel": "min", "kv_max_channel": "max", "sample_rows": "sample", "sample_keys": "sample"}


def parse_observers(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise an observer list ("minmax,hist" or a sequence); minmax is always included."""
    if spec is None:
        return DEFAULT_OBSERVERS
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if "all" in items:  # every summary statistic; "sample" (raw rows, large) only when named: "all,sample"
        extra = [s for s in items if s and s != "all" and _ALIASES.get(s, s) not in ALL]
        items = list(ALL) + extra
    out: list[str] = ["minmax"]
    for item in items:
        if not item:
            continue
        name = _ALIASES.get(item, item)
        if name not in OBSERVERS:
            raise EqcError(f"unknown observer '{item}' (known: {', '.join(OBSERVERS)}, all)")
        if name not in out:
            out.append(name)
    return tuple(out)


def hist_range_for(absmax: float) -> float:
    """The smallest power of two strictly greater than `absmax` (so no value lands on the top edge)."""
    if not math.isfinite(absmax):
        raise EqcError(f"cannot histogram a tensor with non-finite values (|x| max {absmax})")
    if absmax <= 0.0:
        return _MIN_HIST_MAX
    _, exp = math.frexp(absmax)  # absmax = m * 2**exp, 0.5 <= m < 1, so absmax < 2**exp
    return max(math.ldexp(1.0, exp), _MIN_HIST_MAX)


def rebin(hist: np.ndarray, hist_max: float, new_max: float) -> np.ndarray:
    """Counts of `hist` (on [0, hist_max)) re-binned onto [0, new_max), new_max = hist_max * 2**d."""
    if new_max == hist_max:
        return hist
    ratio = new_max / hist_max
    d = int(round(math.log2(ratio)))
    if d < 0 or math.ldexp(hist_max, d) != new_max:
        raise EqcError(f"histogram ranges {hist_max} and {new_max} are not power-of-two multiples")
    group = 1 << d
    out = np.zeros(HIST_BINS, dtype=np.int64)
    if group >= HIST_BINS:
        out[0] = hist.sum()
        return out
    out[: HIST_BINS // group] = hist.reshape(-1, group).sum(axis=1)
    return out


def _abs_hist(a: np.ndarray, hist_max: float) -> np.ndarray:
    factor = np.float32(HIST_BINS / hist_max)  # a power of two: |x| * factor is exact
    idx = (a * factor).astype(np.int64)
    return np.bincount(idx.ravel(), minlength=HIST_BINS).astype(np.int64)


def row_ids(window: int, first_position: int, rows: int) -> np.ndarray:
    """Global ids of `rows` consecutive token rows of one window (what the "sample" observer keys on)."""
    return np.uint64(window) * np.uint64(ROW_STRIDE) + np.arange(first_position, first_position + rows, dtype=np.uint64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed bijective mix of uint64 ids: sort keys that look random but depend only on the id."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _keep_smallest(keys: np.ndarray, rows: np.ndarray, limit: int = SAMPLE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")[:limit]
    return keys[order], rows[order]


def observe_sample(extra: dict[str, np.ndarray], flat: np.ndarray, ids: np.ndarray) -> None:
    """Merge the rows `flat` [R, K] with global ids `ids` into the bottom-k sample of `extra`."""
    if len(ids) != len(flat):
        raise EqcError(f"sample observer got {len(ids)} row ids for {len(flat)} rows")
    keys, rows = _splitmix64(ids), flat.astype(np.float32)
    if "sample_keys" in extra:
        keys = np.concatenate([extra["sample_keys"], keys])
        rows = np.concatenate([extra["sample_rows"], rows])
    extra["sample_keys"], extra["sample_rows"] = _keep_smallest(keys, rows)


def observe_activation(stats: Any, x: np.ndarray, observers: Iterable[str], rows: np.ndarray | None = None) -> None:
    """Update a TensorStats with one batch of a linear layer's input (last dim = channels).

    `rows`: global ids of the flattened token rows (observers.row_ids), needed by "sample"; without
    them the rows are numbered by how many this tensor has seen, which is right for one stream only.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return
    obs = set(observers)
    flat = x.reshape(-1, x.shape[-1])
    stats.min = min(stats.min, float(flat.min()))
    stats.max = max(stats.max, float(flat.max()))
    stats.count += int(x.size)
    need_abs = obs & {"absmax_channel", "abssum", "hist"}
    a = np.abs(flat) if need_abs else None
    if "absmax_channel" in obs:
        per_channel = a.max(axis=0)
        stats.absmax_channel = per_channel if stats.absmax_channel is None else np.maximum(stats.absmax_channel, per_channel)
    extra = stats.extra
    if "abssum" in obs:
        s = a.sum(axis=0, dtype=np.float64)
        extra["abssum_channel"] = s if "abssum_channel" not in extra else extra["abssum_channel"] + s
    if "hist" in obs:
        new_max = hist_range_for(max(-stats.min, stats.max, 0.0))
        old = extra.get("hist")
        old_max = float(extra["hist_max"]) if old is not None else new_max
        new_max = max(new_max, old_max)
        h = _abs_hist(a, new_max)
        extra["hist"] = h if old is None else rebin(old, old_max, new_max) + h
        extra["hist_max"] = np.array(new_max, dtype=np.float64)
    if "gram" in obs:
        # float32, as GPTQ's reference keeps H: half the memory of float64 (SmolLM2's 121 Grams: 0.8 -> 0.4 GB)
        # and a single-precision product; tests/test_calibration.py bounds the difference to a float64 sum.
        g = flat.T @ flat  # flat is float32; numpy takes x^T x as one symmetric product (syrk)
        if "gram" in extra:
            extra["gram"] += g  # in place: no third [K, K] beside the sum and this window's product
        else:
            extra["gram"] = g
        extra["gram_rows"] = np.array(int(extra.get("gram_rows", 0)) + flat.shape[0], dtype=np.int64)
    if "sample" in obs:
        if rows is None:
            seen = (stats.count - x.size) // max(flat.shape[1], 1)
            rows = np.arange(seen, seen + flat.shape[0], dtype=np.uint64)
        observe_sample(extra, flat, rows)


def observe_kv(stats: Any, x: np.ndarray) -> None:
    """Update a TensorStats with new entries of a KV-cache tensor [batch, kv_heads, tokens, head_dim]."""
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return
    if x.ndim != 4:
        raise EqcError(f"KV-cache tensor has shape {x.shape}, expected [batch, kv_heads, tokens, head_dim]")
    stats.min = min(stats.min, float(x.min()))
    stats.max = max(stats.max, float(x.max()))
    stats.count += int(x.size)
    lo = x.min(axis=(0, 2))
    hi = x.max(axis=(0, 2))
    extra = stats.extra
    extra["kv_min_channel"] = lo if "kv_min_channel" not in extra else np.minimum(extra["kv_min_channel"], lo)
    extra["kv_max_channel"] = hi if "kv_max_channel" not in extra else np.maximum(extra["kv_max_channel"], hi)


def merge_extra(mine: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    """Merge `other`'s extra statistics into `mine` (exact for counts, min and max)."""
    if "sample_keys" in other:
        if "sample_keys" in mine:
            keys = np.concatenate([mine["sample_keys"], other["sample_keys"]])
            rows = np.concatenate([mine["sample_rows"], other["sample_rows"]])
            mine["sample_keys"], mine["sample_rows"] = _keep_smallest(keys, rows)
        else:
            mine["sample_keys"], mine["sample_rows"] = other["sample_keys"].copy(), other["sample_rows"].copy()
    for key, value in other.items():
        if key in ("hist_max", "sample_keys", "sample_rows"):
            continue  # handled with "hist" / above
        if key not in mine:
            mine[key] = value.copy()
            if key == "hist":
                mine["hist_max"] = other["hist_max"].copy()
            continue
        rule = MERGE_RULES.get(key, "sum")
        if rule == "hist":
            a_max, b_max = float(mine["hist_max"]), float(other["hist_max"])
            top = max(a_max, b_max)
            mine["hist"] = rebin(mine["hist"], a_max, top) + rebin(value, b_max, top)
            mine["hist_max"] = np.array(top, dtype=np.float64)
        elif rule == "min":
            mine[key] = np.minimum(mine[key], value)
        elif rule == "max":
            mine[key] = np.maximum(mine[key], value)
        else:
            mine[key] = mine[key] + value
