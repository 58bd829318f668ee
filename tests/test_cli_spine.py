"""The user's path through the CLI on a tiny model: export -> calibrate -> compile -> eval, and refusals."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from conftest import WIKI_TEST, WIKI_VALID, run_eqc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_hf) -> dict[str, pathlib.Path]:
    work = tmp_path_factory.mktemp("cli")
    paths = {"fp32": work / "fp32", "stats": work / "stats.npz", "w8": work / "w8", "w8a8": work / "w8a8"}
    run_eqc("export", tiny_hf("llama"), "-o", paths["fp32"])
    run_eqc("calibrate", paths["fp32"], "--data", WIKI_VALID, "--samples", 4, "--seq-len", 64, "-o", paths["stats"])
    run_eqc("compile", paths["fp32"], "--recipe", "w8", "-o", paths["w8"])
    run_eqc("compile", paths["fp32"] / "model.onnx", "--recipe", "w8a8", "--calib", paths["stats"], "-o", paths["w8a8"])
    return paths


def _eval(path: pathlib.Path) -> dict:
    proc = run_eqc("eval", path, "--ppl", WIKI_TEST, "--max-tokens", 512, "--window", 128, "--json")
    return json.loads(proc.stdout)


def test_every_command_has_help() -> None:
    for cmd in ("export", "calibrate", "compile", "eval"):
        proc = run_eqc(cmd, "--help")
        assert "--json" in proc.stdout


def test_artifacts_are_self_contained(pipeline) -> None:
    for name in ("fp32", "w8", "w8a8"):
        folder = pipeline[name]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["format"] == "eqc-artifact"
        assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()
        assert not list(folder.parent.glob(f".{name}.tmp-*")), "staging folder left behind"
    q = json.loads((pipeline["w8a8"] / "manifest.json").read_text())["quantization"]
    assert q["recipe"] == "w8a8" and q["calibration"]["data"]["samples"] == 4


def test_eval_json_and_quantized_quality(pipeline) -> None:
    fp32, w8, w8a8 = (_eval(pipeline[n]) for n in ("fp32", "w8", "w8a8"))
    for r in (fp32, w8, w8a8):
        assert {"ppl", "tokens", "size_bytes"} <= set(r) and r["tokens"] == 4 * 127
        assert np.isfinite(r["ppl"]) and r["latency"]["median_ms"] > 0
    # A random tiny model is near-uniform; quantization must not move it much.
    assert abs(w8["ppl"] / fp32["ppl"] - 1) < 0.01
    assert abs(w8a8["ppl"] / fp32["ppl"] - 1) < 0.05
    assert w8["size_bytes"] < 0.45 * fp32["size_bytes"]


def test_compile_refuses_overwrite_and_says_how(pipeline) -> None:
    proc = run_eqc("compile", pipeline["fp32"], "--recipe", "w8", "-o", pipeline["w8"], check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = run_eqc("compile", pipeline["fp32"], "--recipe", "w8", "-o", pipeline["w8"], "--overwrite", "--json")
    assert json.loads(proc.stdout)["recipe"] == "w8"


def _assert_refused(proc, needle: str, out: pathlib.Path | None = None) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_inputs_exit_2_without_output(pipeline, tmp_path: pathlib.Path, tiny_artifact) -> None:
    out = tmp_path / "out"
    _assert_refused(run_eqc("compile", tmp_path / "missing.onnx", "--recipe", "w8", "-o", out, check=False), "does not exist", out)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an onnx model at all" * 10)
    _assert_refused(run_eqc("compile", junk, "--recipe", "w8", "-o", out, check=False), "ONNX", out)
    truncated = tmp_path / "trunc" / "model.onnx"
    truncated.parent.mkdir()
    truncated.write_bytes((pipeline["fp32"] / "model.onnx").read_bytes()[:5000])
    _assert_refused(run_eqc("compile", truncated, "--recipe", "w8", "-o", out, check=False), "ONNX", out)
    _assert_refused(run_eqc("compile", pipeline["fp32"], "--recipe", "w3-magic", "-o", out, check=False), "unknown recipe", out)
    # statistics from another model (the tiny mistral) are refused
    other_stats = tmp_path / "other.npz"
    run_eqc("calibrate", tiny_artifact("mistral"), "--data", WIKI_VALID, "--samples", 1, "--seq-len", 32, "-o", other_stats)
    _assert_refused(run_eqc("compile", pipeline["fp32"], "--recipe", "w8a8", "--calib", other_stats, "-o", out, check=False),
                    "another model", out)
    _assert_refused(run_eqc("compile", pipeline["fp32"], "--recipe", "w8a8", "-o", out, check=False), "calibration", out)
    stats_out = tmp_path / "s.npz"
    _assert_refused(run_eqc("calibrate", pipeline["fp32"], "--data", tmp_path / "nope.txt", "-o", stats_out, check=False),
                    "does not exist", stats_out)
