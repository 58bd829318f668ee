"""check_tensorrt_placement: planted violations are caught, eqc's int8 w8a8 output passes, nothing is edited."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from eqcompiler.errors import EqcError
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.passes.check_tensorrt_placement import CheckTensorrtPlacementPass

K, N = 16, 8


def _graph(act_zp=np.int8(0), w_zp=0, axis=1, act_qdq=True, weight_dq=True, q_on_softmax=False) -> ir.Model:
    """x -> [Q/DQ] -> MatMul(., DQ(Wq)) -> y, plus an attention-mask -> Add -> Softmax branch."""
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
    n_scale = N if axis == 1 else K
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(n_scale, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.full(n_scale, w_zp, np.int8), "wzp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "as"), numpy_helper.from_array(np.array(act_zp), "azp"),
             numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "wf")]
    nodes = []
    a = "x"
    if act_qdq:
        nodes += [helper.make_node("QuantizeLinear", ["x", "as", "azp"], ["xq"], name="act_q"),
                  helper.make_node("DequantizeLinear", ["xq", "as", "azp"], ["xdq"], name="act_dq")]
        a = "xdq"
    if weight_dq:
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], axis=axis, name="w_dq"))
    nodes.append(helper.make_node("MatMul", [a, "w" if weight_dq else "wf"], ["y"], name="/model/layers.0/mlp/up_proj/MatMul"))
    nodes += [helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
              helper.make_node("Add", ["scores", "maskf"], ["masked"], name="mask_add"),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax")]
    out = "probs"
    if q_on_softmax:
        nodes += [helper.make_node("QuantizeLinear", ["probs", "as", "azp"], ["pq"], name="probs_q"),
                  helper.make_node("DequantizeLinear", ["pq", "as", "azp"], ["pdq"], name="probs_dq")]
        out = "pdq"
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [2, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N]), helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 4])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _violations(model: ir.Model) -> list[str]:
    ctx = CompileContext()
    before = ir.serde.serialize_model(model).SerializeToString()
    result = CheckTensorrtPlacementPass(ctx)(model)
    assert not result.modified
    assert ir.serde.serialize_model(model).SerializeToString() == before  # reports only
    return ctx.report["check_tensorrt_placement"]["violations"]


def test_clean_graph_passes():
    assert _violations(_graph()) == []


@pytest.mark.parametrize("kwargs, rule, words", [
    ({"act_zp": np.uint8(128)}, "R2", "UINT8"),
    ({"act_zp": np.uint8(128)}, "R1", "zero point"),
    ({"w_zp": 3}, "R1", "w_dq"),
    ({"axis": 0}, "R3", "axis 0"),
    ({"weight_dq": False}, "R5", "weight does not"),
    ({"q_on_softmax": True}, "R6", "softmax"),
])
def test_planted_violation_is_caught(kwargs, rule, words):
    found = _violations(_graph(**kwargs))
    assert any(v.startswith(rule) and words in v for v in found), found
    # exactly the planted kind(s): a uint8 zero point of 128 breaks R1 and R2, the others one rule
    assert {v.split()[0] for v in found} <= {"R1", "R2"} if "act_zp" in kwargs else len(found) >= 1


def test_fail_option_raises_one_line_with_first_violations():
    model = _graph(act_zp=np.uint8(128), w_zp=3)
    with pytest.raises(EqcError) as info:
        CheckTensorrtPlacementPass(CompileContext(), fail=True, max_listed=2)(model)
    msg = str(info.value)
    assert "not TensorRT-ready: 4 violation(s)" in msg and "(and 2 more)" in msg and "\n" not in msg


def test_weight_only_int8_is_not_a_violation():
    assert _violations(_graph(act_qdq=False)) == []


def test_eqc_w8a8_int8_on_tiny_llama_passes(tiny_artifact, tiny_llama_stats, tmp_path):
    from eqcompiler.compile.pipeline import compile_model

    manifest = compile_model(tiny_artifact("llama"), "w8a8-int8", tmp_path / "q", calib=str(tiny_llama_stats),
                             target="tensorrt")
    report = manifest["quantization"]["report"]["check_tensorrt_placement"]
    assert report["violations"] == [] and report["linear_layers"] == 15
    assert report["qdq_nodes"] >= 15 + 2 * 7  # 15 weight DQs, Q+DQ per distinct activation (7 per 2 layers + lm_head)
    assert len(report["notes"]) == 1  # the embedding-row dequantization, reported as a note
