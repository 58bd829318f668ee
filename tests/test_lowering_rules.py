"""The lowering rules (onnxscript rewrite rules over eqcompiler.compile.patterns), each on its own tiny graph:
the lowered graph computes what the QDQ graph computes (through ONNX Runtime), passes onnx.checker, and a
graph a rule must not take is left byte-for-byte alone with the check's reason recorded."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.patterns import RuleRecord, apply_rules
from eqcompiler.passes import lower_int8_weight_gemm, lower_qdq_to_ort_int8, lower_weight_only_int8
from eqcompiler.passes.lower_matmul_nbits import MatMulNBitsRule
from eqcompiler.runtime import custom_ops
from test_cuda_ops import lib  # noqa: F401  (the op-library fixture, for Int8WeightGemm)

K, N = 64, 24
LAYER = "/model/model/layers.0/mlp/up_proj/MatMul"


def linear_model(wq: np.ndarray, scale: np.ndarray, zp: np.ndarray | None = None, *, axis: int, block: int = 0,
                 transposed: bool = False, act_qdq: tuple[float, int, float] | None = None,
                 bias: np.ndarray | None = None, gather: bool = False) -> onnx.ModelProto:
    """x [2, 3, K] -> [Q->DQ] -> MatMul(., DQ(wq)[^T]) [+ bias] -> y; `gather` also reads rows of wq (ids -> rows)."""
    dq_inputs = ["wq", "w_scale"] + (["w_zp"] if zp is not None else [])
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "w_scale")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "w_zp"))
    attrs = {"axis": axis} | ({"block_size": block} if block else {})
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["w"], **attrs)]
    w = "w"
    if transposed:
        nodes.append(helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]))
        w = "w_t"
    a = "x"
    if act_qdq is not None:  # (Q scale, zero point, DQ scale): a static per-tensor int8 pair
        q_scale, q_zp, dq_scale = act_qdq
        inits += [numpy_helper.from_array(np.array(q_scale, np.float32), "a_scale"),
                  numpy_helper.from_array(np.array(q_zp, np.int8), "a_zp"),
                  numpy_helper.from_array(np.array(dq_scale, np.float32), "a_dq_scale")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "a_dq_scale", "a_zp"], ["xdq"])]
        a = "xdq"
    nodes.append(helper.make_node("MatMul", [a, w], ["mm" if bias is not None else "y"], name=LAYER))
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, N])]
    if gather:
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]))
        nodes += [helper.make_node("Gather", ["wq", "ids"], ["rows"]), helper.make_node("Cast", ["rows"], ["rows_f"], to=1)]
        outputs.append(helper.make_tensor_value_info("rows_f", TensorProto.FLOAT, [2, 3, K]))
    graph = helper.make_graph(nodes, "linear", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def lower(proto: onnx.ModelProto, rules: list) -> tuple[onnx.ModelProto, RuleRecord, int]:
    model = ir.serde.deserialize_model(proto)
    count = apply_rules(model, rules)
    return ir.serde.serialize_model(model), rules[0].record, count


def run(proto: onnx.ModelProto, feed: dict[str, np.ndarray], library=None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own arithmetic
    if library is not None:
        custom_ops.register(opts, library)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def feed(gather: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"x": rng.standard_normal((2, 3, K)).astype(np.float32)}
    if gather:
        out["ids"] = rng.integers(0, N, (2, 3)).astype(np.int64)
    return out


def assert_lowered(proto: onnx.ModelProto, rules: list, op_type: str, library=None, gather: bool = False,
                   rtol: float = 1e-5) -> onnx.ModelProto:
    lowered, record, count = lower(proto, rules)
    onnx.checker.check_model(lowered)
    assert count == 1 and record.lowered == ["model.layers.0.mlp.up_proj"]
    ops = [n.op_type for n in lowered.graph.node]
    assert ops.count(op_type) == 1 and "MatMul" not in ops and "DequantizeLinear" not in ops, ops
    assert next(n for n in lowered.graph.node if n.op_type == op_type).name == f"{LAYER}/{op_type}"
    inputs = feed(gather)
    for want, got in zip(run(proto, inputs), run(lowered, inputs, library)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))
    return lowered


def assert_left_alone(proto: onnx.ModelProto, rules: list, reason: str) -> None:
    lowered, record, count = lower(proto, rules)
    assert count == 0 and record.lowered == []
    assert list(record.rejected.values()) == [reason]
    assert lowered.graph.SerializeToString() == ir.serde.serialize_model(ir.serde.deserialize_model(proto)).graph.SerializeToString()


def int8_channel(rng: np.random.Generator, transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    wq = rng.integers(-127, 128, (N, K) if transposed else (K, N), dtype=np.int8)
    return wq, (rng.random(N).astype(np.float32) + 0.5) * np.float32(0.01)


# ---- MatMulNBits (lower_matmul_nbits) -----------------------------------------------------------

@pytest.mark.parametrize("dtype,zp", [(TensorProto.INT4, False), (TensorProto.UINT4, True), (TensorProto.INT8, False)])
def test_matmul_nbits_rule_matches_the_blocked_qdq_graph(dtype: int, zp: bool) -> None:
    rng = np.random.default_rng(1)
    block = 32
    lo, hi = {TensorProto.INT4: (-8, 8), TensorProto.UINT4: (0, 16), TensorProto.INT8: (-128, 128)}[dtype]
    q = rng.integers(lo, hi, (K, N))
    scale = (rng.random((K // block, N)).astype(np.float32) + 0.5) * np.float32(0.05)
    proto = linear_model(np.zeros((1,), np.int8), scale, axis=0, block=block)
    proto.graph.initializer[0].CopyFrom(helper.make_tensor("wq", dtype, [K, N], q.ravel().tolist()))
    if zp:
        zps = rng.integers(0, 16, (K // block, N))
        proto.graph.initializer.append(helper.make_tensor("w_zp", dtype, [K // block, N], zps.ravel().tolist()))
        proto.graph.node[0].input.append("w_zp")
    assert_lowered(proto, [MatMulNBitsRule()], "MatMulNBits")


def test_matmul_nbits_rule_leaves_per_channel_and_deselected_layers() -> None:
    wq, scale = int8_channel(np.random.default_rng(2))
    assert_left_alone(linear_model(wq, scale, axis=1), [MatMulNBitsRule()],
                      "weight DequantizeLinear block_size 0 is not a power of two >= 16")
    rng = np.random.default_rng(3)
    blocked = linear_model(rng.integers(-8, 8, (K, N)).astype(np.int8), np.ones((2, N), np.float32), axis=0, block=32)
    assert_left_alone(blocked, [MatMulNBitsRule(select=LayerSelection(exclude="mlp"))],
                      "layer 'model.layers.0.mlp.up_proj' is left out by include/exclude")


# ---- Int8WeightGemm (lower_int8_weight_gemm) -----------------------------------------------------

@pytest.mark.parametrize("transposed,bias", [(False, False), (True, False), (False, True), (True, True)])
def test_int8_weight_gemm_rules_match_the_weight_only_graph(lib, transposed: bool, bias: bool) -> None:  # noqa: F811
    rng = np.random.default_rng(4)
    wq, scale = int8_channel(rng, transposed)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    proto = linear_model(wq, scale, axis=0 if transposed else 1, transposed=transposed, bias=b, gather=transposed)
    # float math: summation order only; int16 activation rows (the default): a step is 1/32767 of a row's max
    assert_lowered(proto, lower_int8_weight_gemm.rules(activation_bits=0), "Int8WeightGemm", library=lib,
                   gather=transposed)
    lowered = assert_lowered(proto, lower_int8_weight_gemm.rules(), "Int8WeightGemm", library=lib, gather=transposed,
                             rtol=2e-4)
    op = next(n for n in lowered.graph.node if n.op_type == "Int8WeightGemm")
    assert op.input[1] == ("wq" if transposed else "wq_nk")  # a tied [N, K] table is read in place
    assert len(op.input) == (4 if bias else 3) and "Add" not in [n.op_type for n in lowered.graph.node]


def test_int8_weight_gemm_rules_leave_asymmetric_weights() -> None:
    wq, scale = int8_channel(np.random.default_rng(5))
    assert_left_alone(linear_model(wq, scale, np.full(N, 3, np.int8), axis=1), lower_int8_weight_gemm.rules(),
                      "weight zero point is not zero (asymmetric weights)")


# ---- MatMulIntegerToFloat (lower_qdq_to_ort_int8) ------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
def test_matmul_integer_to_float_rules_match_the_static_w8a8_graph(transposed: bool) -> None:
    wq, scale = int8_channel(np.random.default_rng(6), transposed)
    proto = linear_model(wq, scale, np.zeros(N, np.int8), axis=0 if transposed else 1, transposed=transposed,
                         act_qdq=(0.03, 2, 0.03), gather=transposed)
    lowered = assert_lowered(proto, lower_qdq_to_ort_int8.rules(), "MatMulIntegerToFloat", gather=transposed)
    readers = {n.op_type: n.input[0 if n.op_type == "Gather" else 1] for n in lowered.graph.node
               if n.op_type in ("Gather", "MatMulIntegerToFloat")}
    assert readers == ({"Gather": "wq_kn", "MatMulIntegerToFloat": "wq_kn"} if transposed else {"MatMulIntegerToFloat": "wq"})


def test_matmul_integer_to_float_rules_leave_a_mismatched_qdq_pair() -> None:
    wq, scale = int8_channel(np.random.default_rng(7))
    proto = linear_model(wq, scale, axis=1, act_qdq=(0.03, 0, 0.05))
    assert_left_alone(proto, lower_qdq_to_ort_int8.rules(),
                      "activation Q->DQ is not a per-tensor int8/uint8 pair with the same constant scale and zero point")


# ---- MatMulNBits bits=8 (lower_weight_only_int8) -------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
def test_weight_only_int8_rules_match_the_weight_only_graph(transposed: bool) -> None:
    wq, scale = int8_channel(np.random.default_rng(8), transposed)
    proto = linear_model(wq, scale, axis=0 if transposed else 1, transposed=transposed)
    assert_lowered(proto, lower_weight_only_int8.rules(), "MatMulNBits")


def test_weight_only_int8_rules_leave_blocked_weights() -> None:
    rng = np.random.default_rng(9)
    proto = linear_model(rng.integers(-127, 128, (K, N)).astype(np.int8), np.ones((2, N), np.float32), axis=0, block=32)
    assert_left_alone(proto, lower_weight_only_int8.rules(), "weight DequantizeLinear is blocked, not per channel")


@pytest.mark.parametrize("k", [64, 40])  # 40: no power-of-two block divides it, the last block is padded
def test_weight_only_int8_tied_table_serves_the_embedding_rows_once(k: int) -> None:
    """A tied [N, K] int8 table read by the lm_head (through Transpose) and by the embedding Gather (rows,
    per-row scale and zero point): after lowering both read the one packed table, same numbers."""
    rng = np.random.default_rng(10)
    wq = rng.integers(-127, 128, (N, k), dtype=np.int8)
    scale = (rng.random(N).astype(np.float32) + 0.5) * np.float32(0.01)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w_zp"), numpy_helper.from_array(np.array([-1]), "last")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["w"], axis=0),
             helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w_t"], ["y"], name="/lm_head/MatMul"),
             helper.make_node("Gather", ["wq", "ids"], ["rows"]),
             helper.make_node("Gather", ["w_scale", "ids"], ["rs0"]), helper.make_node("Unsqueeze", ["rs0", "last"], ["rs"]),
             helper.make_node("Gather", ["w_zp", "ids"], ["rz0"]), helper.make_node("Unsqueeze", ["rz0", "last"], ["rz"]),
             helper.make_node("DequantizeLinear", ["rows", "rs", "rz"], ["emb"], axis=-1, block_size=k)]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k]),
                                              helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, N]),
                               helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 3, k])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    from eqcompiler.compile.pass_base import CompileContext, make_pass

    model = ir.serde.deserialize_model(proto)
    context = CompileContext()
    make_pass("lower_weight_only_int8", context, {})(model)  # the pass: the rules, then the unused originals dropped
    lowered = ir.serde.serialize_model(model)
    onnx.checker.check_model(lowered)
    assert context.report["lower_weight_only_int8"]["lowered"] == 1
    tables = [t.name for t in lowered.graph.initializer if len(t.dims) == 3]
    assert tables == ["wq_nbits"] and "wq" not in {t.name for t in lowered.graph.initializer}  # stored once
    rng_feed = np.random.default_rng(0)
    inputs = {"x": rng_feed.standard_normal((2, 3, k)).astype(np.float32), "ids": rng_feed.integers(0, N, (2, 3))}
    want, got = run(proto, inputs), run(lowered, inputs)
    np.testing.assert_array_equal(got[1], want[1])  # embedding rows: the same int8 codes and scales
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * float(np.abs(want[0]).max()))
