"""--reduce-range: int8 weights in [-64, 63] so ONNX Runtime's int8 CPU kernels stay exact on x86
CPUs without VNNI, and the host check that warns when they would not."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest

from conftest import WIKI_TEST, causal_logits_at_level, run_eqc
from eqcompiler.lowering.cpu_features import full_range_int8_layers, int8_gemm_saturates, saturation_warning
from eqcompiler.errors import EqcError
from eqcompiler.compile.pipeline import compile_model, override_pass_options
from eqcompiler.compile.qdq import quantize_channelwise
from eqcompiler.compile.recipes import load_recipe


def test_reduced_codes_stay_in_seven_bits():
    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32) * 3
    full = quantize_channelwise(w, axis=1, bits=8)
    reduced = quantize_channelwise(w, axis=1, bits=8, reduce_range=True)
    assert full.q.min() >= -128 and np.abs(full.q).max() == 127
    assert reduced.q.min() >= -64 and reduced.q.max() <= 63 and np.abs(reduced.q).max() == 63
    np.testing.assert_allclose(reduced.scale, np.abs(w).max(axis=0) / 63, rtol=1e-6)
    # one bit less precision: the reconstruction error roughly doubles
    err_full = np.abs(full.dequantize() - w).mean()
    err_reduced = np.abs(reduced.dequantize() - w).mean()
    assert 1.6 < err_reduced / err_full < 2.4
    with pytest.raises(ValueError, match="symmetric int8"):
        quantize_channelwise(w, axis=1, bits=4, reduce_range=True)


def test_override_reaches_only_passes_that_have_the_option():
    recipe = override_pass_options(load_recipe("w8a8"), {"reduce_range": True})
    steps = {s["pass"]: s.get("options", {}) for s in recipe["passes"]}
    assert steps["quantize_weights"]["reduce_range"] is True
    assert all("reduce_range" not in opts for name, opts in steps.items() if name != "quantize_weights")
    with pytest.raises(EqcError, match="has no pass with option 'reduce_range'"):
        override_pass_options(load_recipe("none"), {"reduce_range": True})


def _ort_vs_qdq(folder: pathlib.Path) -> float:
    """How far ORT's optimized int8 kernels land from the QDQ graph's own numerics (fusions off)."""
    ref = causal_logits_at_level(folder, fused_int8=False)
    got = causal_logits_at_level(folder, fused_int8=True)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _worst_case_layer_error(folder: pathlib.Path, layers: int = 4) -> float:
    """Largest error, in integer units, of ORT's fused int8 GEMM (graph optimizations on) against exact
    integer arithmetic (weight scales 1: every exact result is an integer float32 holds exactly), over the artifact's first int8 weights fed the activations that stress vpmaddubsw most
    (every uint8 code 255): a one-layer QDQ graph with a float output, so no later rounding can amplify
    or hide a kernel's error."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT8 and len(inits[n.input[0]].dims) == 2
               and any(c.op_type == "MatMul" and c.input[1] == n.output[0] for c in model.graph.node)]
    assert weights
    worst = 0.0
    for dq in weights[:layers]:
        w = numpy_helper.to_array(inits[dq.input[0]])
        k, n = w.shape
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
        consts = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(n, np.float32), "ws"),
                  numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz")]
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [66, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [66, n])], consts)
        layer = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        got = ort.InferenceSession(layer, options, providers=["CPUExecutionProvider"]).run(
            None, {"x": np.full((66, k), 255.0, np.float32)})[0]
        exact = np.full((66, k), 255, np.int64) @ w.astype(np.int64)
        assert np.abs(exact).max() < 2 ** 24
        worst = max(worst, float(np.abs(got - exact).max()))
    return worst


def test_reduce_range_keeps_ort_int8_kernels_exact(tiny_artifact, tiny_llama_stats, tmp_path):
    src = tiny_artifact("llama")
    full = tmp_path / "w8a8"
    reduced = tmp_path / "w8a8-rr"
    compile_model(src, "w8a8", full, calib=str(tiny_llama_stats), pass_overrides={"reduce_range": False, "when": "never"})
    run_eqc("compile", src, "--recipe", "w8a8", "--calib", tiny_llama_stats, "--reduce-range", "-o", reduced)
    model = onnx.load(str(reduced / "model.onnx"))
    onnx.checker.check_model(model)
    manifest = json.loads((reduced / "manifest.json").read_text())
    assert manifest["quantization"]["report"]["quantize_weights"]["reduce_range"] is True
    assert full_range_int8_layers(manifest) == []
    int8_weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8
                    and len(t.dims) == 2]
    assert int8_weights and all(w.min() >= -64 and w.max() <= 63 for w in int8_weights)
    # 7-bit weights: ORT's fused int8 GEMMs reproduce the QDQ graph on every CPU.
    assert _ort_vs_qdq(reduced) < 1e-4
    assert _worst_case_layer_error(reduced) == 0.0
    # Full-range weights: exact only where the CPU has VNNI; the host check must predict which. Judged per
    # layer on worst-case codes: through the whole model, one float-rounding flip of a later activation code
    # (fused vs. float accumulation order) moves a tiny random model's logits by ~5e-3 even with exact kernels
    # (measured on an AVX512-VNNI EPYC), so whole-model logits cannot tell saturation from rounding order.
    full_manifest = json.loads((full / "manifest.json").read_text())
    assert full_range_int8_layers(full_manifest)
    if int8_gemm_saturates():
        assert _worst_case_layer_error(full) >= 1.0 and _ort_vs_qdq(full) > 1e-2
        assert "compile with --cpu avx2" in saturation_warning(full_manifest)
    else:
        assert _worst_case_layer_error(full) == 0.0
        assert saturation_warning(full_manifest) is None


@pytest.mark.parametrize("recipe, message", [("w4-rtn", "reduce_range applies to symmetric int8 weights"),
                                             ("none", "has no pass with option 'reduce_range'")])
def test_reduce_range_refused_where_it_cannot_apply(tiny_artifact, tmp_path, recipe, message):
    out = tmp_path / "x"
    proc = run_eqc("compile", tiny_artifact("llama"), "--recipe", recipe, "--reduce-range", "-o", out, check=False)
    assert proc.returncode == 2 and message in proc.stderr and not out.exists()


def test_eval_ort_config_reaches_the_session(tiny_artifact, tmp_path):
    src = tiny_artifact("llama")
    ok = run_eqc("eval", src, "--ppl", WIKI_TEST, "--max-tokens", "64", "--window", "32", "--no-latency", "--json",
                 "--ort-config", "session.qdq_matmulnbits_accuracy_level=0")
    assert json.loads(ok.stdout)["ort_config"] == {"session.qdq_matmulnbits_accuracy_level": "0"}
    bad = run_eqc("eval", src, "--no-latency", "--ort-config", "no-equals-sign", check=False)
    assert bad.returncode == 2 and "is not KEY=VALUE" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("target, cpu", [("ort-cpu", "avx2"), ("ort-cpu", None), ("ort-cuda", "avx2")])
def test_w8a8_recipe_picks_the_range_for_the_cpu(tiny_artifact, tiny_llama_stats, tmp_path, target, cpu):
    """reduce_range "auto" (recipe w8a8: static uint8 activations, where ORT's AVX2 int8 kernels
    collapse SmolLM2): 7-bit weights only for a CPU class whose ORT int8 kernels saturate (--cpu avx2; the
    default is vnni, whatever the compiling host), for the ort-cpu target (portable artifacts get
    encode_int8_as_uint8 instead, test_encode_uint8); never for GPU targets; the compile says so, and on a
    host the default misfits it prints the flag that fits."""
    out = tmp_path / target
    flags = ["--cpu", cpu] if cpu else []
    proc = run_eqc("compile", tiny_artifact("llama"), "--recipe", "w8a8", "--calib", tiny_llama_stats,
                   "--target", target, "-o", out, "--json", *flags)
    result = json.loads(proc.stdout)
    expect = cpu == "avx2" and target == "ort-cpu"
    assert result["report"]["quantize_weights"]["reduce_range"] is expect
    assert any("reduce_range auto" in w for w in result["warnings"]) is expect
    manifest = json.loads((out / "manifest.json").read_text())
    assert (full_range_int8_layers(manifest) == []) is expect and manifest["cpu"] == (cpu or "vnni")
    assert bool(result["hints"]) is (cpu is None and int8_gemm_saturates())


def test_layer_scan_ignores_non_table_reports():
    manifest = {"quantization": {"report": {
        "quantize_weights": {"layers": {"a": "int8 sym per-channel", "b": "int8 sym per-channel in [-64, 63]",
                                        "emb": "int8 sym per-channel (embedding rows)"}},
        "quantize_kv_cache": {"layers": 30, "bits": 8}, "quantize_activations": {"static": 3}}}}
    assert full_range_int8_layers(manifest) == ["a"]
    assert full_range_int8_layers({"quantization": None}) == []
    # Only static activations meet ORT's int8 GEMMs: a weight-only artifact never gets the warning.
    weight_only = {"quantization": {"report": {"quantize_weights": manifest["quantization"]["report"]["quantize_weights"]}}}
    assert saturation_warning(weight_only) is None
    assert (saturation_warning(manifest) is not None) is int8_gemm_saturates()
