"""The lm_head and the attention sites found from the graph's structure, not from exporter node names (issue 20).

torch.onnx dynamo names every linear `node_linear_*`, so `exclude: ^lm_head$` and a name test for the v projection
both missed; Optimum stores an untied copy of a tied lm_head, which ORT then runs with int8 activation blocks.
Here on the tiny LLaMA (tied, GQA): compile.lm_head.is_lm_head, SmoothQuant's attention sites on a graph with
dynamo-style names, and tie_lm_head (exact, undoes an untied copy, leaves a different head alone)."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eqcompiler.compile.graph import find_linear_sites
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.lm_head import is_lm_head
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.errors import EqcError
from eqcompiler.passes.smooth_quant import SmoothQuantOptions, find_smooth_sites


def _dynamo_named(src: pathlib.Path) -> ir.Model:
    """The tiny LLaMA with every node renamed as torch.onnx dynamo names them (no 'lm_head', no 'v_proj')."""
    model = ir.load(str(src / "model.onnx"))
    for i, node in enumerate(model.graph):
        node.name = f"node_linear_{i}" if node.op_type == "MatMul" else f"node_{node.op_type}_{i}"
    return model


def _recipe(folder: pathlib.Path, passes: list[dict]) -> str:
    path = folder / "recipe.json"
    path.write_text(json.dumps({"name": "lm-head", "requires_calibration": False, "passes": passes}))
    return str(path)


def _untied_graph(src: pathlib.Path, tmp_path: pathlib.Path) -> tuple[pathlib.Path, ir.Model]:
    """What Optimum writes: a bare graph (no eqc manifest) whose lm_head stores a [K, N] copy of the table."""
    compile_model(src, _recipe(tmp_path, [{"pass": "untie_lm_head"}]), tmp_path / "untied-artifact")
    model = ir.load(str(tmp_path / "untied-artifact" / "model.onnx"))
    for value in model.graph.initializers.values():  # into the graph file: it is saved elsewhere
        value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return tmp_path / "untied.onnx", model


def _run(path: pathlib.Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return session.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]


def test_lm_head_is_found_by_structure_whatever_its_name(tiny_artifact):
    model = _dynamo_named(tiny_artifact("llama"))
    heads = [s for s in find_linear_sites(model.graph) if is_lm_head(s.node)]
    assert len(heads) == 1 and heads[0].node.outputs[0].name == "logits"  # the tied MatMul, 1 of 15
    assert len(find_linear_sites(model.graph)) == 15
    selected = find_linear_sites(model.graph, LayerSelection(exclude_lm_head=True))
    assert len(selected) == 14 and heads[0].node not in {s.node for s in selected}
    # A plain MLP's last Gemm reaches the graph output too, but no embedding table and no `logits`: not an lm_head.
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], [w])
    mlp = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    (site,) = find_linear_sites(mlp.graph)
    assert not is_lm_head(site.node) and find_linear_sites(mlp.graph, LayerSelection(exclude_lm_head=True))


def test_smooth_quant_finds_attention_sites_with_dynamo_names(tiny_artifact):
    """o_proj's producer (probs x V from the v projection) is found by the path, not by 'v_proj' in a name: the
    renamed graph gets the same 8 sites (2 layers x norm q/k/v, norm gate/up, mlp down, attn o) as eqc's names."""
    src = tiny_artifact("llama")
    head_info = (2, 16)  # 2 KV heads of 16 (the tiny LLaMA's GQA)
    opts = SmoothQuantOptions(exclude_lm_head=True)
    kinds = {}
    for name, model in (("eqc", ir.load(str(src / "model.onnx"))), ("dynamo", _dynamo_named(src))):
        sites, skipped = find_smooth_sites(model.graph, opts, head_info)
        kinds[name] = sorted(s.kind for s in sites)
        assert len(skipped) == 1 and "exclude_lm_head" in next(iter(skipped.values())), skipped
    assert kinds["dynamo"] == kinds["eqc"] == ["attn"] * 2 + ["mlp"] * 2 + ["norm"] * 4
    # Without a KV-cache record (dynamo's graph without cache), the head size comes from v's [b, s, kv, 16] Reshape.
    sites, _ = find_smooth_sites(_dynamo_named(src).graph, opts, None)
    assert sorted((s.groups, s.head_dim) for s in sites if s.kind == "attn") == [(2, 16), (2, 16)]


def test_tie_lm_head_undoes_an_untied_copy_exactly(tiny_artifact, tmp_path):
    """untie_lm_head writes what Optimum writes (a [K, N] copy of the table); tie_lm_head finds it by structure and
    ties it back: the logits are bit-identical and the copy is gone."""
    src = tiny_artifact("llama")
    untied, model = _untied_graph(src, tmp_path)
    ir.save(model, str(untied))
    tied = tmp_path / "tied"
    manifest = compile_model(untied, _recipe(tmp_path, [{"pass": "tie_lm_head", "options": {"required": True}}]), tied)
    report = manifest["quantization"]["report"]["tie_lm_head"]["tied"]
    assert list(report) == ["lm_head"] and report["lm_head"]["float_mb_saved"] == pytest.approx(64 * 512 * 4 / 2**20, abs=0.01)
    proto = onnx.load(str(tied / "model.onnx"))
    onnx.checker.check_model(proto)
    sizes = {p: sum(numpy_helper.to_array(t).size for t in onnx.load(str(p)).graph.initializer)
             for p in (src / "model.onnx", untied, tied / "model.onnx")}
    assert sizes[untied] == sizes[src / "model.onnx"] + 64 * 512 and sizes[tied / "model.onnx"] == sizes[src / "model.onnx"]
    ids = np.random.default_rng(0).integers(4, 500, (2, 17))
    ref = _run(src / "model.onnx", ids)
    assert np.array_equal(_run(tied / "model.onnx", ids), ref)
    assert np.abs(_run(untied, ids) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_tie_lm_head_leaves_a_different_head_alone(tiny_artifact, tmp_path):
    _, model = _untied_graph(tiny_artifact("llama"), tmp_path)
    (head,) = [s for s in find_linear_sites(model.graph) if is_lm_head(s.node)]
    changed = head.weight.const_value.numpy().copy()
    changed[0, 0] += 1e-3  # one value off: not a copy of the table any more
    head.weight.const_value = ir.tensor(changed, name=head.weight.name)
    edited = tmp_path / "edited.onnx"
    ir.save(model, str(edited))
    manifest = compile_model(edited, _recipe(tmp_path, [{"pass": "tie_lm_head"}]), tmp_path / "out")
    assert manifest["quantization"]["report"]["tie_lm_head"]["tied"] == {}
    with pytest.raises(EqcError, match="tie_lm_head found no lm_head storing a copy"):
        compile_model(edited, _recipe(tmp_path, [{"pass": "tie_lm_head", "options": {"required": True}}]),
                      tmp_path / "out2")
