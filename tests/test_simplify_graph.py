"""simplify_graph: folds small constant computations (shape arithmetic), keeps quantized weights as they are stored,
and computes the same outputs (onnx.checker and an ORT session on its output)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from eqcompiler.compile.pass_base import CompileContext, make_pass


def _model() -> onnx.ModelProto:
    """y = Reshape(x @ Cast(q) * s, Concat(Shape(x)[0], 2*4)) with a Constant-fed shape chain, plus a small
    int8 weight (64 codes: under every size limit, so only the weight rule keeps it int8)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (8, 8)).astype(np.int8), "q"),
             numpy_helper.from_array(np.full((1, 8), 0.05, np.float32), "s")]
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("Constant", [], ["four"], value=numpy_helper.from_array(np.array([4], np.int64))),
        helper.make_node("Mul", ["two", "four"], ["eight"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "eight"], ["target"], axis=0),
        helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["qf", "s"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Reshape", ["h", "target"], ["y"]),
        helper.make_node("Add", ["two", "four"], ["unused"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_folds_shape_arithmetic_and_keeps_int8_weights():
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    context = CompileContext()
    make_pass("simplify_graph", context, {})(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    report = context.report["simplify_graph"]
    assert report["nodes_before"] == 11 and report["nodes_after"] < 11
    ops = [n.op_type for n in out.graph.node]
    assert "Constant" not in ops and ops.count("Mul") == 1  # 2 * 4 folded; the weight's Mul kept
    assert "Add" not in ops  # read by nothing
    inits = {i.name: i for i in out.graph.initializer}
    assert inits["q"].data_type == TensorProto.INT8  # the weight stays int8 codes in the file
    assert not any(i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] == 8 for i in inits.values())
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(proto, x))
