"""quantize_weights and quantize_activations on tiny synthetic graphs and on tiny artifacts."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from eqcompiler.errors import EqcError
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.compile.qdq import quantize_channelwise
from eqcompiler.calibration.stats import CalibrationStats, TensorStats

RNG = np.random.default_rng(0)


def _mlp_graph(k: int = 32, n: int = 24, vocab: int = 40) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ids -> Gather(table) -> MatMul(W1) -> Relu -> Gemm(W2, transB) -> MatMul(Transpose(table)) (tied)."""
    table = RNG.standard_normal((vocab, k)).astype(np.float32)
    w1 = RNG.standard_normal((k, n)).astype(np.float32)
    w2 = RNG.standard_normal((k, n)).astype(np.float32)  # Gemm transB: stored [N=k, K=n]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="/model/embed_tokens/Gather"),
        helper.make_node("Reshape", ["emb", "shape2d"], ["x"], name="/flatten"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="/model/fc1/MatMul"),
        helper.make_node("Relu", ["h"], ["r"], name="/relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="/model/fc2/Gemm", transB=1),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="/tied/Transpose"),
        helper.make_node("MatMul", ["y", "table_t"], ["logits"], name="/model/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", vocab])],
        [helper.make_tensor("table", TensorProto.FLOAT, table.shape, table.ravel()),
         helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.ravel()),
         helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel()),
         helper.make_tensor("shape2d", TensorProto.INT64, [2], [-1, k])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), {"table": table, "w1": w1, "w2": w2}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def test_quantize_channelwise_matches_definition() -> None:
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    qw = quantize_channelwise(w, axis=1, bits=8)
    scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_allclose(qw.scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(qw.q, np.clip(np.rint(w / scale), -128, 127).astype(np.int8))
    assert np.abs(qw.dequantize() - w).max() <= scale.max() / 2 + 1e-7


def test_blocked_int4_roundtrip_error_is_bounded() -> None:
    w = RNG.standard_normal((256, 8)).astype(np.float32)
    qw = quantize_channelwise(w, axis=0, bits=4, symmetric=False, block_size=64)
    assert qw.scale.shape == (4, 8) and qw.q.min() >= 0 and qw.q.max() <= 15
    err = np.abs(qw.dequantize() - w)
    bound = np.repeat(qw.scale, 64, axis=0) / 2 + 1e-6
    assert (err <= bound).all()


def test_zero_channel_gets_no_nan() -> None:
    w = np.zeros((8, 4), dtype=np.float32)
    qw = quantize_channelwise(w, axis=1, bits=8)
    assert np.isfinite(qw.scale).all() and (qw.dequantize() == 0).all()


@pytest.mark.parametrize("bits,block", [(8, 0), (4, 16), (8, 16)])
def test_quantize_weights_pass_numerics(bits: int, block: int) -> None:
    from eqcompiler.passes.quantize_weights import QuantizeWeightsPass

    proto, arrays = _mlp_graph()
    ids = RNG.integers(0, 40, 7).astype(np.int64)
    ref = _run(proto, {"ids": ids})[0]
    model = ir.serde.deserialize_model(proto)
    ctx = CompileContext()
    result = QuantizeWeightsPass(ctx, bits=bits, block_size=block)(model)
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    got = _run(out, {"ids": ids})[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < (0.02 if bits == 8 else 0.3), rel
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("DequantizeLinear") == 4  # w1, w2, the shared table for lm_head, the gathered rows
    remaining = {i.name for i in out.graph.initializer
                 if i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and not i.name.endswith("_scale")}
    assert remaining == set(), f"float weights left behind: {remaining}"
    layers = ctx.report["quantize_weights"]["layers"]
    assert set(layers) == {"fc1", "fc2", "lm_head", "embed_tokens"}
    assert "tied" in layers["lm_head"]


def test_quantize_weights_refuses_when_nothing_matches() -> None:
    from eqcompiler.passes.quantize_weights import QuantizeWeightsPass

    proto, _ = _mlp_graph()
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(EqcError, match="matched no layer"):
        QuantizeWeightsPass(CompileContext(), include="nothing_like_this", embeddings=False)(model)


def test_unknown_option_is_refused_with_valid_list() -> None:
    from eqcompiler.passes.quantize_weights import QuantizeWeightsPass

    with pytest.raises(EqcError, match="valid: .*bits"):
        QuantizeWeightsPass(CompileContext(), bitz=4)


def test_activation_pass_needs_stats() -> None:
    from eqcompiler.passes.quantize_activations import QuantizeActivationsPass

    with pytest.raises(EqcError, match="calibration statistics"):
        QuantizeActivationsPass(CompileContext())


def test_activation_qdq_only_on_linear_inputs(tiny_artifact, tiny_llama_stats) -> None:
    """QDQ sits on the inputs of linear layers; attention scores, mask and softmax stay float."""
    from eqcompiler.artifact.folder import load_ir
    from eqcompiler.compile.graph import find_linear_sites
    from eqcompiler.passes.quantize_activations import QuantizeActivationsPass
    from eqcompiler.passes.quantize_weights import QuantizeWeightsPass

    model = load_ir(tiny_artifact("llama"))
    n_inputs = len({id(s.activation) for s in find_linear_sites(model.graph)})
    ctx = CompileContext(stats=CalibrationStats.load(tiny_llama_stats))
    QuantizeWeightsPass(ctx)(model)
    QuantizeActivationsPass(ctx)(model)
    qs = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(qs) == n_inputs == 2 * 4 + 1  # qkv, o, gate/up, down per layer + lm_head input
    for q in qs:
        dq = q.outputs[0].consumers()
        assert [c.op_type for c in dq] == ["DequantizeLinear"]
        consumers = {c.op_type for c in dq[0].outputs[0].consumers()}
        assert consumers <= {"MatMul", "Gemm"}, consumers
        assert q.inputs[2].const_value.numpy().item() == 0  # symmetric int8
    for softmax in (n for n in model.graph if n.op_type == "Softmax"):
        assert softmax.inputs[0].producer().op_type != "DequantizeLinear"
    for mm in (n for n in model.graph if n.op_type == "MatMul"):
        if mm.inputs[1].producer() is not None and mm.inputs[1].producer().op_type not in ("DequantizeLinear", "Transpose"):
            assert mm.inputs[0].producer().op_type != "DequantizeLinear", "attention MatMul got QDQ"


def test_activation_scale_from_stats() -> None:
    from eqcompiler.passes.quantize_activations import QuantizeActivationsPass

    proto, _ = _mlp_graph()
    model = ir.serde.deserialize_model(proto)
    stats = CalibrationStats(meta={}, tensors={
        "x": TensorStats(min=-2.0, max=3.0, count=1), "r": TensorStats(min=0.0, max=5.0, count=1),
        "y": TensorStats(min=-1.0, max=1.0, count=1)})
    QuantizeActivationsPass(CompileContext(stats=stats))(model)
    scales = {n.inputs[0].name: float(n.inputs[1].const_value.numpy()) for n in model.graph if n.op_type == "QuantizeLinear"}
    assert scales == pytest.approx({"x": 3.0 / 127, "r": 5.0 / 127, "y": 1.0 / 127})
