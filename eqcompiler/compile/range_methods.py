"""Activation range selection from calibration histograms (the "hist" observer).

Each method returns a clipping threshold `a` for |x|; the quantization range is then [-a, a]
intersected with the observed [min, max]. All work on the |x| histogram (HIST_BINS bins on
[0, hist_max)), so their cost does not depend on how much data was calibrated.

- percentile: the smallest bin edge below which `p`% of |x| lie (e.g. 99.99).
- entropy: TensorRT-style KL calibration: the threshold whose 128-level quantized distribution
  (outliers folded into the last bin) has the smallest KL divergence to the reference.
- mse: the threshold minimising the expected squared error of int8 quantization: clipping error
  (|x| - a)^2 above a, uniform rounding noise (a/127)^2/12 below it.
"""
from __future__ import annotations

import numpy as np

from eqcompiler.errors import EqcError

_QUANT_LEVELS = 128  # |x| of symmetric int8: levels 0..127
_MAX_CANDIDATES = 384  # thresholds tried by entropy/mse (stride over bins beyond that)


def _last_nonzero(hist: np.ndarray) -> int:
    nz = np.flatnonzero(hist)
    return int(nz[-1]) + 1 if nz.size else 0


def percentile_threshold(hist: np.ndarray, hist_max: float, percentile: float) -> float:
    if not 0.0 < percentile <= 100.0:
        raise EqcError(f"percentile must be in (0, 100], got {percentile}")
    total = hist.sum()
    if total == 0:
        return 0.0
    cum = np.cumsum(hist)
    idx = int(np.searchsorted(cum, total * percentile / 100.0, side="left"))
    return (min(idx, len(hist) - 1) + 1) * hist_max / len(hist)


def _candidates(start: int, last: int) -> np.ndarray:
    stride = max(1, (last - start) // _MAX_CANDIDATES)
    cands = np.arange(start, last + 1, stride)
    return np.unique(np.append(cands, last))


def entropy_threshold(hist: np.ndarray, hist_max: float) -> float:
    width = hist_max / len(hist)
    last = _last_nonzero(hist)
    if last <= _QUANT_LEVELS:
        return last * width  # every value already has its own quantization level
    hist = hist.astype(np.float64)
    best_i, best_kl = last, np.inf
    for i in _candidates(_QUANT_LEVELS, last):
        ref = hist[:i]
        p = ref.copy()
        p[-1] += hist[i:].sum()  # outliers clip to the threshold
        edges = (np.arange(_QUANT_LEVELS + 1) * i) // _QUANT_LEVELS
        nonzero = ref > 0
        sums = np.add.reduceat(ref, edges[:-1])
        counts = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        group = np.repeat(np.arange(_QUANT_LEVELS), np.diff(edges))
        q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1.0), 0.0)
        p /= p.sum()
        q_total = q.sum()
        if q_total == 0:
            continue
        q /= q_total
        mask = p > 0
        qm = np.where(q[mask] > 0, q[mask], 1e-12)  # p>0 where q==0 (last bin): heavily penalised, finite
        kl = float(np.sum(p[mask] * np.log(p[mask] / qm)))
        if kl < best_kl:
            best_i, best_kl = int(i), kl
    return best_i * width


def mse_threshold(hist: np.ndarray, hist_max: float, qmax: int = 127) -> float:
    width = hist_max / len(hist)
    last = _last_nonzero(hist)
    if last == 0:
        return 0.0
    centers = (np.arange(last) + 0.5) * width
    counts = hist[:last].astype(np.float64)
    cands = _candidates(1, last) * width
    clip = np.maximum(centers[None, :] - cands[:, None], 0.0) ** 2
    noise = ((cands / qmax) ** 2 / 12.0)[:, None] * (centers[None, :] <= cands[:, None])
    err = ((clip + noise) * counts[None, :]).sum(axis=1)
    return float(cands[int(np.argmin(err))])


def clipped_range(lo: float, hi: float, threshold: float) -> tuple[float, float]:
    """[-a, a] intersected with the observed range (a tensor that is never negative keeps lo >= 0)."""
    return max(lo, -threshold), min(hi, threshold)
