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
    assert any("2 attention block(s) stay unfused (head_dim 8 is not a multiple of 16" in w for w in context.warnings), \
        context.warnings
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


# --- attention variants: per-head q/k norms (qwen3, gemma3), fused qkv + partial rotary (phi3), soft-capped scores
# (gemma2). Norm weights are randomized before export: at their initial values (all ones, or gemma's zeros folded
# into 1 + w) a fused graph that dropped a weight, or gave k the query's, would still give the same numbers.

def _randomize_norms(hf: pathlib.Path, seed: int = 5) -> None:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(hf)


def _variant_export(root: pathlib.Path, family: str, **overrides) -> pathlib.Path:
    from conftest import WIKI_VALID
    from eqcompiler.export.hf import export
    from eqcompiler.models.tiny import save_tiny_model

    hf = save_tiny_model(family, root / "hf", WIKI_VALID.read_text()[:50_000], **overrides)
    _randomize_norms(hf)
    export(str(hf), root / "fp32")
    return root / "fp32"


PARTIAL_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
# family, config overrides, the pass report's variant keys, GroupQueryAttention attributes, RotaryEmbedding attributes
VARIANTS = {
    "qwen3": ("qwen3", {}, {"head_norms": 2}, {}, {}),  # norm between the heads' Reshape and Transpose
    "gemma3_text": ("gemma3_text", {}, {"head_norms": 2}, {}, {}),  # norm after the Transpose; local + global rotary
    "gemma2": ("gemma2", {}, {"softcapped": 2}, {"softcap": 50.0}, {}),
    "phi3": ("phi3", {}, {}, {}, {}),  # qkv Slices; partial rotary's Slice/Concat at factor 1.0: a full rotation
    "phi3-partial": ("phi3", PARTIAL_ROPE, {"partial_rotary": 2}, {}, {"rotary_embedding_dim": 8}),
}


@pytest.fixture(scope="module")
def variant_export(tmp_path_factory):
    cache: dict[str, pathlib.Path] = {}

    def get(case: str) -> pathlib.Path:
        if case not in cache:
            family, overrides = VARIANTS[case][:2]
            cache[case] = _variant_export(tmp_path_factory.mktemp(case), family, **overrides)
        return cache[case]

    return get


def _attrs(path: pathlib.Path, op_type: str) -> list[dict]:
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node
            if n.op_type == op_type]


@pytest.mark.parametrize("case", list(VARIANTS))
def test_attention_variant_fuses_and_matches(case, variant_export, tmp_path):
    _, _, report, gqa_attrs, rotary_attrs = VARIANTS[case]
    fp32 = variant_export(case)
    context = _fused(fp32, tmp_path / "fused", ["fuse_skip_rms_norm", "fuse_group_query_attention"])
    got = context.report["fuse_group_query_attention"]
    assert got["fused"] == 2 and got["unfused"] == 0 and not context.warnings, (got, context.warnings)
    assert {k: got[k] for k in ("head_norms", "softcapped", "partial_rotary") if k in got} == report
    assert context.report["fuse_skip_rms_norm"]["fused"] == 4
    ops = _ops(tmp_path / "fused")
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4 and "Softmax" not in ops
    for attrs in _attrs(tmp_path / "fused", "GroupQueryAttention"):
        assert {k: attrs.get(k) for k in gqa_attrs} == gqa_attrs and ("softcap" in attrs) == bool(gqa_attrs)
    for attrs in _attrs(tmp_path / "fused", "RotaryEmbedding"):
        assert {k: attrs.get(k) for k in rotary_attrs} == rotary_attrs
        assert ("rotary_embedding_dim" in attrs) == bool(rotary_attrs)
    errors = _compare(fp32, tmp_path / "fused", _layout(fp32), 512)
    assert max(errors.values()) < 1e-4, errors


def test_head_norms_run_as_one_ort_kernel_each(variant_export, tmp_path):
    """The per-head norm is re-emitted as the graph's own ops (ORT's SimplifiedLayerNormalization has no ONNX schema,
    and GroupQueryAttention's q/k norm inputs run before its own rotary, which eqc does not use, and are refused by
    the CPU provider): ORT's session-level fusion turns each into one SimplifiedLayerNormalization, as it does the
    unfused graph's. qwen3, 2 layers: 1 first input norm + 2 x (q, k) head norms, no decomposed norm left."""
    import onnxruntime as ort

    _fused(variant_export("qwen3"), tmp_path / "fused", ["fuse_skip_rms_norm", "fuse_group_query_attention"])
    # the re-emitted nodes are named by position, not by the rewriter's process-wide counter: fusing again in the
    # same process (the counter has moved on) writes the same bytes
    _fused(variant_export("qwen3"), tmp_path / "again", ["fuse_skip_rms_norm", "fuse_group_query_attention"])
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "fused" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "fused" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    assert ops["SimplifiedLayerNormalization"] == 5 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert "Pow" not in ops and "Sqrt" not in ops


def test_a_soft_cap_that_is_not_one_constant_is_refused_by_name(variant_export, tmp_path):
    """gemma2 with its soft-cap multiplier changed (50 -> 30): no GroupQueryAttention softcap computes that, so the
    blocks stay as they are and the warning says what did not match."""
    model = ir.load(variant_export("gemma2") / "model.onnx")
    for node in model.graph:
        if node.op_type == "Mul" and node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "Tanh":
            if "self_attn" in node.name:
                node.replace_input_with(1, ir.Value(name=f"{node.name}/cap", const_value=ir.tensor(np.float32(30.0)),
                                                    type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([])))
                model.graph.register_initializer(node.inputs[1])
    context = CompileContext(max_positions=128)
    make_pass("fuse_group_query_attention", context, {})(model)
    report = context.report["fuse_group_query_attention"]
    assert report["fused"] == 0 and report["unfused"] == 2
    assert report["refused"] == "soft-cap divisor 50.0 and multiplier 30.0 are not one positive constant"
    assert context.warnings == ["fuse_group_query_attention: 2 attention block(s) stay unfused "
                                "(soft-cap divisor 50.0 and multiplier 30.0 are not one positive constant)"]


def test_every_attention_rule_is_matched_from_one_output_node():
    """onnxscript matches a pattern with several output nodes by trying every combination of graph nodes of their
    op types: present_k reachable from the attention output only through an OrValue made it a second output
    node, and the fusion took 376 s instead of 4 s on SmolLM2 (30 layers, hundreds of Concats). Each variant is
    a rule of its own so that every pattern node is reached from the attention output's Reshape."""
    from eqcompiler.passes.fuse_group_query_attention import rules

    ruleset = rules(None, (None, None), None, None)
    assert len(ruleset.rules) == 12  # {no norm, norm before, norm after the Transpose} x softcap x repeat_kv
    for rule in ruleset.rules:
        assert [n.op_identifier() for n in rule._target_pattern.output_nodes] == [("", "Reshape", "")], rule.name
