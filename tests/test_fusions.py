"""Transformer-block fusions (passes/fuse_skip_rms_norm.py, passes/fuse_group_query_attention.py): each on a
tiny exported decoder, checked with onnx.checker and ORT against the unfused graph on a prompt, a decode step,
a left-padded batch and a chunked prefill."""
from __future__ import annotations

import collections
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from eqcompiler.compile.pass_base import CompileContext, make_pass
from eqcompiler.export.hf import causal_example

CASES = {"prompt": dict(batch=2, seq=7, past=0), "decode": dict(batch=2, seq=1, past=9),
         "padded": dict(batch=2, seq=6, past=0, pad_left=2), "chunk": dict(batch=1, seq=5, past=6)}


def _fused(src: pathlib.Path, out: pathlib.Path, passes: list[str], max_positions: int = 128) -> CompileContext:
    model = ir.load(src / "model.onnx")
    context = CompileContext(max_positions=max_positions)
    for name in passes:
        make_pass(name, context, {})(model)
    out.mkdir(parents=True, exist_ok=True)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    onnx.checker.check_model(str(out / "model.onnx"))
    return context


def _ops(path: pathlib.Path) -> collections.Counter:
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


def _compare(ref: pathlib.Path, fused: pathlib.Path, layout: dict[str, int], vocab: int) -> dict[str, float]:
    from eqcompiler.runtime.session import make_session

    a, b = make_session(ref / "model.onnx", threads=1), make_session(fused / "model.onnx", threads=1)
    errors = {}
    for case, kw in CASES.items():
        feed = causal_example(layout, vocab, seed=3, **kw)
        out_a, out_b = a.run(None, feed), b.run(None, feed)
        pad = kw.get("pad_left", 0)
        # padded query rows are garbage by design (fully masked), and so are the cache entries they leave
        la, lb = out_a[0][:, pad:], out_b[0][:, pad:]
        errors[case] = float(np.abs(la - lb).max() / max(1.0, float(np.abs(la).max())))
        for pa, pb in zip(out_a[1:], out_b[1:]):
            errors[case] = max(errors[case], float(np.abs(pa[:, :, pad:] - pb[:, :, pad:]).max()))
    return errors


def _layout(folder: pathlib.Path) -> dict[str, int]:
    import json

    kv = json.loads((folder / "manifest.json").read_text())["kv_cache"]
    return {k: kv[k] for k in ("num_layers", "num_kv_heads", "head_dim")}


def test_fused_llama_matches_unfused_graph(llama, tmp_path):
    context = _fused(llama, tmp_path / "fused", ["fuse_skip_rms_norm", "fuse_group_query_attention"])
    # tiny llama, 2 layers: 4 of its 5 norms follow a residual Add (the first layer's input norm does not)
    assert context.report["fuse_skip_rms_norm"]["fused"] == 4
    assert context.report["fuse_group_query_attention"]["fused"] == 2
    # the exported mask is plain causal + padding: GroupQueryAttention's own causal mask and a padding bias from
    # attention_mask replace it, so nothing but the attention reads the past (its buffer can be shared)
    assert context.report["fuse_group_query_attention"]["kv_buffer"] == "shareable"
    ops = _ops(tmp_path / "fused")
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert "Softmax" not in ops and ops["Pow"] == 1  # only the first input norm stays decomposed
    assert not context.warnings
    errors = _compare(llama, tmp_path / "fused", _layout(llama), 512)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("window", [5, 64])
def test_a_sliding_window_mask_is_kept(window, tmp_path):
    """Mistral's mask also blocks keys outside its window: the check finds it is not plain causal + padding, so
    the graph's own mask stays the attention bias (same numbers) and the cache is not shareable. A window
    longer than the short check (64 of 128 positions) shows in the decode step at the last position."""
    fp32 = _tiny_export(tmp_path, "mistral", sliding_window=window)
    context = _fused(fp32, tmp_path / "fused", ["fuse_skip_rms_norm", "fuse_group_query_attention"])
    assert context.report["fuse_group_query_attention"]["fused"] == 2
    assert context.report["fuse_group_query_attention"]["kv_buffer"] == "concat"
    errors = _compare(fp32, tmp_path / "fused", _layout(fp32), 512)
    assert max(errors.values()) < 1e-4, errors


def test_fusion_leaves_rotary_tables_of_the_models_length(llama, tmp_path):
    _fused(llama, tmp_path / "fused", ["fuse_group_query_attention"], max_positions=128)
    model = onnx.load(str(tmp_path / "fused" / "model.onnx"))
    tables = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if "rotary" in i.name}
    cos, sin = tables["rotary_cos_cache"], tables["rotary_sin_cache"]
    assert cos.shape == sin.shape == (128, 8)  # positions x head_dim/2 (tiny llama: head_dim 16)
    # rope_theta 10000: position p, pair i rotates by p / 10000^(2i/16)
    expected = np.arange(128)[:, None] / 10000.0 ** (np.arange(0, 16, 2) / 16.0)[None, :]
    np.testing.assert_allclose(cos, np.cos(expected), atol=1e-5)
    np.testing.assert_allclose(sin, np.sin(expected), atol=1e-5)


def _tiny_export(root: pathlib.Path, family: str = "llama", **overrides) -> pathlib.Path:
    """A tiny random `family` model with config `overrides`, exported into root/fp32."""
    from conftest import WIKI_VALID
    from eqcompiler.export.hf import export
    from eqcompiler.models.tiny import save_tiny_model

    hf = save_tiny_model(family, root / "hf", WIKI_VALID.read_text()[:50_000], **overrides)
    export(str(hf), root / "fp32")
    return root / "fp32"


@pytest.fixture(scope="module")
def mha_llama(tmp_path_factory):
    """Every query head has its own kv head: repeat_kv is absent from the graph."""
    return _tiny_export(tmp_path_factory.mktemp("mha"), num_key_value_heads=4)


def test_multi_head_variant_fuses_and_matches(mha_llama, tmp_path):
    context = _fused(mha_llama, tmp_path / "fused", ["fuse_skip_rms_norm", "fuse_group_query_attention"])
    assert context.report["fuse_group_query_attention"]["fused"] == 2
    errors = _compare(mha_llama, tmp_path / "fused", _layout(mha_llama), 512)
    assert max(errors.values()) < 1e-4, errors


@pytest.fixture(scope="module")
def narrow_heads(tmp_path_factory):
    return _tiny_export(tmp_path_factory.mktemp("narrow"), head_dim=8)


def test_attention_ort_cannot_run_stays_unfused_with_a_warning(narrow_heads, tmp_path):
    """head_dim 8: ORT's CPU GroupQueryAttention needs a multiple of 16, so the graph keeps its attention."""
    context = _fused(narrow_heads, tmp_path / "fused", ["fuse_skip_rms_norm", "fuse_group_query_attention"])
    assert context.report["fuse_group_query_attention"]["fused"] == 0
    assert context.report["fuse_skip_rms_norm"]["fused"] == 4
    assert any("2 attention block(s) stay unfused" in w for w in context.warnings), context.warnings
    assert context.report["fuse_group_query_attention"]["kv_buffer"] == "concat"
    assert _ops(tmp_path / "fused")["Softmax"] == 2
    errors = _compare(narrow_heads, tmp_path / "fused", _layout(narrow_heads), 512)
    assert max(errors.values()) < 1e-4, errors


def test_graph_without_attention_mask_is_left_alone(llama, tmp_path):
    model = ir.load(llama / "model.onnx")
    model.graph.inputs[1].name = "mask"  # not the conventional name: the lengths cannot be derived
    context = CompileContext(max_positions=128)
    result = make_pass("fuse_group_query_attention", context, {})(model)
    assert not result.modified and context.report["fuse_group_query_attention"]["fused"] == 0
    assert any("no 'attention_mask' input" in w for w in context.warnings)


@pytest.mark.parametrize("recipe", ["w4-rtn", "none"])
def test_packed_projections_give_the_unpacked_numbers(llama, recipe, tmp_path):
    """q/k/v and gate/up packed into one MatMulNBits (4-bit) or one MatMul (float): same logits."""
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.lowering.targets import ORT_CPU_OPTIONS
    from eqcompiler.runtime.session import causal_feed, make_session

    portable = tmp_path / "portable"
    compile_model(llama, recipe, portable)
    packed = compile_model(portable, "none", tmp_path / "packed", target="ort-cpu")
    assert packed["quantization"]["report"]["pack_parallel_projections"] == {"packed_nodes": 10, "groups": 4}
    steps = [s["pass"] for s in packed["quantization"]["passes"]]
    lowering = steps[steps.index("fuse_skip_rms_norm"):steps.index("pack_parallel_projections")]
    model = ir.load(portable / "model.onnx")
    context = CompileContext(max_positions=128)
    for name in lowering:
        make_pass(name, context, dict(ORT_CPU_OPTIONS.get(name, {})))(model)
    (tmp_path / "unpacked").mkdir()
    ir.save(model, tmp_path / "unpacked" / "model.onnx", external_data="model.onnx.data")
    kind = "MatMulNBits" if recipe == "w4-rtn" else "MatMul"
    # 10 nodes became 4 (two layers: q/k/v -> 1, gate/up -> 1), each followed by a Split
    assert _ops(tmp_path / "unpacked")[kind] - _ops(tmp_path / "packed")[kind] == 6
    assert _ops(tmp_path / "packed")["Split"] == 4
    ids = np.arange(7, 7 + 30, dtype=np.int64)[None, :] % 500
    logits = []
    for folder in ("packed", "unpacked"):
        session = make_session(tmp_path / folder / "model.onnx", threads=1)
        logits.append(session.run(["logits"], causal_feed(session, ids))[0])
    assert np.abs(logits[0] - logits[1]).max() <= 1e-5 * np.abs(logits[1]).max()
