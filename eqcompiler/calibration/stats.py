"""Calibration statistics: mergeable sufficient statistics per tensor, and their file format.

The file is a numpy .npz (read with allow_pickle=False) holding a JSON header and arrays. The
header records the format version, the fingerprint of the model the statistics came from (so
they refuse to be applied to another model) and the data they were computed on.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from eqcompiler.artifact.atomic import staged_file
from eqcompiler.errors import EqcError
from eqcompiler.calibration.observers import DEFAULT_OBSERVERS, merge_extra, observe_activation

STATS_FORMAT = "eqc-calibration-stats"
STATS_VERSION = 2  # 2: header lists the observers that filled the file
READABLE_VERSIONS = (1, 2)


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
        try:
            with np.load(p, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise EqcError(f"'{p}' is not an eqc statistics file ({type(exc).__name__})") from None
        if header.get("format") != STATS_FORMAT:
            raise EqcError(f"'{p}' is not an eqc statistics file")
        if header.get("version") not in READABLE_VERSIONS:
            raise EqcError(f"'{p}' has statistics format version {header.get('version')}, "
                           f"this eqc reads {', '.join(map(str, READABLE_VERSIONS))}")
        header.setdefault("observers", list(DEFAULT_OBSERVERS))
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
