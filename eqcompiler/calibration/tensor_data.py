"""Calibration and evaluation data for graphs without text inputs: `--data inputs.npz`.

Layout (docs/bring-your-own-onnx.md): one array per graph input, keyed by the input's name, with the samples
along a new leading axis: a graph input `x` of shape [batch, 64] float32 takes an array of shape
[N, batch, 64] float32, and sample i feeds `x[i]` (every array holds the same N). Inputs named
past_key_values.* may be left out (they get an empty cache). Everything is checked against the graph before
any session: names, dtypes, ranks and fixed dimensions, each refusal one line (exit 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import zipfile
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from eqcompiler.artifact import folder as art_mod
from eqcompiler.artifact.model_kind import Tensor, graph_io
from eqcompiler.errors import EnvironmentProblem, EqcError, NumericsError
from eqcompiler.io_names import PAST

Progress = Callable[[int, int], None]


def is_tensor_data(path: str | pathlib.Path) -> bool:
    """`--data` names tensors (an .npz) rather than text."""
    return str(path).lower().endswith(".npz")


@dataclasses.dataclass
class TensorSamples:
    path: pathlib.Path
    sha256: str
    arrays: dict[str, np.ndarray]  # graph input name -> [N, ...]
    count: int

    def feeds(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.count if limit is None else min(limit, self.count)):
            yield {name: np.ascontiguousarray(a[i]) for name, a in self.arrays.items()}

    def describe(self) -> dict[str, Any]:
        """What the statistics header records about the data (path, hash, per-input dtype and shape)."""
        return {"path": str(self.path), "sha256": self.sha256, "format": "npz",
                "inputs": {n: [str(a.dtype), list(a.shape)] for n, a in self.arrays.items()}}


def _read_npz(p: pathlib.Path) -> dict[str, np.ndarray]:
    from eqcompiler.calibration.layer_stream import available_memory

    if not p.is_file():
        raise EqcError(f"--data '{p}' does not exist")
    try:
        with zipfile.ZipFile(p) as zf:
            total = sum(i.file_size for i in zf.infolist())
        if total > available_memory():
            raise EnvironmentProblem(f"--data '{p}' holds {total / 1e9:.1f} GB of arrays, more than the "
                                     f"{available_memory() / 1e9:.1f} GB of memory available")
        with np.load(p, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except EqcError:
        raise
    except Exception as exc:  # BadZipFile, a pickled object array, a truncated entry
        raise EqcError(f"--data '{p}' is not a readable .npz of arrays ({type(exc).__name__}); write it with "
                       "numpy.savez(path, **{input_name: array})") from None


def _check_array(p: pathlib.Path, name: str, arr: np.ndarray, want: Tensor) -> None:
    if arr.dtype.name != want.dtype:
        raise EqcError(f"--data '{p}': '{name}' is {arr.dtype.name}, the graph's input '{name}' is {want.dtype} "
                       f"(save it with .astype('{want.dtype}'))")
    if want.dims is None:
        return
    if arr.ndim != len(want.dims) + 1:
        raise EqcError(f"--data '{p}': '{name}' has shape {list(arr.shape)}; the graph's input has rank "
                       f"{len(want.dims)} {list(want.dims)}, so the array needs rank {len(want.dims) + 1} "
                       "(samples along the first axis)")
    for axis, (got, dim) in enumerate(zip(arr.shape[1:], want.dims)):
        if isinstance(dim, int) and dim > 0 and got != dim:
            raise EqcError(f"--data '{p}': '{name}' has shape {list(arr.shape)}; axis {axis + 1} must be {dim} "
                           f"(the graph's input is {list(want.dims)} after the sample axis)")


def load_samples(path: str | pathlib.Path, model_path: pathlib.Path) -> TensorSamples:
    """The .npz at `path`, checked against the inputs of the graph at `model_path` (one-line refusals)."""
    p = pathlib.Path(path)
    arrays = _read_npz(p)
    inputs = {t.name: t for t in graph_io(model_path)[0]}
    unknown = [k for k in arrays if k not in inputs]
    if unknown:
        raise EqcError(f"--data '{p}' holds '{unknown[0]}', which is not an input of the graph (its inputs: "
                       f"{', '.join(inputs)})")
    missing = [n for n in inputs if n not in arrays and not n.startswith(PAST)]
    if missing:
        raise EqcError(f"--data '{p}' lacks the graph input(s) {', '.join(missing)} (it holds: "
                       f"{', '.join(arrays) or 'nothing'})")
    for name, arr in arrays.items():
        _check_array(p, name, arr, inputs[name])
    counts = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(counts.values())) > 1:
        (a, na), (b, nb) = list(counts.items())[0], next((k, v) for k, v in counts.items() if v != list(counts.values())[0])
        raise EqcError(f"--data '{p}': '{a}' holds {na} samples, '{b}' {nb}; every array needs the same "
                       "leading sample count")
    count = next(iter(counts.values()))
    if count < 1:
        raise EqcError(f"--data '{p}' holds no samples (the leading axis is 0)")
    return TensorSamples(p, hashlib.sha256(p.read_bytes()).hexdigest(), arrays, count)


def _empty_past_feed(session: Any) -> dict[str, np.ndarray]:
    from eqcompiler.runtime.session import empty_past

    return empty_past(session, 1) if any(i.name.startswith(PAST) for i in session.get_inputs()) else {}


def run_samples(session: Any, samples: TensorSamples, outputs: list[str] | None, limit: int | None = None
                ) -> Iterator[list[np.ndarray]]:
    """`session.run(outputs, sample)` for each sample (an empty cache for past_key_values.* left out)."""
    past = _empty_past_feed(session)
    for feed in samples.feeds(limit):
        yield session.run(outputs, {**past, **feed})


def calibrate_tensors(model: str | pathlib.Path, data: str | pathlib.Path, samples: int,
                      out: pathlib.Path | None = None, overwrite: bool = True,
                      observers: Iterable[str] | str | None = None, skip_nonfinite: bool = False,
                      threads: int | None = None, progress: Progress | None = None) -> Any:
    """Statistics of the linear-layer inputs over the first `samples` samples of `data` (an .npz)."""
    from eqcompiler.calibration.calibrate import instrumented_session, observed_tensors
    from eqcompiler.calibration.observers import DEFAULT_OBSERVERS, observe_activation, parse_observers, row_ids
    from eqcompiler.calibration.stats import CalibrationStats, TensorStats

    chosen = parse_observers(observers if observers is not None else DEFAULT_OBSERVERS)
    if "kv" in chosen:
        raise EqcError("the 'kv' observer reads a KV cache over text windows; it does not go with --data .npz")
    art = art_mod.resolve_artifact(model)
    model_path = art_mod.model_file(art)
    names = observed_tensors(model_path)
    tensors = load_samples(data, model_path)  # checked before any session
    session = instrumented_session(model_path, names, threads=threads)
    stats = {n: TensorStats() for n in names}
    n = min(samples, tensors.count)
    for i, values in enumerate(run_samples(session, tensors, names, n)):
        for name, value in zip(names, values):
            if not np.isfinite(value).all():
                if not skip_nonfinite:
                    raise NumericsError(f"activation '{name}' has NaN or Inf on sample {i} of '{data}' (pass "
                                        "--skip-nonfinite to ignore them)")
                value = np.where(np.isfinite(value), value, 0.0).astype(np.float32)
            rows = row_ids(i, 0, value.size // value.shape[-1]) if "sample" in chosen else None
            observe_activation(stats[name], value, chosen, rows=rows)
        if progress:
            progress(i + 1, n)
    meta = {"model_fingerprint": art_mod.model_fingerprint(model_path),
            "data": {**tensors.describe(), "samples": n}, "observers": list(chosen), "stream_layers": False}
    result = CalibrationStats(meta=meta, tensors=stats)
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result
