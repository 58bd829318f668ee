"""Bring your own ONNX: a graph exported at an older opset (torch.onnx writes 17-20, Optimum 14-18) is
converted with onnx's version converter, not refused; a conversion that fails is one line naming the op."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest

from conftest import run_eqc


def _torch_mlp(path: pathlib.Path, opset: int) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    x = torch.randn(3, 64)
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=opset, dynamo=False)


@pytest.mark.parametrize("opset", [17, 20])
def test_older_opset_graph_is_converted_and_quantized(tmp_path, opset):
    import onnxruntime as ort

    src = tmp_path / "mlp.onnx"
    _torch_mlp(src, opset)
    assert onnx.load(str(src)).opset_import[0].version == opset
    proc = run_eqc("compile", src, "--recipe", "w8", "-o", tmp_path / "w8", "--json")
    manifest = json.loads((tmp_path / "w8" / "manifest.json").read_text())
    assert any(f"converted from opset {opset} to 21" in w for w in manifest["quantization"]["warnings"]), proc.stdout
    out = onnx.load(str(tmp_path / "w8" / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == 2  # both Linear weights int8
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "w8" / "model.onnx")).run(None, {"x": x})[0]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.02, err  # int8 weights: changed, but within rounding


def test_a_graph_the_converter_cannot_take_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Scatter", ["x", "i", "u"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
                                            helper.make_tensor_value_info("i", TensorProto.INT64, [2, 2]),
                                            helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    src = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)]), str(src))
    proc = run_eqc("compile", src, "--recipe", "w8", "-o", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Scatter" in proc.stderr and "opset 8" in proc.stderr
    assert not (tmp_path / "out").exists()
