"""Calibration statistics: mergeable sufficient statistics per tensor, and their file format.

The file is a numpy .npz (read with allow_pickle=False) holding a JSON header and arrays. The
header records the format version, the fingerprint of the model the statistics came from (so
they refuse to be applied to another model) and the data they were computed on.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import zipfile
from typing import Any

import numpy as np

from eqcompiler.artifact.atomic import staged_file
from eqcompiler.errors import EnvironmentProblem, EqcError
from eqcompiler.calibration.observers import DEFAULT_OBSERVERS, merge_extra, observe_activation

STATS_FORMAT = "eqc-calibration-stats"
STATS_VERSION = 2  # 2: header lists the observers that filled the file
READABLE_VERSIONS = (1, 2)
# eqc writes every array stored (uncompressed); a compressed entry may expand this much at most (beyond
# COMPRESSED_SLACK bytes), so a small file that inflates to gigabytes is refused before anything is read.
MAX_EXPANSION = 16
COMPRESSED_SLACK = 16 << 20
MAX_HEADER_BYTES = 64 << 20
_ENTRY = re.compile(r"^(header|t(\d+)\.(minmax|count|absmax_channel|extra\.[A-Za-z0-9_]+))\.npy$")


@dataclasses.dataclass
class TensorStats:
    """Running statistics of one activation; every field merges exactly across shards."""

    min: float = float("inf")
    max: float = float("-inf")
    absmax_channel: np.ndarray | None = None  # max |x| per last-dim channel
    count: int = 0  # elements seen
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # histograms, Gram matrices, ...

    def update(self, x: np.ndarray, observers: tuple[str, ...] = DEFAULT_OBSERVERS) -> None:
        observe_activation(self, x, observers)

    def merge(self, other: "TensorStats") -> None:
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if other.absmax_channel is not None:
            self.absmax_channel = (other.absmax_channel.copy() if self.absmax_channel is None
                                   else np.maximum(self.absmax_channel, other.absmax_channel))
        self.count += other.count
        merge_extra(self.extra, other.extra)


@dataclasses.dataclass
class CalibrationStats:
    meta: dict[str, Any]
    tensors: dict[str, TensorStats]

    def save(self, path: str | pathlib.Path, overwrite: bool = True) -> None:
        arrays: dict[str, np.ndarray] = {}
        names = sorted(self.tensors)
        for i, name in enumerate(names):
            t = self.tensors[name]
            arrays[f"t{i}.minmax"] = np.array([t.min, t.max], dtype=np.float64)
            arrays[f"t{i}.count"] = np.array(t.count, dtype=np.int64)
            if t.absmax_channel is not None:
                arrays[f"t{i}.absmax_channel"] = t.absmax_channel.astype(np.float32)
            for key, value in t.extra.items():
                arrays[f"t{i}.extra.{key}"] = value
        header = {"format": STATS_FORMAT, "version": STATS_VERSION, "tensors": names, **self.meta}
        arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        with staged_file(pathlib.Path(path), overwrite=overwrite) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "CalibrationStats":
        p = pathlib.Path(path)
        if not p.is_file():
            raise EqcError(f"statistics file '{p}' does not exist")
        _check_entries(p)  # sizes and array headers, before any array is read
        try:
            with np.load(p, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise EqcError(f"'{p}' is not an eqc statistics file ({type(exc).__name__})") from None
        if not isinstance(header, dict) or header.get("format") != STATS_FORMAT:
            raise EqcError(f"'{p}' is not an eqc statistics file")
        if header.get("version") not in READABLE_VERSIONS:
            raise EqcError(f"'{p}' has statistics format version {header.get('version')!r}, "
                           f"this eqc reads {', '.join(map(str, READABLE_VERSIONS))}")
        header.setdefault("observers", list(DEFAULT_OBSERVERS))
        _check_header(p, header, arrays)
        tensors: dict[str, TensorStats] = {}
        for i, name in enumerate(header.pop("tensors")):
            lo, hi = arrays[f"t{i}.minmax"]
            extra = {k.split(".extra.", 1)[1]: v for k, v in arrays.items() if k.startswith(f"t{i}.extra.")}
            tensors[name] = TensorStats(min=float(lo), max=float(hi), absmax_channel=arrays.get(f"t{i}.absmax_channel"),
                                        count=int(arrays[f"t{i}.count"]), extra=extra)
        header.pop("format")
        header.pop("version")
        return cls(meta=header, tensors=tensors)

    def check_model(self, fingerprint: str, model_desc: str) -> None:
        """Refuse statistics computed on a different model."""
        mine = self.meta.get("model_fingerprint")
        if mine != fingerprint:
            raise EqcError(f"statistics were computed on another model (fingerprint {mine}, {model_desc} is {fingerprint}); "
                           "run `eqc calibrate` on this model")

    @property
    def observers(self) -> list[str]:
        return list(self.meta.get("observers", DEFAULT_OBSERVERS))

    def require(self, name: str, key: str, observer: str, consumer: str) -> np.ndarray:
        """extra[key] of tensor `name`, or a clear error naming the observer to calibrate with."""
        t = self.get(name)
        if key not in t.extra:
            raise EqcError(f"{consumer} needs the '{observer}' calibration observer (statistic '{key}' of '{name}' "
                           f"is missing); rerun `eqc calibrate --observers {observer}`")
        return t.extra[key]

    def get(self, name: str) -> TensorStats:
        if name not in self.tensors:
            raise EqcError(f"statistics have no entry for tensor '{name}'; recalibrate this model")
        return self.tensors[name]


def _check_entries(p: pathlib.Path) -> None:
    """Refuse a statistics file whose zip entries would inflate far beyond their size on disk, or whose
    array headers disagree with the entry sizes, by reading only the zip directory and the .npy headers."""
    from numpy.lib import format as npy_format

    def bad(why: str) -> EqcError:
        return EqcError(f"'{p}' is not an eqc statistics file ({why})")

    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            total = 0
            for info in infos:
                if not _ENTRY.match(info.filename):
                    raise bad(f"unexpected entry '{info.filename[:80]}'")
                if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
                        COMPRESSED_SLACK, MAX_EXPANSION * info.compress_size):
                    raise bad(f"entry '{info.filename}' would inflate from {info.compress_size} to "
                              f"{info.file_size} bytes")
                if info.filename == "header.npy" and info.file_size > MAX_HEADER_BYTES:
                    raise bad(f"a header of {info.file_size} bytes")
                total += info.file_size
            from eqcompiler.calibration.layer_stream import available_memory

            if total > available_memory():
                raise EnvironmentProblem(f"statistics file '{p}' holds {total / 1e9:.1f} GB of arrays, more than the "
                                         f"{available_memory() / 1e9:.1f} GB of memory available")
            for info in infos:
                with zf.open(info) as fh:
                    version = npy_format.read_magic(fh)
                    if version == (1, 0):
                        shape, fortran, dtype = npy_format.read_array_header_1_0(fh, max_header_size=10000)
                    elif version == (2, 0):
                        shape, fortran, dtype = npy_format.read_array_header_2_0(fh, max_header_size=10000)
                    else:
                        raise bad(f"entry '{info.filename}' has .npy version {version}")
                    if dtype.hasobject:
                        raise bad(f"entry '{info.filename}' holds Python objects")
                    count = int(np.prod(shape, dtype=object))
                    if count * dtype.itemsize != info.file_size - fh.tell():
                        raise bad(f"entry '{info.filename}' declares {count * dtype.itemsize} bytes of data in "
                                  f"{info.file_size - fh.tell()}")
            if not any(info.filename == "header.npy" for info in infos):
                raise bad("no header")
    except EqcError:
        raise
    except Exception as exc:  # BadZipFile, a bad .npy magic or header, ...
        raise bad(type(exc).__name__) from None


def _check_header(p: pathlib.Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The header's schema and the arrays every listed tensor needs, with one-line refusals."""
    def bad(why: str) -> EqcError:
        return EqcError(f"statistics file '{p}' is malformed: {why}")

    names = header.get("tensors")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("header 'tensors' is not a list of names")
    if len(set(names)) != len(names):
        raise bad("header 'tensors' names a tensor twice")
    if not isinstance(header.get("model_fingerprint", ""), str):
        raise bad("header 'model_fingerprint' is not a string")
    observers = header.get("observers")
    if not isinstance(observers, list) or not all(isinstance(o, str) for o in observers):
        raise bad("header 'observers' is not a list of names")
    data = header.get("data")
    if data is not None:
        if not isinstance(data, dict):
            raise bad("header 'data' is not an object")
        for key, kind in (("path", str), ("sha256", str), ("samples", int), ("seq_len", int), ("decode_steps", int),
                          ("tokenizer", str), ("tokenizer_sha256", str)):
            value = data.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)
                                      or (kind is int and value < 0)):
                raise bad(f"header 'data.{key}' is {value!r}")
    for i, name in enumerate(names):
        minmax, count = arrays.get(f"t{i}.minmax"), arrays.get(f"t{i}.count")
        if minmax is None or count is None:
            raise bad(f"tensor '{name}' (t{i}) has no minmax or count array")
        if minmax.shape != (2,) or minmax.dtype.kind != "f":
            raise bad(f"t{i}.minmax is {minmax.dtype}{list(minmax.shape)}, not float [2]")
        if count.shape != () or count.dtype.kind not in "iu" or int(count) < 0:
            raise bad(f"t{i}.count is not a count")
        for key, value in arrays.items():
            if key.startswith(f"t{i}.") and value.dtype.kind not in "biuf":
                raise bad(f"{key} has dtype {value.dtype}")
        absmax = arrays.get(f"t{i}.absmax_channel")
        if absmax is not None and absmax.ndim != 1:
            raise bad(f"t{i}.absmax_channel is not one value per channel")
        gram = arrays.get(f"t{i}.extra.gram")
        if gram is not None and (gram.ndim != 2 or gram.shape[0] != gram.shape[1]):
            raise bad(f"t{i}.extra.gram is not square")
    extra = sorted(int(k[1:].split(".", 1)[0]) for k in arrays if k != "header")
    if extra and extra[-1] >= len(names):
        raise bad(f"array t{extra[-1]} belongs to no tensor in the header")


# Paths a statistics file names (its calibration text, its tokenizer) are read back by compile (SmoothQuant's
# alpha search, a ppl budget's held-out windows, the tokenizer a bare model's artifact carries). A statistics
# file is input like any other: such a path is used only while its content has the digest recorded beside it,
# so a crafted file cannot make eqc read or copy anything but what calibration itself read.

def recorded_text(meta: dict[str, Any]) -> tuple[str, str]:
    """(text, path) of the calibration text the statistics `meta` record, checked against its sha256."""
    from eqcompiler.data import read_text

    data = meta.get("data") or {}
    path, sha = data.get("path"), data.get("sha256")
    if not path:
        raise EqcError("the statistics record no calibration text (made by an older eqc calibrate?); recalibrate")
    if not sha:
        raise EqcError(f"the statistics name calibration text '{path}' without its sha256; recalibrate")
    text, actual = read_text(path)
    if actual != sha:
        raise EqcError(f"calibration text '{path}' is not the text the statistics were made from (sha256 differs); "
                       "recalibrate, or restore that file")
    return text, str(path)


def recorded_tokenizer(meta: dict[str, Any]) -> str | None:
    """The tokenizer the statistics were made with (`eqc calibrate --tokenizer`), checked against its digest;
    None when calibration used the model folder's own."""
    from eqcompiler.artifact.folder import tokenizer_digest

    data = meta.get("data") or {}
    path = data.get("tokenizer")
    if not path:
        return None
    if not data.get("tokenizer_sha256"):
        raise EqcError(f"the statistics name tokenizer '{path}' without its sha256; recalibrate")
    if not pathlib.Path(path).exists():
        raise EqcError(f"the tokenizer the statistics were made with ('{path}') no longer exists; recalibrate "
                       "with --tokenizer")
    if tokenizer_digest(pathlib.Path(path)) != data["tokenizer_sha256"]:
        raise EqcError(f"tokenizer '{path}' is not the one the statistics were made with (sha256 differs); "
                       "recalibrate")
    return str(path)
