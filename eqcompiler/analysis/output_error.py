"""`eqc eval --data inputs.npz --ref FLOAT`: how far a (quantized) graph's outputs are from its float model's on the
same samples (relative error and cosine per sample, each output flattened), and the latency of one sample.

relative error = ||q - f|| / ||f||, cosine = <q, f> / (||q|| ||f||), both over a sample's whole output tensor in
float64; reported as mean and worst over the samples, per output and over all outputs.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from eqcompiler.artifact import folder as art_mod
from eqcompiler.calibration.tensor_data import load_samples, run_samples
from eqcompiler.errors import EqcError, NumericsError
from eqcompiler.io_names import PAST, PRESENT
from eqcompiler.runtime.session import make_session

_SYNTHETIC = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "float64": np.float64}


def sample_feed(session: Any, model_path: pathlib.Path, data: str | None) -> dict[str, np.ndarray]:
    """The first sample of `data` (an .npz), or zeros shaped like the graph's inputs (symbolic dimensions 1)."""
    from eqcompiler.artifact.model_kind import graph_io
    from eqcompiler.runtime.session import empty_past

    if data:
        samples = load_samples(data, model_path)
        return {**empty_past(session, 1), **next(samples.feeds(1))}
    feed = {}
    for t in graph_io(model_path)[0]:
        if t.name.startswith(PAST):
            continue
        if t.dtype not in _SYNTHETIC or t.dims is None:
            raise EqcError(f"input '{t.name}' ({t.dtype}) cannot be made up; give --data INPUTS.npz")
        feed[t.name] = np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in t.dims], _SYNTHETIC[t.dtype])
    return {**empty_past(session, 1), **feed}


def _compare(q: np.ndarray, f: np.ndarray, name: str) -> tuple[float, float]:
    if q.shape != f.shape:
        raise EqcError(f"output '{name}' is {list(q.shape)} in the model and {list(f.shape)} in the reference")
    q64, f64 = q.astype(np.float64).ravel(), f.astype(np.float64).ravel()
    if not (np.isfinite(q64).all() and np.isfinite(f64).all()):
        raise NumericsError(f"output '{name}' has NaN or Inf")
    fn, qn = np.linalg.norm(f64), np.linalg.norm(q64)
    rel = float(np.linalg.norm(q64 - f64) / fn) if fn > 0 else float(qn > 0)
    cos = float(q64 @ f64 / (qn * fn)) if qn > 0 and fn > 0 else float(qn == fn)
    return rel, cos


def output_error(model: str | pathlib.Path, reference: str | pathlib.Path, data: str | pathlib.Path,
                 samples: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Per-output relative error and cosine of `model` against `reference` on the samples of `data`."""
    art, ref = art_mod.resolve_artifact(model), art_mod.resolve_artifact(reference)
    tensors = load_samples(data, art_mod.model_file(art))
    load_samples(data, art_mod.model_file(ref))  # the reference takes the same inputs
    session, ref_session = (make_session(art_mod.model_file(a), threads=threads) for a in (art, ref))
    names = [o.name for o in ref_session.get_outputs() if not o.name.startswith(PRESENT)]
    missing = [n for n in names if n not in {o.name for o in session.get_outputs()}]
    if missing:
        raise EqcError(f"the model has no output '{missing[0]}' that the reference '{reference}' has")
    per: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for got, want in zip(run_samples(session, tensors, names, samples), run_samples(ref_session, tensors, names, samples)):
        for name, q, f in zip(names, got, want):
            per[name].append(_compare(q, f, name))
    outputs = {n: {"rel_error_mean": float(np.mean([r for r, _ in v])), "rel_error_max": max(r for r, _ in v),
                   "cosine_mean": float(np.mean([c for _, c in v])), "cosine_min": min(c for _, c in v)}
               for n, v in per.items()}
    return {"reference": str(reference), "data": str(data), "samples": len(next(iter(per.values()))),
            "outputs": outputs, "rel_error_max": max(o["rel_error_max"] for o in outputs.values()),
            "cosine_min": min(o["cosine_min"] for o in outputs.values())}
