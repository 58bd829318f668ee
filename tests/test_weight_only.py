"""Weight-only RTN / AWQ / GPTQ (int4 and int8, blocked), MatMulNBits lowering, w4 recipes."""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from eqcompiler.errors import EqcError
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.passes.awq import AwqPass
from eqcompiler.compile.qdq import output_error
from eqcompiler.passes.gptq import GptqPass, gptq_quantize, quantize_kn
from eqcompiler.passes.lower_matmul_nbits import LowerMatMulNBitsPass, to_matmul_nbits
from eqcompiler.passes.quantize_weights import QuantizeWeightsPass
from eqcompiler.calibration.stats import CalibrationStats, TensorStats

K, N, T = 192, 48, 1024


def _inputs(seed: int = 0, outliers: bool = False, correlated: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, K))
    if correlated:
        x = x @ (np.eye(K) + 0.4 * rng.normal(size=(K, K)) / np.sqrt(K)) + rng.normal(size=(T, 1)) * 0.8
    if outliers:
        x[:, [5, 70, 150]] *= 30.0
    return x.astype(np.float32)


def _weight(seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(K, N)) * 0.05).astype(np.float32)


def _stats(name: str, x: np.ndarray, gram: bool = True) -> CalibrationStats:
    x64 = x.astype(np.float64).reshape(-1, x.shape[-1])
    extra = {"abssum_channel": np.abs(x64).sum(axis=0)}
    if gram:
        extra.update(gram=x64.T @ x64, gram_rows=np.array(x64.shape[0], np.int64))
    t = TensorStats(min=float(x.min()), max=float(x.max()), absmax_channel=np.abs(x).max(axis=0).astype(np.float32),
                    count=int(x.size), extra=extra)
    return CalibrationStats(meta={"model_fingerprint": "synthetic"}, tensors={name: t})


def _graph(w: np.ndarray, norm: np.ndarray | None = None) -> ir.Model:
    """y = (x_in [* norm]) @ W: a linear layer, optionally after a Mul by a norm weight (AWQ folds into it)."""
    x_in = ir.Value(name="x_in", shape=ir.Shape(["T", K]), type=ir.TensorType(ir.DataType.FLOAT))
    w_val = ir.Value(name="layer.weight_t", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(w, name="layer.weight_t"))
    nodes, inits, x = [], [w_val], x_in
    if norm is not None:
        n_val = ir.Value(name="norm.weight", shape=ir.Shape([K]), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(norm, name="norm.weight"))
        inits.append(n_val)
        mul = ir.node("Mul", [x_in, n_val], name="/norm/Mul")
        mul.outputs[0].name = "x"
        nodes.append(mul)
        x = mul.outputs[0]
    else:
        x_in.name = "x"
    mm = ir.node("MatMul", [x, w_val], name="/layer/MatMul")
    mm.outputs[0].name, mm.outputs[0].dtype = "y", ir.DataType.FLOAT
    mm.outputs[0].shape = ir.Shape(["T", w.shape[1]])
    nodes.append(mm)
    graph = ir.Graph([x_in], [mm.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    # ORT 1.32 fuses DQ(blocked)->MatMul into MatMulNBits with accuracy_level 4 (int8 activations)
    # unless told otherwise; level 0 keeps float compute, so the numerics are the QDQ graph's.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {sess.get_inputs()[0].name: x})[0]


def _apply(pass_cls, model: ir.Model, stats: CalibrationStats | None = None, **options) -> CompileContext:
    ctx = CompileContext(stats=stats)
    pass_cls(ctx, **options)(model)
    return ctx


def _out_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(((y.astype(np.float64) - ref) ** 2).sum())


CONFIGS = [(4, True, 32), (4, False, 32), (4, True, 64), (4, False, 128), (4, True, 128), (8, True, 128), (8, False, 64)]


@pytest.mark.parametrize("bits,symmetric,block", CONFIGS)
def test_rtn_blocked_dequantize_matches_numpy(bits, symmetric, block):
    """ORT's opset-21 blocked DequantizeLinear (int4/uint4/int8/uint8, packed) == numpy dequantize."""
    w, x = _weight(), _inputs(correlated=False)
    model = _graph(w)
    _apply(QuantizeWeightsPass, model, bits=bits, symmetric=symmetric, block_size=block, embeddings=False)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].const_value.dtype == {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4,
                                              (8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8}[(bits, symmetric)]
    assert dq.attributes.get_int("block_size") == block
    expect = x @ quantize_kn(w, bits, symmetric, block).dequantize()
    np.testing.assert_allclose(_run(model, x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,symmetric,block", CONFIGS + [(4, False, 0), (8, True, 0)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, symmetric, block):
    w, x = _weight(), _inputs()
    stats = _stats("x", x)
    gram = stats.get("x").extra["gram"]
    rtn = output_error(quantize_kn(w, bits, symmetric, block).dequantize() - w, gram)
    model = _graph(w)
    ctx = _apply(GptqPass, model, stats, bits=bits, symmetric=symmetric, block_size=block)
    qw = gptq_quantize(w, gram, T, bits, symmetric, block)
    gptq = output_error(qw.dequantize() - w, gram)
    assert gptq < 0.7 * rtn, (gptq, rtn)
    # The emitted graph computes exactly x @ dequantize(qw) in ORT.
    np.testing.assert_allclose(_run(model, x), x @ qw.dequantize(), rtol=1e-4, atol=1e-4)
    report = ctx.report["gptq"]["layers"]["layer"]
    assert report["relative_output_error"] == pytest.approx(gptq / output_error(w, gram), rel=2e-3)


def test_gptq_act_order_keeps_static_groups():
    w, x = _weight(), _inputs(outliers=True)
    stats = _stats("x", x)
    gram = stats.get("x").extra["gram"]
    model = _graph(w)
    _apply(GptqPass, model, stats, bits=4, symmetric=False, block_size=64, act_order=True)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes.get_int("block_size") == 64 and dq.inputs[1].shape == ir.Shape([K // 64, N])
    y = _run(model, x)
    rtn = output_error(quantize_kn(w, 4, False, 64).dequantize() - w, gram)
    assert _out_err(y, x.astype(np.float64) @ w) < 0.7 * rtn


@pytest.mark.parametrize("bits,symmetric,block", [(4, False, 128), (4, True, 32), (8, True, 64)])
def test_awq_not_worse_than_rtn_with_outlier_channels(bits, symmetric, block):
    w, x_in = _weight(), _inputs(outliers=True, correlated=False)
    norm = np.random.default_rng(3).uniform(0.5, 1.5, K).astype(np.float32)
    x = x_in * norm
    ref = x.astype(np.float64) @ w
    stats = _stats("x", x)
    rtn_model = _graph(w, norm)
    _apply(QuantizeWeightsPass, rtn_model, bits=bits, symmetric=symmetric, block_size=block, embeddings=False)
    awq_model = _graph(w, norm)
    ctx = _apply(AwqPass, awq_model, stats, bits=bits, symmetric=symmetric, block_size=block)
    info = ctx.report["awq"]["layers"]["layer"]
    assert info["scale_folded"] and info["alpha"] > 0  # the outlier channels were protected
    norm_after = next(n for n in awq_model.graph if n.op_type == "Mul").inputs[1].const_value.numpy()
    assert not np.allclose(norm_after, norm)  # 1/s went into the norm weight
    e_rtn = _out_err(_run(rtn_model, x_in), ref)
    e_awq = _out_err(_run(awq_model, x_in), ref)
    assert e_awq <= e_rtn, (e_awq, e_rtn)
    if bits == 4:
        assert e_awq < 0.8 * e_rtn


def test_awq_without_foldable_producer_only_clips():
    w, x = _weight(), _inputs(outliers=True)
    stats = _stats("x", x)
    model = _graph(w)  # x is a graph input: nothing to fold 1/s into
    ctx = _apply(AwqPass, model, stats, bits=4, symmetric=False, block_size=64)
    info = ctx.report["awq"]["layers"]["layer"]
    assert not info["scale_folded"] and info["alpha"] is None
    rtn = output_error(quantize_kn(w, 4, False, 64).dequantize() - w, stats.get("x").extra["gram"])
    assert _out_err(_run(model, x), x.astype(np.float64) @ w) <= rtn * (1 + 1e-6)


def test_missing_observers_are_named():
    w, x = _weight(), _inputs()
    stats = _stats("x", x, gram=False)
    with pytest.raises(EqcError, match="'gram' observer"):
        _apply(GptqPass, _graph(w), stats)
    no_abs = _stats("x", x)
    del no_abs.get("x").extra["abssum_channel"]
    with pytest.raises(EqcError, match="'abssum' observer"):
        _apply(AwqPass, _graph(w, np.ones(K, np.float32)), no_abs)
    with pytest.raises(EqcError, match="needs calibration statistics"):
        GptqPass(CompileContext())


def test_gptq_missing_gram_skip_leaves_layer_for_rtn():
    """missing_gram='skip': the layer stays float for the next weight pass, and the compile says so."""
    w, x = _weight(), _inputs()
    model = _graph(w)
    ctx = _apply(GptqPass, model, _stats("x", x, gram=False), bits=8, symmetric=True, block_size=0, missing_gram="skip")
    report = ctx.report["gptq"]
    assert report["skipped_without_gram"] == ["layer"] and report["layers"] == {}
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph)
    assert any("no 'gram' statistics for 1 layer" in w for w in ctx.warnings)
    with pytest.raises(EqcError, match="missing_gram must be"):
        _apply(GptqPass, _graph(w), _stats("x", x), missing_gram="maybe")


@pytest.mark.parametrize("bits,symmetric,block,k", [(4, False, 32, K), (4, True, 128, K), (4, False, 128, 200),
                                                    (8, True, 64, K), (8, False, 32, 100)])
def test_lower_matmul_nbits_matches_qdq(bits, symmetric, block, k):
    rng = np.random.default_rng(7)
    w = (rng.normal(size=(k, N)) * 0.05).astype(np.float32)
    x = rng.normal(size=(5, k)).astype(np.float32)
    global K
    k_saved, K = K, k
    try:
        model = _graph(w)
    finally:
        K = k_saved
    _apply(QuantizeWeightsPass, model, bits=bits, symmetric=symmetric, block_size=block, embeddings=False)
    y_qdq = _run(model, x)
    ctx = _apply(LowerMatMulNBitsPass, model)
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    assert ctx.report["lower_matmul_nbits"]["count"] == 1
    y_nbits = _run(model, x)
    np.testing.assert_allclose(y_nbits, y_qdq, rtol=1e-4, atol=1e-4)


def test_matmul_nbits_packing_layout():
    q = np.arange(32, dtype=np.int8).reshape(16, 2) % 16  # uint4 values, K=16, N=2
    packed, scales, zps = to_matmul_nbits(q.astype(np.uint8), np.ones((1, 2), np.float32),
                                          np.full((1, 2), 3, np.uint8), 4, False, 16)
    assert packed.shape == (2, 1, 8) and scales.shape == (2, 1) and zps.shape == (2, 1)
    assert packed[0, 0, 0] == (q[0, 0] | (q[1, 0] << 4)) and zps[0, 0] == 3
    _, _, none = to_matmul_nbits(np.zeros((16, 2), np.int8), np.ones((1, 2), np.float32), None, 4, True, 16)
    assert none is None  # signed weights use the op's default zero point


def test_lower_matmul_nbits_refuses_graph_without_blocked_weights():
    model = _graph(_weight())
    with pytest.raises(EqcError, match="matched no layer"):
        _apply(LowerMatMulNBitsPass, model)


# ------------------------------------------------------------------------------------------------
# Recipes on the tiny llama and on SmolLM2.

@pytest.fixture(scope="module")
def tiny_gram_stats(tiny_artifact, wiki_valid, tmp_path_factory) -> pathlib.Path:
    from eqcompiler.calibration.calibrate import calibrate

    out = tmp_path_factory.mktemp("wo-stats") / "tiny_gram.npz"
    calibrate(tiny_artifact("llama"), wiki_valid, samples=4, seq_len=64, out=out, observers="minmax,gram,abssum")
    return out


@pytest.mark.parametrize("recipe", ["w4-rtn", "w4-awq", "w4-gptq"])
def test_w4_recipes_compile_tiny_llama(recipe, tiny_artifact, tiny_gram_stats, wiki_test, tmp_path):
    from eqcompiler.analysis.evaluate import perplexity
    from eqcompiler.compile.pipeline import compile_model

    src = tiny_artifact("llama")
    out = tmp_path / recipe
    manifest = compile_model(src, recipe, out, calib=str(tiny_gram_stats) if recipe != "w4-rtn" else None)
    onnx.checker.check_model(str(out / "model.onnx"))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dtypes = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.UINT4 in dtypes  # asymmetric int4 weights
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 128 for a in n.attribute)]
    assert len(blocked) == 2 * 7  # every projection of both layers
    assert "quantization" in manifest
    base = perplexity(src, wiki_test, max_tokens=1024, window=64)["ppl"]
    ppl = perplexity(out, wiki_test, max_tokens=1024, window=64)["ppl"]
    assert np.isfinite(ppl) and ppl < base * 1.5


def test_w8a8_smooth_uses_gptq_when_grams_exist(tiny_artifact, wiki_valid, wiki_test, tmp_path):
    """w8a8-smooth's GPTQ step quantizes every smoothed linear from the (smoothing-adjusted) Grams; the
    quantize_weights step then has only the embedding table left."""
    from eqcompiler.calibration.calibrate import calibrate
    from eqcompiler.analysis.evaluate import perplexity
    from eqcompiler.compile.pipeline import compile_model

    src = tiny_artifact("llama")
    stats = tmp_path / "stats.npz"
    calibrate(src, wiki_valid, samples=4, seq_len=64, out=stats, observers="minmax,absmax_channel,abssum,gram")
    out = tmp_path / "smooth"
    manifest = compile_model(src, "w8a8-smooth", out, calib=str(stats))
    report = manifest["quantization"]["report"]
    assert len(report["gptq"]["layers"]) == 2 * 7 and report["gptq"]["skipped_without_gram"] == []
    assert all(v["relative_output_error"] < 1e-3 for v in report["gptq"]["layers"].values())
    assert not any("gram" in w for w in manifest["quantization"].get("warnings", []))
    base = perplexity(src, wiki_test, max_tokens=1024, window=64)["ppl"]
    ppl = perplexity(out, wiki_test, max_tokens=1024, window=64)["ppl"]
    assert np.isfinite(ppl) and ppl < base * 1.05


def test_w4_gptq_lowered_to_matmul_nbits_tiny_llama(tiny_artifact, tiny_gram_stats, tmp_path):
    from eqcompiler.runtime import session as runtime
    from eqcompiler.compile.pipeline import compile_model

    src = tiny_artifact("llama")
    qdq, low = tmp_path / "qdq", tmp_path / "nbits"
    compile_model(src, "w4-gptq", qdq, calib=str(tiny_gram_stats))
    compile_model(src, "w4-gptq", low, calib=str(tiny_gram_stats),
                  extra_steps=[{"pass": "lower_matmul_nbits", "options": {}}])
    ops = [n.op_type for n in onnx.load(str(low / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 14
    ids = np.arange(3, 40, dtype=np.int64)[None, :]
    outs = []
    for folder in (qdq, low):
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float QDQ reference
        sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(["logits"], runtime.causal_feed(sess, ids))[0])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-3)


def test_smollm2_gptq_beats_rtn(smollm2_artifact, wiki_valid, wiki_test, tmp_path_factory):
    """Real model, 2 test windows: GPTQ int4 g128 loses clearly less than RTN on the same layers.

    Restricted to the MLPs of the first six layers so the suite stays within CI's time budget
    (full-model GPTQ takes minutes on 2 cores; tools/bench_accuracy.py measures it).
    """
    import json

    from eqcompiler.calibration.calibrate import calibrate
    from eqcompiler.analysis.evaluate import perplexity
    from eqcompiler.compile.pipeline import compile_model

    base = tmp_path_factory.mktemp("smol-w4")
    stats = base / "gram.npz"
    calibrate(smollm2_artifact, wiki_valid, samples=4, seq_len=512, out=stats, observers="minmax,gram,abssum")
    subset = r"layers\.[0-5]\.mlp"
    steps = {"rtn": {"pass": "quantize_weights", "options": {"bits": 4, "symmetric": False, "block_size": 128,
                                                              "include": subset, "embeddings": False}},
             "gptq": {"pass": "gptq", "options": {"bits": 4, "symmetric": False, "block_size": 128, "include": subset}}}
    fp32 = perplexity(smollm2_artifact, wiki_test, max_tokens=1024)["ppl"]
    ppl = {}
    for name, step in steps.items():
        recipe = base / f"{name}.json"
        recipe.write_text(json.dumps({"name": name, "passes": [step]}))
        out = base / name
        compile_model(smollm2_artifact, str(recipe), out, calib=str(stats) if name == "gptq" else None)
        ppl[name] = perplexity(out, wiki_test, max_tokens=1024)["ppl"]
    assert ppl["rtn"] > fp32 and ppl["gptq"] < ppl["rtn"], ppl
    assert ppl["gptq"] - fp32 < 0.75 * (ppl["rtn"] - fp32), (fp32, ppl)
