"""Per-token dynamic activations: graph matches numpy, recipes compile and run, SmolLM2 accuracy."""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from eqcompiler.artifact import folder as am
from eqcompiler.analysis.evaluate import perplexity
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.passes.quantize_activations_dynamic import QuantizeActivationsDynamicPass, per_token_reference
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.runtime.session import causal_feed, make_session

from conftest import WIKI_TEST


def _synthetic(k: int = 16, n: int = 5) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(k, n)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([2, 3, k]), type=ir.TensorType(ir.DataType.FLOAT))
    vals = [ir.Value(name=nm, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(a, name=nm)) for nm, a in (("w1", w1), ("w2", w2))]
    m1 = ir.node("MatMul", [x, vals[0]], name="/l/q_proj/MatMul")
    m2 = ir.node("MatMul", [x, vals[1]], name="/l/k_proj/MatMul")
    for i, node in enumerate((m1, m2)):
        node.outputs[0].name, node.outputs[0].dtype = f"y{i}", ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape([2, 3, n])
    graph = ir.Graph([x], [m1.outputs[0], m2.outputs[0]], nodes=[m1, m2], initializers=vals,
                     opset_imports={"": 21}, name="synthetic")
    return ir.Model(graph, ir_version=10), w1, w2


def test_dynamic_pattern_matches_numpy_per_token_reference():
    model, w1, w2 = _synthetic()
    QuantizeActivationsDynamicPass(CompileContext())(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") == 1  # one chain shared by both linears
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    assert q.attributes.get_int("block_size") == 16 and len(q.inputs) == 2  # no zero point input
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32)
    x[0, 1, 4] = 50.0  # an outlier only affects its own token's scale
    x[1, 2] = 0.0  # an all-zero row stays exact thanks to the scale floor
    y1, y2 = make_session(proto.SerializeToString()).run(None, {"x": x})
    qr, sr = per_token_reference(x)
    xq = qr.astype(np.float32) * sr
    np.testing.assert_allclose(y1, xq @ w1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, xq @ w2, rtol=1e-5, atol=1e-5)
    assert np.abs(xq - x).max() <= sr.max() / 2 + 1e-6
    assert np.abs(xq[0, 0] - x[0, 0]).max() < 0.05  # token 0's scale is not hurt by token 1's outlier
    assert not y1[1, 2].any()


@pytest.fixture(scope="module")
def tiny_llama_abssum_stats(tiny_artifact, tmp_path_factory):
    """w8a8-smooth's dynamic fallback reads the abssum observer."""
    from eqcompiler.calibration.calibrate import calibrate
    from conftest import WIKI_VALID

    out = tmp_path_factory.mktemp("abssum") / "stats.npz"
    calibrate(tiny_artifact("llama"), WIKI_VALID, samples=4, seq_len=64, out=out, observers="minmax,absmax_channel,abssum")
    return out


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "zeroquant", "w8a8-smooth"])
def test_recipes_compile_tiny_llama(recipe, tiny_artifact, tiny_llama_stats, tiny_llama_abssum_stats, tmp_path):
    src = tiny_artifact("llama")
    out = tmp_path / recipe
    stats = tiny_llama_abssum_stats if recipe == "w8a8-smooth" else tiny_llama_stats
    manifest = compile_model(src, recipe, out, calib=str(stats))
    onnx.checker.check_model(str(out / "model.onnx"))
    ids = np.random.default_rng(0).integers(4, 500, (1, 24))
    def logits(folder: pathlib.Path) -> np.ndarray:
        session = make_session(am.model_file(am.resolve_artifact(folder)))
        return session.run(["logits"], causal_feed(session, ids))[0]
    ref, got = logits(src), logits(out)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < rel < 0.2
    passes = [p["pass"] for p in manifest["quantization"]["passes"]]
    assert ("smooth_quant" in passes) == (recipe != "zeroquant")


def test_smollm2_w8a8_dynamic_ppl_close_to_fp32(smollm2_artifact, smollm2_w8a8_dynamic):
    """SmoothQuant + per-token int8 on SmolLM2. Measured on these 2 test windows: fp32 20.465,
    w8a8-dynamic 20.532 (+0.33%; 1-window alpha search: 20.502, but +0.59% vs +0.42% on 16 windows: see
    tools/results/accuracy_8bit.md); without the
    smoothing 21.203 (+3.6%). The bound leaves a margin for the fixture's 8-window statistics."""
    out = smollm2_w8a8_dynamic
    manifest = am.resolve_artifact(out).manifest
    report = manifest["quantization"]["report"]["smooth_quant"]
    assert len(report["sites"]) == 120  # q/k/v, gate/up, down, o in 30 layers
    assert list(report["skipped"]) == ["lm_head"]  # tied to the embedding table
    base = perplexity(smollm2_artifact, WIKI_TEST, max_tokens=1024)
    got = perplexity(out, WIKI_TEST, max_tokens=1024)
    assert base["windows"] == got["windows"] == 2
    # Two windows are noisy enough that the quantized model can score slightly better (20.430 in one run).
    assert got["ppl"] != base["ppl"] and abs(got["ppl"] / base["ppl"] - 1) <= 0.007, (got["ppl"], base["ppl"])
