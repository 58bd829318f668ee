"""The real models end to end through ONNX Runtime: SmolLM2-135M (small token budget) and MiniLM."""
from __future__ import annotations

import json
import pathlib

import pytest

from conftest import WIKI_TEST, WIKI_VALID, run_eqc
from eqcompiler.analysis.evaluate import perplexity

TOKENS = 1024  # 2 windows of 512: enough to separate a working quantizer from a broken one


@pytest.fixture(scope="module")
def smollm2_fp32_ppl(smollm2_artifact) -> dict:
    return perplexity(smollm2_artifact, WIKI_TEST, max_tokens=TOKENS)


def test_smollm2_export_is_faithful(smollm2_artifact, smollm2_fp32_ppl) -> None:
    manifest = json.loads((smollm2_artifact / "manifest.json").read_text())
    assert manifest["family"] == "llama" and manifest["kv_cache"]["num_layers"] == 30
    assert manifest["tokenizer"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert manifest["parity"]["prompt"] < 1e-4 and manifest["parity"]["decode"] < 1e-4
    # fp32 perplexity on the first 1024 test tokens; 29.60 at 8192 tokens (brief)
    assert 15 < smollm2_fp32_ppl["ppl"] < 45 and smollm2_fp32_ppl["tokens"] == 2 * 511


def test_smollm2_w8_and_w8a8(smollm2_artifact, smollm2_stats, smollm2_fp32_ppl, tmp_path: pathlib.Path) -> None:
    run_eqc("compile", smollm2_artifact, "--recipe", "w8", "-o", tmp_path / "w8")
    run_eqc("compile", smollm2_artifact, "--recipe", "w8a8", "--calib", smollm2_stats, "-o", tmp_path / "w8a8")
    # Weight-only numerics: by default ORT 1.32 turns DequantizeLinear->MatMul into 8-bit MatMulNBits with
    # int8 activation blocks (accuracy level 4), whose kernels saturate on x86 without VNNI (+0.55% here on
    # an AVX2 host vs -0.16% at level 0); level 0 keeps the float compute the artifact describes.
    w8 = json.loads(run_eqc("eval", tmp_path / "w8", "--ppl", WIKI_TEST, "--max-tokens", TOKENS, "--no-latency", "--json",
                            "--ort-config", "session.qdq_matmulnbits_accuracy_level=0").stdout)
    base = smollm2_fp32_ppl["ppl"]
    assert w8["ppl"] / base - 1 < 0.005, (w8["ppl"], base)
    assert w8["size_bytes"] < 0.27 * smollm2_artifact.joinpath("model.onnx.data").stat().st_size
    w8a8 = perplexity(tmp_path / "w8a8", WIKI_TEST, max_tokens=TOKENS)
    # Unsmoothed per-tensor W8A8 suffers from SmolLM2's outliers (reported, not hidden), but must not collapse
    # the way ORT's own static QDQ does (ppl 112+).
    assert base < w8a8["ppl"] < 3 * base


@pytest.mark.slow
def test_minilm_w8a8_cosine(tmp_path: pathlib.Path) -> None:
    """Issue 4's MiniLM bar: w8a8-smooth >= 0.999 mean cosine on 200 sentences (0.9993 measured), from
    sentence-length calibration windows (framed by [CLS]/[SEP]); plain static w8a8 >= 0.99."""
    # In this process (the CLI's own paths are covered by the tiny models): the model loads once, not five times.
    from eqcompiler.analysis.evaluate import embedding_similarity
    from eqcompiler.calibration.calibrate import calibrate
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.export.hf import export

    fp32, stats = tmp_path / "fp32", tmp_path / "stats.npz"
    export("minilm", fp32)
    calibrate(fp32, WIKI_VALID, samples=256, seq_len=32, out=stats, observers="minmax,absmax_channel,abssum,gram")
    for recipe, bar in (("w8a8", 0.99), ("w8a8-smooth", 0.999)):
        compile_model(fp32, recipe, tmp_path / recipe, calib=str(stats))
        result = embedding_similarity(tmp_path / recipe, fp32, WIKI_TEST, 200)
        assert result["sentences"] == 200
        assert result["mean_cosine"] >= bar, (recipe, result)
