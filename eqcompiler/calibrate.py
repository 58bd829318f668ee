"""Streaming calibration: run the model in ONNX Runtime on text windows, keep only statistics.

The observed tensors (inputs of every quantizable linear layer) are exposed as extra graph outputs
of a temporary copy of the graph that shares the original weights file; each window's
activations update mergeable statistics and are dropped, so memory does not grow with the window
count.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Callable

import numpy as np
import onnx

from eqcompiler import artifact as art_mod
from eqcompiler.data import load_tokenizer, read_text, tokenize, windows
from eqcompiler.errors import EqcError, NumericsError
from eqcompiler.graph import find_linear_sites
from eqcompiler.runtime import causal_feed, make_session
from eqcompiler.stats import CalibrationStats, TensorStats


def observed_tensors(model_path: pathlib.Path) -> list[str]:
    """Names of the activations feeding quantizable linear layers, in graph order."""
    model = art_mod.load_ir(model_path)
    seen: dict[str, None] = {}
    for site in find_linear_sites(model.graph):
        if site.activation.name:
            seen.setdefault(site.activation.name, None)
    if not seen:
        raise EqcError(f"'{model_path}' has no quantizable layer (MatMul/Gemm with a constant weight) to calibrate")
    return list(seen)


def instrumented_session(model_path: pathlib.Path, tensors: list[str], threads: int | None = None) -> Any:
    """A session on the graph with `tensors` as extra outputs, reading the original weights file.

    The graph (without weights) is passed as bytes and ORT is pointed at the artifact folder for
    external data, so nothing is copied and nothing is written.
    """
    proto = onnx.load(str(model_path), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    for name in tensors:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return make_session(proto.SerializeToString(), threads=threads, external_data_dir=model_path.parent)


def _check_finite(name: str, x: np.ndarray, skip_nonfinite: bool) -> np.ndarray:
    if np.isfinite(x).all():
        return x
    if skip_nonfinite:
        return np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    raise NumericsError(f"activation '{name}' has NaN or Inf during calibration (pass --skip-nonfinite to ignore them)")


def calibrate(model: str | pathlib.Path, text_path: str | pathlib.Path, samples: int, seq_len: int,
              out: pathlib.Path | None = None, overwrite: bool = True, skip_nonfinite: bool = False,
              progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> CalibrationStats:
    """Compute statistics over `samples` windows of `seq_len` tokens; write them to `out` if given."""
    art = art_mod.resolve_artifact(model)
    model_path = art_mod.model_file(art)
    text, text_sha = read_text(text_path)
    if samples < 1:
        raise EqcError(f"--samples must be at least 1, got {samples}")
    tokenizer = load_tokenizer(art.folder)
    ids = tokenize(tokenizer, text, max_tokens=samples * seq_len)
    names = observed_tensors(model_path)
    stats = {n: TensorStats() for n in names}
    start = time.perf_counter()
    done = 0
    if True:
        session = instrumented_session(model_path, names, threads=threads)
        out_names = [o.name for o in session.get_outputs()]
        wanted = [n for n in out_names if n in stats]
        for window in windows(ids, seq_len, samples):
            feed = causal_feed(session, window) if art.task == "causal-lm" else _encoder_feed(window)
            values = session.run(wanted, feed)
            for name, value in zip(wanted, values):
                stats[name].update(_check_finite(name, value, skip_nonfinite))
            del values
            done += 1
            if progress:
                progress(done, samples)
    meta: dict[str, Any] = {
        "model_fingerprint": art_mod.model_fingerprint(model_path),
        "data": {"path": str(text_path), "sha256": text_sha, "samples": done, "seq_len": seq_len},
        "seconds": round(time.perf_counter() - start, 2),
    }
    result = CalibrationStats(meta=meta, tensors=stats)
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


def _encoder_feed(window: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": window, "attention_mask": np.ones_like(window), "token_type_ids": np.zeros_like(window)}
