"""Quantized KV cache on top of weight-only and smoothed recipes, in one artifact (issue 6)."""
from __future__ import annotations

import json
import pathlib

import pytest

from conftest import WIKI_TEST, WIKI_VALID, run_eqc


@pytest.fixture(scope="module")
def kv_stats(tiny_artifact, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("combo") / "stats.npz"
    run_eqc("calibrate", tiny_artifact("llama"), "--data", WIKI_VALID, "--samples", 4, "--seq-len", 64,
            "--observers", "minmax,absmax_channel,gram,abssum,kv", "-o", out)
    return out


def _chunked_ppl(model: pathlib.Path) -> float:
    proc = run_eqc("eval", model, "--ppl", WIKI_TEST, "--max-tokens", 512, "--window", 128, "--chunk", 32,
                   "--no-latency", "--json")
    return json.loads(proc.stdout)["ppl"]


@pytest.mark.parametrize("recipe", ["w4-rtn", "w4-gptq", "w8a8-smooth"])
def test_recipe_with_int8_kv_cache(recipe: str, tiny_artifact, kv_stats, tmp_path: pathlib.Path) -> None:
    fp32 = tiny_artifact("llama")
    out = tmp_path / recipe
    run_eqc("compile", fp32, "--recipe", recipe, "--calib", kv_stats, "--kv-bits", 8, "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"] == recipe
    kv = manifest["kv_cache"]["quantized"]
    assert kv["bits"] == 8 and kv["key"]["granularity"] == "channel" and kv["value"]["granularity"] == "token"
    assert manifest["kv_cache"]["bytes_per_token"] < 0.6 * manifest["kv_cache"]["fp16_bytes_per_token"]
    base, got = _chunked_ppl(fp32), _chunked_ppl(out)
    assert abs(got / base - 1) < 0.02, (recipe, base, got)
