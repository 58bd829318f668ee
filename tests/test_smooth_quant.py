"""SmoothQuant folding: exact in float, smaller channel outliers, correct adjusted statistics."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from eqcompiler.artifact import folder as am
from eqcompiler.calibration.calibrate import calibrate
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.runtime.session import causal_feed, make_session
from eqcompiler.calibration.stats import CalibrationStats, TensorStats
from eqcompiler.passes.smooth_quant import SmoothQuantPass

from conftest import WIKI_VALID


def _smooth_recipe(tmp_path: pathlib.Path, **options) -> str:
    path = tmp_path / "smooth.json"
    path.write_text(json.dumps({"name": "smooth-only", "requires_calibration": True,
                                "passes": [{"pass": "smooth_quant", "options": options}]}))
    return str(path)


def _logits(folder: pathlib.Path, task: str) -> np.ndarray:
    session = make_session(am.model_file(am.resolve_artifact(folder)))
    ids = np.random.default_rng(0).integers(4, 500, (2, 33))
    if task == "encoder":
        return session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                  "token_type_ids": np.zeros_like(ids)})[0]
    return session.run(["logits"], causal_feed(session, ids))[0]


@pytest.fixture(scope="module")
def smoothed_llama(tiny_artifact, tiny_llama_stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("sq") / "llama"
    manifest = compile_model(tiny_artifact("llama"), _smooth_recipe(out.parent), out, calib=str(tiny_llama_stats))
    return out, manifest["quantization"]["report"]["smooth_quant"]


def test_llama_smoothing_is_exact_in_float(tiny_artifact, smoothed_llama):
    out, report = smoothed_llama
    kinds = sorted({site["kind"] for site in report["sites"].values()})
    assert kinds == ["attn", "mlp", "norm"]  # q/k/v + gate/up via RMSNorm, down via up_proj, o via v (GQA tied)
    assert len(report["sites"]) == 8
    assert list(report["skipped"]) == ["lm_head"] and "shared" in report["skipped"]["lm_head"]  # tied to embeddings
    ref, got = _logits(tiny_artifact("llama"), "causal-lm"), _logits(out, "causal-lm")
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    onnx.checker.check_model(str(out / "model.onnx"))


def test_llama_smoothing_reduces_channel_outliers_and_adjusts_stats(smoothed_llama, tiny_llama_stats, tmp_path):
    out, report = smoothed_llama
    for site in report["sites"].values():
        if site["alpha"] is not None:
            assert site["channel_max_ratio_after"] < site["channel_max_ratio_before"]
    # Recalibrating the smoothed model measures what the pass predicted for X/s.
    fresh = calibrate(out, WIKI_VALID, samples=4, seq_len=64)
    original = CalibrationStats.load(tiny_llama_stats)
    for name in {site["tensor"] for site in report["sites"].values()}:
        measured = fresh.get(name).absmax_channel
        before = original.get(name).absmax_channel
        ratio_measured = measured.max() / np.median(measured)
        assert ratio_measured <= before.max() / np.median(before) + 1e-6 or np.allclose(measured, before)


def test_adjusted_stats_match_smoothed_model(tiny_artifact, tiny_llama_stats, tmp_path):
    """The stats the pass leaves in the context equal a fresh calibration of the smoothed graph."""
    src = tiny_artifact("llama")
    stats = CalibrationStats.load(tiny_llama_stats)
    before = {n: t.absmax_channel.copy() for n, t in stats.tensors.items()}
    context = CompileContext(stats=stats, manifest=dict(am.resolve_artifact(src).manifest), source_folder=str(src))
    model = am.load_ir(am.model_file(am.resolve_artifact(src)))
    SmoothQuantPass(context, search="none", alpha=0.5)(model)
    out = tmp_path / "smoothed"
    out.mkdir()
    am.save_ir(model, out)
    (out / "manifest.json").write_text((src / "manifest.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (out / f).write_bytes((src / f).read_bytes())
    fresh = calibrate(out, WIKI_VALID, samples=4, seq_len=64)
    changed = 0
    for name in context.report["smooth_quant"]["stats_adjusted"]:
        adjusted = stats.get(name)
        np.testing.assert_allclose(fresh.get(name).absmax_channel, adjusted.absmax_channel, rtol=1e-3, atol=1e-5)
        assert adjusted.max == pytest.approx(float(adjusted.absmax_channel.max()))
        changed += not np.allclose(before[name], adjusted.absmax_channel)
    assert changed >= 8


def test_bert_smoothing_exact_and_skips_residual_norms(tiny_artifact, tmp_path):
    src = tiny_artifact("bert")
    stats = tmp_path / "bert.npz"
    calibrate(src, WIKI_VALID, samples=2, seq_len=64, out=stats)
    out = tmp_path / "bert-smooth"
    manifest = compile_model(src, _smooth_recipe(tmp_path), out, calib=str(stats))
    report = manifest["quantization"]["report"]["smooth_quant"]
    # Post-LN BERT: every LayerNorm output also feeds the residual Add, so only o_proj (via value) folds.
    assert {s["kind"] for s in report["sites"].values()} == {"attn"}
    assert any("also feeds Add" in why for why in report["skipped"].values())
    ref, got = _logits(src, "encoder"), _logits(out, "encoder")
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_bert_compensated_smoothing_reaches_post_ln_inputs(tiny_artifact, tmp_path):
    src = tiny_artifact("bert")
    stats = tmp_path / "bert.npz"
    calibrate(src, WIKI_VALID, samples=2, seq_len=64, out=stats)
    out = tmp_path / "bert-smooth-comp"
    manifest = compile_model(src, _smooth_recipe(tmp_path, compensate_other_consumers=True), out, calib=str(stats))
    report = manifest["quantization"]["report"]["smooth_quant"]
    norm_sites = [s for s in report["sites"].values() if s["kind"] == "norm"]
    # q/k/v (embedding LN / previous block's output LN) and intermediate (attention output LN) per layer
    assert len(norm_sites) == 2 * 2 and all(s["compensated"] for s in norm_sites)
    ref, got = _logits(src, "encoder"), _logits(out, "encoder")
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_gram_score_picks_the_alpha_the_sampled_score_picks():
    """search='gram' scores alpha from X^T X alone (weight error exact, activation rounding as uniform noise).
    On rows with outlier channels (and without) it picks the same alpha as the row-level int8 simulation
    that search='ort'/'sample' runs, and its error estimate stays within 10% of the simulated one."""
    from eqcompiler.passes.smooth_quant import score_gram, score_ort

    grid = np.round(np.arange(0.0, 1.01, 0.1), 2)
    for seed, outlier in [(0, 20.0), (1, 60.0), (2, 5.0), (3, 1.0)]:
        rng = np.random.default_rng(seed)
        k, n, rows = 64, 48, 2048
        x = rng.normal(size=(rows, k)).astype(np.float32)
        x[:, rng.choice(k, 3, replace=False)] *= outlier
        w = (rng.normal(size=(k, n)) * 0.05).astype(np.float32)
        gram = x.astype(np.float64).T @ x
        x_absmax, w_absmax = np.abs(x).max(axis=0), np.abs(w).max(axis=1)
        simulated, estimated = [], []
        for alpha in grid:
            s = (x_absmax ** alpha / w_absmax ** (1 - alpha)).astype(np.float32)
            simulated.append(score_ort(x, w, s, x_absmax, 0, x @ w))
            estimated.append(score_gram(gram, rows, w, s, x_absmax, 0))
        assert np.argmin(estimated) == np.argmin(simulated), (seed, simulated, estimated)
        np.testing.assert_allclose(estimated, simulated, rtol=0.1)


def test_gram_search_without_gram_names_the_observer(tiny_artifact, tiny_llama_stats, tmp_path):
    """search='gram' needs the gram observer: without it the error names the observer."""
    from eqcompiler.errors import EqcError

    src = tiny_artifact("llama")
    stats = CalibrationStats.load(tiny_llama_stats)
    context = CompileContext(stats=stats, manifest=dict(am.resolve_artifact(src).manifest))
    model = am.load_ir(am.model_file(am.resolve_artifact(src)))
    with pytest.raises(EqcError, match="gram"):
        SmoothQuantPass(context, search="gram")(model)


def _synthetic(residual: bool) -> ir.Model:
    """x -> RMS-style Mul(gamma) -> two MatMuls (and optionally a residual Add on the normed value)."""
    rng = np.random.default_rng(1)
    k, n = 8, 6
    x = ir.Value(name="x", shape=ir.Shape([4, k]), type=ir.TensorType(ir.DataType.FLOAT))
    def const(name, arr):
        return ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(arr.astype(np.float32), name=name))
    gamma, w1, w2 = const("gamma", rng.uniform(0.5, 2, k)), const("w1", rng.normal(size=(k, n))), const("w2", rng.normal(size=(k, n)))
    mul = ir.node("Mul", [x, gamma], name="/norm/Mul")
    m1 = ir.node("MatMul", [mul.outputs[0], w1], name="/layers.0/q_proj/MatMul")
    m2 = ir.node("MatMul", [mul.outputs[0], w2], name="/layers.0/k_proj/MatMul")
    nodes = [mul, m1, m2]
    outs = [m1.outputs[0], m2.outputs[0]]
    if residual:
        add = ir.node("Add", [mul.outputs[0], x], name="/residual/Add")
        nodes.append(add)
        outs.append(add.outputs[0])
    mul.outputs[0].name = "normed"
    for i, o in enumerate(outs):
        o.name = f"y{i}"
        o.dtype = ir.DataType.FLOAT
        o.shape = ir.Shape([4, n if i < 2 else k])
    graph = ir.Graph([x], outs, nodes=nodes, initializers=[gamma, w1, w2], opset_imports={"": 21},
                     name="synthetic")
    return ir.Model(graph, ir_version=10)


def _synthetic_stats(k: int = 8) -> CalibrationStats:
    amax = np.ones(k, np.float32)
    amax[3] = 40.0  # one outlier channel
    return CalibrationStats(meta={}, tensors={"normed": TensorStats(-40.0, 40.0, amax, 32)})


def test_synthetic_fold_exact_and_residual_skipped():
    x = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    model = _synthetic(residual=False)
    ref = _run(model, x)
    context = CompileContext(stats=_synthetic_stats())
    SmoothQuantPass(context, search="none", alpha=0.5)(model)
    got = _run(model, x)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    adjusted = context.stats.get("normed")
    assert adjusted.absmax_channel.max() / np.median(adjusted.absmax_channel) < 40.0 / 1.0
    # With a residual Add on the normed value, folding would change the residual: skipped.
    model = _synthetic(residual=True)
    context = CompileContext(stats=_synthetic_stats())
    from eqcompiler.errors import EqcError
    with pytest.raises(EqcError, match="also feeds Add"):
        SmoothQuantPass(context, search="none")(model)


def test_synthetic_residual_compensated_exact():
    """compensate_other_consumers: the norm absorbs 1/s although its output is also the residual; the
    Add gets x' * s through one inserted Mul, so every output (the residual too) stays exact."""
    x = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    model = _synthetic(residual=True)
    weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    ref = _run(model, x)
    context = CompileContext(stats=_synthetic_stats())
    SmoothQuantPass(context, search="none", alpha=0.5, compensate_other_consumers=True)(model)
    got = _run(model, x)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    (site,) = context.report["smooth_quant"]["sites"].values()
    assert site["kind"] == "norm" and site["compensated"] == ["/residual/Add"]
    (mul,) = [n for n in model.graph if n.name == "normed_unsmooth"]
    add = next(n for n in model.graph if n.name == "/residual/Add")
    assert add.inputs[0] is mul.outputs[0]  # the residual reads the un-smoothed value
    factor = mul.inputs[1].const_value.numpy()
    # s = amax^alpha / wmax^(1 - alpha) per channel (SmoothQuant's formula), wmax over both consumers' rows
    w_absmax = np.maximum(np.abs(weights["w1"]).max(axis=1), np.abs(weights["w2"]).max(axis=1))
    expected = np.sqrt(_synthetic_stats().get("normed").absmax_channel) / np.sqrt(w_absmax)
    np.testing.assert_allclose(factor, expected, rtol=1e-6)
    assert int(np.argmax(factor)) == 3  # s follows the outlier channel
    assert context.stats.get("normed").absmax_channel.max() < 40.0 / 2


def test_synthetic_explicit_scale_for_unfoldable_producer():
    """explicit_scale: a Tanh output (no affine producer; also a graph output) gets its 1/s from one
    inserted Mul that feeds only the linears; the outputs stay exact, the statistics move to the Mul's
    output, and the Tanh output is untouched."""
    rng = np.random.default_rng(1)
    k, n = 8, 6
    x = ir.Value(name="x", shape=ir.Shape([4, k]), type=ir.TensorType(ir.DataType.FLOAT))
    w1 = ir.Value(name="w1", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT),
                  const_value=ir.tensor(rng.normal(size=(k, n)).astype(np.float32), name="w1"))
    act = ir.node("Tanh", [x], name="/act/Tanh")
    act.outputs[0].name, act.outputs[0].dtype, act.outputs[0].shape = "h", ir.DataType.FLOAT, ir.Shape([4, k])
    mm = ir.node("MatMul", [act.outputs[0], w1], name="/layers.0/down_proj/MatMul")
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([4, n])
    graph = ir.Graph([x], [mm.outputs[0], act.outputs[0]], nodes=[act, mm], initializers=[w1],
                     opset_imports={"": 21}, name="explicit")
    model = ir.Model(graph, ir_version=10)
    xs = np.random.default_rng(2).normal(size=(4, k)).astype(np.float32)
    ref = _run(model, xs)
    amax = np.full(k, 0.5, np.float32)
    amax[3] = 20.0
    stats = CalibrationStats(meta={}, tensors={"h": TensorStats(-20.0, 20.0, amax, 32)})
    from eqcompiler.errors import EqcError
    with pytest.raises(EqcError, match="'h' is a graph output"):  # without the option: skipped, and why
        SmoothQuantPass(CompileContext(stats=stats), search="none")(ir.from_proto(ir.to_proto(model)))
    context = CompileContext(stats=stats)
    SmoothQuantPass(context, search="none", alpha=0.5, explicit_scale=True)(model)
    for a, b in zip(ref, _run(model, xs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    (site,) = context.report["smooth_quant"]["sites"].values()
    assert site["kind"] == "explicit" and site["tensor"] == "h_smoothed"
    assert mm.inputs[0].producer().op_type == "Mul" and mm.inputs[0].name == "h_smoothed"
    assert graph.outputs[1].name == "h" and graph.outputs[1].producer() is act
    assert context.stats.get("h_smoothed").absmax_channel.max() < 20.0 / 2
    assert context.stats.get("h").absmax_channel.max() == 20.0  # other readers of h see it unchanged


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    session = make_session(proto.SerializeToString())
    return session.run(None, {"x": x})


def test_token_granularity_score_models_per_row_quantization():
    """The 'token' score quantizes each row by its own absmax: a huge row no longer crushes a small one,
    and smoothing a channel outlier lowers the per-token error (what w8a8-dynamic's alpha search sees)."""
    from eqcompiler.passes.smooth_quant import score_ort

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32)).astype(np.float32)
    x[:, 3] *= 300.0  # channel outlier (SmolLM2 down_proj style)
    x[0] *= 1000.0  # token outlier
    w = rng.normal(size=(32, 16)).astype(np.float32)
    ref = x @ w
    ones = np.ones(32, np.float32)
    amax = np.abs(x).max(axis=0)
    per_tensor = score_ort(x, w, ones, amax, 0, ref, "tensor", "row")
    per_token = score_ort(x, w, ones, amax, 0, ref, "token", "row")
    assert per_token < per_tensor / 100  # the token outlier costs per-tensor, not per-token
    s = np.sqrt(amax / np.abs(w).max(axis=1))  # alpha 0.5
    assert score_ort(x, w, s, amax, 0, ref, "token", "row") < per_token / 4
    # "row" weighs every token equally; "total" is dominated by the outlier token's huge output
    assert score_ort(x, w, s, amax, 0, ref, "token", "total") < score_ort(x, w, s, amax, 0, ref, "token", "row")


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("norm", ["total", "row"])
def test_channelwise_score_is_the_error_of_quantized_output(granularity, norm):
    """score_ort's per-channel path (torch, in place) scores exactly what quantized_output computes: the same
    codes and int32 products; only the float sum of squares may round differently."""
    from eqcompiler.passes.smooth_quant import quantized_output, score_ort

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 96)).astype(np.float32)
    x[:, 5] *= 80.0
    w = (rng.normal(size=(96, 40)) * 0.05).astype(np.float32)
    s = (np.abs(rng.normal(size=96)) + 0.5).astype(np.float32)
    amax, ref = np.abs(x).max(axis=0), x @ w
    err = quantized_output(x / s, w * s[:, None], granularity, float((amax / s).max()), 0) - ref
    if norm == "row":
        want = float(np.mean((err ** 2).sum(axis=1) / (ref ** 2).sum(axis=1)))
    else:
        want = float((err.astype(np.float64) ** 2).sum() / (ref.astype(np.float64) ** 2).sum())
    assert score_ort(x, w, s, amax, 0, ref, granularity, norm) == pytest.approx(want, rel=1e-5)


def test_score_options_validated():
    from eqcompiler.errors import EqcError
    from eqcompiler.passes.smooth_quant import SmoothQuantOptions

    with pytest.raises(EqcError, match="activation_granularity"):
        SmoothQuantOptions(activation_granularity="channel").validate()
    with pytest.raises(EqcError, match="score_norm"):
        SmoothQuantOptions(score_norm="max").validate()
    with pytest.raises(EqcError, match="search='gram'"):
        SmoothQuantOptions(search="gram", activation_granularity="token").validate()
    SmoothQuantOptions(search="ort", activation_granularity="token", score_norm="row").validate()


def _sampled_stats(x: np.ndarray) -> CalibrationStats:
    """Statistics of 'normed' = x * gamma with stored sample rows (search='sample') and abssum."""
    gamma = np.random.default_rng(1).uniform(0.5, 2, x.shape[1])  # the same gamma _synthetic draws
    y = (x * gamma).astype(np.float32)
    t = TensorStats(float(y.min()), float(y.max()), np.abs(y).max(axis=0).astype(np.float32), y.shape[0],
                    extra={"abssum_channel": np.abs(y).sum(axis=0), "sample_rows": y})
    return CalibrationStats(meta={}, tensors={"normed": t})


@pytest.mark.parametrize("token_outlier", [False, True])
def test_auto_granularity_scores_for_the_quantizer_the_input_gets(token_outlier):
    """granularity 'auto': an input whose static step stays coarse after smoothing (one massive token owns
    its range) is re-scored per token and handed to quantize_activations as per-token; an ordinary input
    stays static. The smoothed float graph stays exact and the quantized one runs in ORT."""
    from eqcompiler.passes.quantize_activations import QuantizeActivationsPass

    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    x[:, 3] *= 20.0  # channel outlier: smoothing pays off either way
    if token_outlier:
        x[0] *= 500.0  # attention-sink style row: sets the static range alone
    model = _synthetic(residual=False)
    ref = _run(model, x[:4])
    context = CompileContext(stats=_sampled_stats(x))
    SmoothQuantPass(context, search="sample", activation_granularity="auto", dynamic_above=0.15)(model)
    for a, b in zip(ref, _run(model, x[:4])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    (site,) = context.report["smooth_quant"]["sites"].values()
    assert site["scored_for"] == ("token" if token_outlier else "tensor")
    assert context.per_token_inputs == (["normed"] if token_outlier else [])
    QuantizeActivationsPass(context, bits=8, symmetric=True)(model)  # dynamic_above off: only smooth_quant's choice
    report = context.report["quantize_activations"]
    assert report["dynamic_fallback" if token_outlier else "static"] == 1
    ops = {n.op_type for n in model.graph}
    assert ("ReduceMax" in ops) == token_outlier  # the per-token chain computes each row's absmax
    got = _run(model, x[:4])
    assert np.abs(got[0] - ref[0]).max() / np.abs(ref[0]).max() < 0.05


def test_static_tolerance_takes_per_token_where_static_costs_a_multiple():
    """With the step criterion out of the way (dynamic_above huge), static_tolerance alone decides: a
    massive-token input goes per token (its static score is many times the per-token one), an ordinary
    input stays static under a loose tolerance."""

    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    x[:, 3] *= 20.0
    x[0] *= 500.0
    for tolerance, expected in ((None, "tensor"), (2.0, "token")):
        context = CompileContext(stats=_sampled_stats(x))
        SmoothQuantPass(context, search="sample", activation_granularity="auto", dynamic_above=1e9,
                        static_tolerance=tolerance)(_synthetic(residual=False))
        (site,) = context.report["smooth_quant"]["sites"].values()
        assert site["scored_for"] == expected
        assert context.per_token_inputs == (["normed"] if expected == "token" else [])
    x[0] /= 500.0
    context = CompileContext(stats=_sampled_stats(x))
    SmoothQuantPass(context, search="sample", activation_granularity="auto", dynamic_above=1e9,
                    static_tolerance=100.0)(_synthetic(residual=False))
    assert next(iter(context.report["smooth_quant"]["sites"].values()))["scored_for"] == "tensor"


def test_auto_granularity_needs_a_threshold():
    from eqcompiler.errors import EqcError
    from eqcompiler.passes.smooth_quant import SmoothQuantOptions

    with pytest.raises(EqcError, match="dynamic_above"):
        SmoothQuantOptions(search="sample", activation_granularity="auto", dynamic_above=0).validate()
    with pytest.raises(EqcError, match="static_tolerance"):
        SmoothQuantOptions(search="sample", activation_granularity="tensor", static_tolerance=2.0).validate()
    with pytest.raises(EqcError, match="static_tolerance"):
        SmoothQuantOptions(search="sample", activation_granularity="auto", static_tolerance=0.5).validate()


@pytest.mark.parametrize("op,domain", [("SkipSimplifiedLayerNormalization", "com.microsoft"),
                                       ("SimplifiedLayerNormalization", "")])
def test_fused_ort_norms_absorb_the_smoothing_exactly(op, domain):
    """Graphs onnxruntime-genai's builder writes carry ORT's fused norms: 1/s folds into their gamma (input 2 of
    SkipSimplifiedLayerNormalization, 1 of SimplifiedLayerNormalization); the residual sum the Skip variant also
    outputs does not depend on gamma, so every output, the residual too, stays as it was."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    k, n = 8, 6
    skip = op.startswith("Skip")
    inputs = ["x", "skip", "gamma"] if skip else ["x", "gamma"]
    norm = helper.make_node(op, inputs, ["normed", "", "", "residual"] if skip else ["normed"], domain=domain,
                            epsilon=1e-5, name="/layers.0/input_layernorm")
    nodes = [norm, helper.make_node("MatMul", ["normed", "wqkv"], ["y0"], name="/layers.0/attn/qkv_proj/MatMul")]
    outs = [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [4, n])]
    if skip:
        outs.append(helper.make_tensor_value_info("residual", TensorProto.FLOAT, [4, k]))
    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, k]) for name in inputs[:-1]]
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2, k).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "wqkv")]
    proto = helper.make_model(helper.make_graph(nodes, "fused", graph_inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    feed = {name: rng.normal(size=(4, k)).astype(np.float32) for name in inputs[:-1]}

    def run(model: ir.Model) -> list[np.ndarray]:
        return make_session(ir.serde.serialize_model(model).SerializeToString()).run(None, feed)

    model = ir.serde.deserialize_model(proto)
    ref = run(model)
    context = CompileContext(stats=_synthetic_stats(k))
    SmoothQuantPass(context, search="none", alpha=0.5)(model)
    report = context.report["smooth_quant"]
    assert list(report["sites"]) == ["layers.0.attn.qkv_proj"] and report["sites"]["layers.0.attn.qkv_proj"]["kind"] == "norm"
    folded = next(n for n in model.graph if n.op_type == op).inputs[2 if skip else 1].const_value.numpy()
    assert not np.allclose(folded, numpy_helper.to_array(proto.graph.initializer[0]))  # 1/s went into gamma
    for want, got in zip(ref, run(model)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
