"""untie_lm_head (a private lm_head weight) and quantize_activations' per-site dynamic fallback."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from eqcompiler.artifact import folder as am
from eqcompiler.calibration.calibrate import calibrate
from eqcompiler.errors import EqcError
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.runtime.session import causal_feed, make_session

from conftest import WIKI_VALID


def _recipe(folder: pathlib.Path, name: str, passes: list[dict], calibrated: bool = True) -> str:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"name": name, "requires_calibration": calibrated, "passes": passes}))
    return str(path)


def _logits(folder: pathlib.Path, qdq_numerics: bool = False) -> np.ndarray:
    """Logits as ORT runs the artifact; qdq_numerics: with ORT's int8 kernel fusions off, i.e. the
    QDQ graph's own arithmetic (those kernels saturate on x86 without VNNI, see test_reduce_range)."""
    if qdq_numerics:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(am.model_file(am.resolve_artifact(folder))), opts,
                                       providers=["CPUExecutionProvider"])
    else:
        session = make_session(am.model_file(am.resolve_artifact(folder)))
    ids = np.random.default_rng(0).integers(4, 500, (2, 33))
    return session.run(["logits"], causal_feed(session, ids))[0]


@pytest.fixture(scope="module")
def abssum_stats(tiny_artifact, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("fallback-stats") / "stats.npz"
    calibrate(tiny_artifact("llama"), WIKI_VALID, samples=4, seq_len=64, out=out,
              observers="minmax,absmax_channel,abssum")
    return out


def test_untie_is_exact_and_lets_smooth_quant_reach_lm_head(tiny_artifact, abssum_stats, tmp_path):
    src = tiny_artifact("llama")
    out = tmp_path / "untied"
    recipe = _recipe(tmp_path, "untie-smooth", [{"pass": "untie_lm_head", "options": {}},
                                                {"pass": "smooth_quant", "options": {"search": "none"}}])
    manifest = compile_model(src, recipe, out, calib=str(abssum_stats))
    report = manifest["quantization"]["report"]
    untied = report["untie_lm_head"]["untied"]
    assert list(untied) == ["lm_head"]
    k, n = untied["lm_head"]["shape_kn"]
    assert (k, n) == (64, 512)
    assert untied["lm_head"]["int8_mb"] == pytest.approx((k * n + n * 4) / 2**20, abs=0.01)
    # Without untie lm_head is skipped (tied); now it is smoothed through the final norm.
    assert "lm_head" in report["smooth_quant"]["sites"] and "lm_head" not in report["smooth_quant"]["skipped"]
    ref, got = _logits(src), _logits(out)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert not any(n.op_type == "Transpose" and "embed" in (n.input[0] or "") for n in model.graph.node)


def test_untie_without_tied_head_is_an_error_unless_optional(tiny_artifact, tmp_path):
    src = tiny_artifact("llama")
    twice = _recipe(tmp_path, "twice", [{"pass": "untie_lm_head", "options": {}},
                                        {"pass": "untie_lm_head", "options": {}}], calibrated=False)
    with pytest.raises(EqcError, match="no linear layer reading an embedding table"):
        compile_model(src, twice, tmp_path / "x", calib=None)
    assert not (tmp_path / "x").exists()
    ok = _recipe(tmp_path, "twice-ok", [{"pass": "untie_lm_head", "options": {}},
                                        {"pass": "untie_lm_head", "options": {"required": False}}], calibrated=False)
    compile_model(src, ok, tmp_path / "y", calib=None)
    assert (tmp_path / "y" / "model.onnx").is_file()


def _fallback(tiny_artifact, stats: pathlib.Path, tmp_path: pathlib.Path, above: float) -> tuple[dict, pathlib.Path]:
    out = tmp_path / f"fb-{above}"
    recipe = _recipe(tmp_path, f"fb-{above}", [
        {"pass": "quantize_weights", "options": {"bits": 8, "symmetric": True, "block_size": 0}},
        {"pass": "quantize_activations", "options": {"symmetric": True, "dynamic_above": above}}])
    manifest = compile_model(tiny_artifact("llama"), recipe, out, calib=str(stats))
    return manifest["quantization"]["report"]["quantize_activations"], out


def test_dynamic_fallback_selects_by_threshold(tiny_artifact, abssum_stats, tmp_path):
    scores_report, _ = _fallback(tiny_artifact, abssum_stats, tmp_path, 1e9)
    scores = scores_report["step_ratio"]
    assert scores_report["dynamic_fallback"] == 0 and scores_report["static"] == len(scores) == 9
    # Threshold between the 3rd and 4th largest score: exactly the 3 coarsest tensors fall back.
    ranked = sorted(scores.values(), reverse=True)
    threshold = (ranked[2] + ranked[3]) / 2
    report, out = _fallback(tiny_artifact, abssum_stats, tmp_path, threshold)
    assert report["dynamic_fallback"] == 3 and report["static"] == 6
    assert sorted(report["dynamic_tensors"]) == sorted(n for n, v in scores.items() if v > threshold)
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    blocked = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 2]
    assert len(blocked) == 3  # per-token chains carry no zero point
    # Every linear stays int8: each MatMul with a weight reads a DequantizeLinear activation.
    ref = _logits(tiny_artifact("llama"))
    got = _logits(out, qdq_numerics=True)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.1


def test_dynamic_fallback_needs_abssum(tiny_artifact, tmp_path):
    stats = tmp_path / "no_abssum.npz"
    calibrate(tiny_artifact("llama"), WIKI_VALID, samples=2, seq_len=64, out=stats, observers="minmax,absmax_channel")
    with pytest.raises(EqcError, match="'abssum' calibration observer"):
        _fallback(tiny_artifact, stats, tmp_path, 1.0)


def test_untie_skips_a_head_above_the_size_cap(tiny_artifact, tmp_path):
    recipe = _recipe(tmp_path, "capped", [{"pass": "untie_lm_head", "options": {"required": False, "max_int8_mb": 0.01}}],
                     calibrated=False)
    manifest = compile_model(tiny_artifact("llama"), recipe, tmp_path / "c", calib=None)
    report = manifest["quantization"]["report"]["untie_lm_head"]
    assert report["untied"] == {} and "0.03 MB > max_int8_mb 0.01" in report["skipped"]["lm_head"]


def test_inputs_left_float_are_reported(tiny_artifact, abssum_stats, tmp_path):
    """An input excluded from activation quantization is a precision decision: named in the report and warned."""
    recipe = _recipe(tmp_path, "xhead", [
        {"pass": "quantize_weights", "options": {"bits": 8, "symmetric": True, "block_size": 0}},
        {"pass": "quantize_activations", "options": {"symmetric": True, "exclude": "lm_head"}}])
    manifest = compile_model(tiny_artifact("llama"), recipe, tmp_path / "xhead", calib=str(abssum_stats))
    quant = manifest["quantization"]
    report = quant["report"]["quantize_activations"]
    assert report["static"] == 8 and len(report["float_inputs"]) == 1
    assert any("left float" in w and report["float_inputs"][0] in w for w in quant["warnings"])
    full, _ = _fallback(tiny_artifact, abssum_stats, tmp_path, 0.0)
    assert "float_inputs" not in full
