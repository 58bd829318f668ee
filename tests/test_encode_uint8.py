"""encode_int8_as_uint8: static W8A8 layers stored as uint8 with zero point 128 (same values), so ONNX
Runtime runs its exact uint8 x uint8 kernels on x86 CPUs without VNNI."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import causal_logits_at_level, run_eqc
from eqcompiler.lowering.cpu_features import int8_gemm_saturates, saturation_warning
from eqcompiler.compile.pipeline import compile_model


def _qdq_numerics(folder: pathlib.Path) -> np.ndarray:
    return causal_logits_at_level(folder, fused_int8=False)


def _ort_kernels(folder: pathlib.Path) -> np.ndarray:
    return causal_logits_at_level(folder, fused_int8=True)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _linear_graph(activation_zp: np.ndarray):
    """x -> Q/DQ (per tensor) -> MatMul with a full-range int8 per-channel weight DequantizeLinear."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    k, n = 256, 64
    def const(name, arr):
        return ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                        const_value=ir.tensor(arr, name=name))
    x = ir.Value(name="x", shape=ir.Shape([8, k]), type=ir.TensorType(ir.DataType.FLOAT))
    a_s, a_z = const("a_scale", np.array(0.05, np.float32)), const("a_zp", activation_zp)
    wq = const("w_q", rng.integers(-128, 128, (k, n)).astype(np.int8))
    w_s, w_z = const("w_scale", np.full(n, 0.01, np.float32)), const("w_zp", np.zeros(n, np.int8))
    q = ir.node("QuantizeLinear", [x, a_s, a_z], name="x/QuantizeLinear")
    dq = ir.node("DequantizeLinear", [q.outputs[0], a_s, a_z], name="x/DequantizeLinear")
    w_dq = ir.node("DequantizeLinear", [wq, w_s, w_z], {"axis": 1}, name="w/DequantizeLinear")
    mm = ir.node("MatMul", [dq.outputs[0], w_dq.outputs[0]], name="/layers.0/down_proj/MatMul")
    for node, name, dtype, shape in ((q, "x_q", ir.DataType.from_numpy(activation_zp.dtype), [8, k]),
                                     (dq, "x_dq", ir.DataType.FLOAT, [8, k]), (w_dq, "w", ir.DataType.FLOAT, [k, n]),
                                     (mm, "y", ir.DataType.FLOAT, [8, n])):
        node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = name, dtype, ir.Shape(shape)
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[q, dq, w_dq, mm], initializers=[a_s, a_z, wq, w_s, w_z],
                     opset_imports={"": 21}, name="linear")
    return ir.Model(graph, ir_version=10)


def _run(model, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("activation_zp", [np.array(0, np.int8), np.array(131, np.uint8)])
def test_synthetic_linear_exact_after_encoding(activation_zp):
    from eqcompiler.compile.pass_base import CompileContext
    from eqcompiler.passes.encode_int8_as_uint8 import EncodeInt8AsUint8Pass

    x = (np.random.default_rng(1).normal(size=(8, 256)) * 3).astype(np.float32)
    basic, full = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = _linear_graph(activation_zp)
    reference = _run(model, x, basic)  # the QDQ graph's own arithmetic
    plain_dev = _rel(_run(model, x, full), reference)
    context = CompileContext()
    EncodeInt8AsUint8Pass(context, when="always")(model)
    report = context.report["encode_int8_as_uint8"]
    assert report["weights"] == 1 and report["activation_pairs"] == (1 if activation_zp.dtype == np.int8 else 0)
    dtypes = {v.name: v.dtype for v in model.graph.initializers.values()}
    assert ir_uint8(dtypes["w_q_u8"]) and ir_uint8(dtypes["w_zp_u8"])
    assert _rel(_run(model, x, basic), reference) < 1e-6  # same values
    assert _rel(_run(model, x, full), reference) < 1e-5  # ORT's integer kernel is exact on every CPU
    if int8_gemm_saturates():
        assert plain_dev > 1e-2  # what the int8 codes give on this CPU


def ir_uint8(dtype) -> bool:
    import onnx_ir as ir

    return dtype == ir.DataType.UINT8


def test_never_and_auto_off_leave_the_graph():
    from eqcompiler.compile.pass_base import CompileContext
    from eqcompiler.passes.encode_int8_as_uint8 import EncodeInt8AsUint8Pass

    model = _linear_graph(np.array(0, np.int8))
    context = CompileContext(target="tensorrt")
    assert not EncodeInt8AsUint8Pass(context, when="auto")(model).modified
    assert context.report["encode_int8_as_uint8"]["why"].startswith("auto: target tensorrt")
    assert not EncodeInt8AsUint8Pass(CompileContext(), when="never")(model).modified
    from eqcompiler.errors import EqcError
    with pytest.raises(EqcError, match="when must be one of"):
        EncodeInt8AsUint8Pass(CompileContext(), when="sometimes")
    with pytest.raises(EqcError, match="needs int8 weights"):
        EncodeInt8AsUint8Pass(CompileContext(target="ort-cpu"), when="always")(model)


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-smooth"])
def test_uint8_encoding_keeps_values_and_gets_exact_kernels(tiny_artifact, tiny_llama_stats, tmp_path, recipe):
    src = tiny_artifact("llama")
    plain, encoded = tmp_path / "int8", tmp_path / "uint8"
    compile_model(src, recipe, plain, calib=str(tiny_llama_stats), pass_overrides={"when": "never", "reduce_range": False})
    manifest = compile_model(src, recipe, encoded, calib=str(tiny_llama_stats), pass_overrides={"when": "always"})
    report = manifest["quantization"]["report"]["encode_int8_as_uint8"]
    assert report["applied"] is True and report["weights"] > 0 and not report["left_int8"]
    model = onnx.load(str(encoded / "model.onnx"))
    onnx.checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and len(inits[n.input[0]].dims) == 2]
    u8 = [n for n in weight_dqs if inits[n.input[0]].data_type == onnx.TensorProto.UINT8]
    assert len(u8) == report["weights"]
    assert all(np.all(onnx.numpy_helper.to_array(inits[n.input[2]]) == 128) for n in u8)
    if recipe == "w8a8-smooth":  # symmetric int8 activations: their Q/DQ pairs move to uint8 too
        assert report["activation_pairs"] > 0
    # Same dequantized values: the QDQ graphs agree to float rounding.
    assert _rel(_qdq_numerics(encoded), _qdq_numerics(plain)) < 1e-5
    # Through a whole model, ORT's optimized graph also reorders float work (attention), which can move
    # an activation across a rounding boundary; the saturation it removes is far larger.
    encoded_dev = _rel(_ort_kernels(encoded), _qdq_numerics(encoded))
    assert encoded_dev < 2e-2
    if int8_gemm_saturates():
        assert _rel(_ort_kernels(plain), _qdq_numerics(plain)) > 5 * encoded_dev
    assert saturation_warning(json.loads((encoded / "manifest.json").read_text())) is None


@pytest.mark.parametrize("target, cpu", [("portable", "avx2"), ("portable", None), ("tensorrt", "avx2")])
def test_auto_follows_cpu_and_target(tiny_artifact, tiny_llama_stats, tmp_path, target, cpu):
    """when "auto" re-encodes portable artifacts for --cpu avx2 only: the default (vnni) artifact is the same on
    every host."""
    out = tmp_path / target
    proc = run_eqc("compile", tiny_artifact("llama"), "--recipe", "w8a8-smooth", "--calib", tiny_llama_stats,
                   "--target", target, "-o", out, "--json", *(["--cpu", cpu] if cpu else []))
    report = json.loads(proc.stdout)["report"]
    applied = report["encode_int8_as_uint8"]["applied"]
    assert applied is (cpu == "avx2" and target == "portable")
    assert report["quantize_weights"]["reduce_range"] is False  # the encoding, not 7-bit weights
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    has_u8 = any(t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2 for t in model.graph.initializer)
    assert has_u8 is applied


def test_cli_flags(tiny_artifact, tiny_llama_stats, tmp_path):
    src = tiny_artifact("llama")
    on = run_eqc("compile", src, "--recipe", "w8a8", "--calib", tiny_llama_stats, "--uint8-encoding",
                 "-o", tmp_path / "on", "--json")
    assert json.loads(on.stdout)["report"]["encode_int8_as_uint8"]["applied"] is True
    # --reduce-range asks for 7-bit int8 weights: the encoding steps aside
    rr = run_eqc("compile", src, "--recipe", "w8a8", "--calib", tiny_llama_stats, "--reduce-range",
                 "-o", tmp_path / "rr", "--json")
    report = json.loads(rr.stdout)["report"]
    assert report["quantize_weights"]["reduce_range"] is True
    assert report["encode_int8_as_uint8"] == {"applied": False, "why": "when=never"}
    bad = run_eqc("compile", src, "--recipe", "w4-rtn", "--uint8-encoding", "-o", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "has no pass with option 'when'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_default_artifact_does_not_depend_on_the_host(tiny_artifact, tiny_llama_stats, tmp_path, monkeypatch):
    """The same compile gives the same bytes on a VNNI host and on one without; only --cpu host follows the host."""
    from eqcompiler.lowering import cpu_features

    src = tiny_artifact("llama")
    compile_model(src, "w8a8-smooth", tmp_path / "here", calib=str(tiny_llama_stats))
    monkeypatch.setattr(cpu_features, "int8_gemm_saturates", lambda: True)  # as on an AVX2-only host
    compile_model(src, "w8a8-smooth", tmp_path / "avx2-host", calib=str(tiny_llama_stats))
    def model_bytes(folder: pathlib.Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith("model.onnx")}

    assert model_bytes(tmp_path / "here") == model_bytes(tmp_path / "avx2-host")
    followed = compile_model(src, "w8a8-smooth", tmp_path / "host", calib=str(tiny_llama_stats), cpu="host")
    assert followed["cpu"] == "avx2" and followed["quantization"]["report"]["encode_int8_as_uint8"]["applied"] is True
