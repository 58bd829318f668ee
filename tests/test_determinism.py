"""Same model, data and recipe -> byte-identical artifact.

Compared: every file of the artifact folder byte for byte (model.onnx, model.onnx.data, tokenizer,
config, manifest.json). Facts about a run (how long export, calibration or compile took, how many
calibration workers) are in what the command prints (--json), never in an artifact or a statistics
file. Statistics files are compared array by array and header field by field.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from conftest import run_eqc

def assert_same_artifact(a: pathlib.Path, b: pathlib.Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    assert {"model.onnx", "model.onnx.data", "manifest.json"} <= set(names_a)
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between runs"


def _stats_content(path: pathlib.Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "header"}
        header = json.loads(bytes(data["header"]).decode())
    return header, arrays


def test_export_twice_identical(tiny_hf, tmp_path):
    src = tiny_hf("llama")
    run_eqc("export", src, "-o", tmp_path / "a")
    run_eqc("export", src, "-o", tmp_path / "b")
    assert_same_artifact(tmp_path / "a", tmp_path / "b")


@pytest.fixture(scope="module")
def two_stats(tiny_artifact, wiki_valid, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    folder = tmp_path_factory.mktemp("det-stats")
    paths = []
    for name in ("a.npz", "b.npz"):
        run_eqc("calibrate", tiny_artifact("llama"), "--data", wiki_valid, "--samples", "3", "--seq-len", "64",
                "-o", folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


def test_calibration_twice_identical(two_stats):
    (ha, aa), (hb, ab) = (_stats_content(p) for p in two_stats)
    assert ha == hb
    assert sorted(aa) == sorted(ab) and len(aa) > 10
    for key in aa:
        assert aa[key].dtype == ab[key].dtype and np.array_equal(aa[key], ab[key]), key


@pytest.mark.parametrize("recipe", ["w8", "w8a8"])
def test_compile_twice_identical(tiny_artifact, two_stats, tmp_path, recipe):
    model = tiny_artifact("llama")
    for out, stats in ((tmp_path / "a", two_stats[0]), (tmp_path / "b", two_stats[1])):
        run_eqc("compile", model, "--recipe", recipe, "--calib", stats, "-o", out)
    assert_same_artifact(tmp_path / "a", tmp_path / "b")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"] == recipe
    assert (tmp_path / "a" / "model.onnx.data").stat().st_size > 10_000
