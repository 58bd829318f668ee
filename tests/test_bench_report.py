"""eqc bench / inspect / report on the tiny llama: real fields, real counts, a self-contained HTML page."""
from __future__ import annotations

import base64
import json
import re

import pytest

from conftest import run_eqc


@pytest.fixture(scope="module")
def tiny_set(tiny_artifact, tiny_llama_stats, tmp_path_factory):
    from eqcompiler.compile.pipeline import compile_model

    root = tmp_path_factory.mktemp("bench")
    fp32 = tiny_artifact("llama")
    compile_model(fp32, "w8", root / "w8")
    compile_model(fp32, "w8a8", root / "w8a8", calib=str(tiny_llama_stats))
    compile_model(fp32, "w8a8", root / "w8a8_ort", calib=str(tiny_llama_stats), target="ort-cpu")
    return {"fp32": fp32, "w8": root / "w8", "w8a8": root / "w8a8", "w8a8_ort": root / "w8a8_ort", "stats": tiny_llama_stats}


def test_bench_json_has_every_field(tiny_set):
    proc = run_eqc("bench", tiny_set["fp32"], tiny_set["w8a8"], "--prefill", "32", "--past", "16",
                   "--warmup", "1", "--runs", "3", "--json")
    results = json.loads(proc.stdout)["results"]
    assert len(results) == 2
    for r in results:
        for key in ("model", "size_bytes", "prefill", "decode", "peak_rss_mb", "kv_cache", "threads"):
            assert key in r
        for phase in ("prefill", "decode"):
            t = r[phase]
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["runs"] == 3 and t["warmup"] == 1
            assert t["tokens_per_s"] > 0
        assert r["prefill"]["tokens"] == 32 and r["decode"]["past"] == 16
        assert r["peak_rss_mb"] > 0 and r["threads"] == 2
        # tiny llama: 2 layers x K,V x 2 kv heads x head_dim 16 x float32
        assert r["kv_cache"] == {"dtype": "float32", "bits": 32, "bytes_per_token": 2 * 2 * 2 * 16 * 4}
    assert results[1]["size_bytes"] < results[0]["size_bytes"]


def test_bench_text_table_and_bad_input(tiny_set, tmp_path):
    proc = run_eqc("bench", tiny_set["fp32"], "--prefill", "8", "--past", "8", "--warmup", "0", "--runs", "1")
    assert "decode ms" in proc.stdout and "1 timed runs" in proc.stdout.replace("+ 1 timed", "1 timed")
    bad = run_eqc("bench", tmp_path / "missing", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_inspect_counts_on_tiny_w8a8(tiny_set):
    r = json.loads(run_eqc("inspect", tiny_set["w8a8"], "--json").stdout)
    assert r["linear_layers"] == 15 and r["quantized_matmuls"] == 15
    assert r["activation_quantization"] == {"static-per-tensor-uint8": 15}
    assert r["layer_summary"] == {"w8 per-channel / act static-per-tensor-uint8": 15}
    assert r["op_counts"]["MatMul"] == 19  # 15 linear + 4 attention
    # 15 weight DQs + 1 embedding-row DQ + one DQ per distinct activation (q/k/v share, gate/up share: 4 per layer + lm_head)
    assert r["op_counts"]["DequantizeLinear"] == 15 + 1 + 9
    assert r["op_counts"]["QuantizeLinear"] == 9
    assert r["kv_cache"]["dtype"] == "float32" and not r["kv_cache"]["quantized"]
    # int8 codes, or the same codes as uint8 + 128 (encode_int8_as_uint8 auto on x86 without VNNI)
    assert {"int8", "uint8"} & set(r["size_by_precision"])
    low = json.loads(run_eqc("inspect", tiny_set["w8a8_ort"], "--json").stdout)
    assert low["op_counts"]["com.microsoft::MatMulIntegerToFloat"] == 15
    assert low["layer_summary"] == {"w8 per-channel / act static-per-tensor-uint8 (com.microsoft::MatMulIntegerToFloat)": 15}
    w8 = json.loads(run_eqc("inspect", tiny_set["w8"], "--json").stdout)
    assert w8["activation_quantization"] == {"none": 15}


def test_report_is_self_contained_with_figures_and_table(tiny_set, wiki_test, tmp_path):
    out = tmp_path / "r.html"
    proc = run_eqc("report", out, "--models", f"{tiny_set['fp32']},{tiny_set['w8']}", "--models", tiny_set["w8a8"],
                   "--calib", tiny_set["stats"], "--ppl", wiki_test, "--ppl-tokens", "256",
                   "--prefill", "8", "--past", "8", "--runs", "1", "--json")
    summary = json.loads(proc.stdout)
    text = out.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    # 3 histograms (q_proj, down_proj, lm_head) + error plot + calibration overview + 2 channel plots
    assert len(images) == summary["figures"] == 7
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "http://" not in text and "https://" not in text  # nothing fetched
    rows = summary["rows"]
    assert [r["label"] for r in rows] == ["fp32", "w8", "w8a8"]
    assert all(r["ppl"] > 1 for r in rows) and all(r["decode_ms"] > 0 for r in rows)
    assert f"{rows[1]['ppl']:.3f}" in text and "<table>" in text and "perplexity" in text
    again = run_eqc("report", out, "--models", tiny_set["fp32"], check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
