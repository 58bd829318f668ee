"""quantize_activations_ema: the EMA-tracked online scale, carried as cache state through decode steps."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from eqcompiler.artifact import folder as am
from eqcompiler.runtime.decode import CacheRunner
from eqcompiler.errors import EqcError
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.passes.quantize_activations_ema import QuantizeActivationsEmaPass, ema_reference
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.runtime.session import causal_feed, make_session


def _linear(k: int = 16, n: int = 6) -> tuple[ir.Model, np.ndarray]:
    w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", k]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w, name="w"))
    mm = ir.node("MatMul", [x, wv], name="/layers.0/mlp/down_proj/MatMul")
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape(["batch", "seq", n])
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[wv], opset_imports={"": 21}, name="linear")
    return ir.Model(graph, ir_version=10), w


@pytest.mark.parametrize("batch", [1, 2])
def test_ema_state_follows_the_reference_across_steps(batch):
    model, w = _linear()
    context = CompileContext()
    QuantizeActivationsEmaPass(context, decay=0.75)(model)
    assert context.report["quantize_activations_ema"]["state"] == {"x": "past_key_values.act_ema.0"}
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    session = make_session(proto.SerializeToString())
    assert [o.name for o in session.get_outputs()] == ["y", "present.act_ema.0"]
    rng = np.random.default_rng(1)
    steps = [rng.normal(size=(batch, 5, 16)).astype(np.float32)]  # prefill
    steps += [rng.normal(size=(batch, 1, 16)).astype(np.float32) * g for g in (0.5, 3.0, 1.0)]  # decode steps
    steps[2][0, 0, 3] = 40.0  # an outlier step: the running scale saturates it instead of jumping
    state = np.zeros((batch, 1, 0, 1), dtype=np.float32)
    for x, (xq, m) in zip(steps, ema_reference(steps, 0.75)):
        y, state = session.run(None, {"x": x, "past_key_values.act_ema.0": state})
        assert state.shape == (batch, 1, 1, 1)
        np.testing.assert_allclose(state.reshape(-1), m, rtol=1e-6)
        np.testing.assert_allclose(y, xq @ w, rtol=1e-4, atol=1e-4)
    # The outlier step was clipped to the EMA range (127 * s), not represented.
    xq2, m2 = ema_reference(steps, 0.75)[2]
    assert xq2[0, 0, 3] < 40.0 and m2[0] < 40.0
    # decay 0: each step's own absmax, i.e. plain per-tensor dynamic quantization.
    ref0 = ema_reference(steps, 0.0)
    np.testing.assert_allclose(ref0[2][1], np.abs(steps[2]).max(axis=(1, 2)), rtol=1e-6)


def test_ema_options_and_empty_match():
    with pytest.raises(EqcError, match="decay"):
        QuantizeActivationsEmaPass(CompileContext(), decay=1.0)
    model, _ = _linear()
    with pytest.raises(EqcError, match="matched no linear layer input"):
        QuantizeActivationsEmaPass(CompileContext(), include="q_proj")(model)


def test_ema_recipe_decodes_tiny_llama_through_the_cache(tiny_artifact, tmp_path):
    """Compiled with int8 weights and an int8 KV cache; the decode loop carries the EMA state with the cache."""
    recipe = tmp_path / "ema.json"
    recipe.write_text(json.dumps({"name": "w8a8-ema", "description": "test", "requires_calibration": False, "passes": [
        {"pass": "quantize_weights", "options": {"bits": 8, "symmetric": True, "block_size": 0}},
        {"pass": "quantize_activations_ema", "options": {"decay": 0.9, "exclude": "^lm_head$"}},
        {"pass": "quantize_kv_cache", "options": {"bits": 8, "key_granularity": "token", "value_granularity": "token"}}]}))
    src, out = tiny_artifact("llama"), tmp_path / "ema"
    manifest = compile_model(src, str(recipe), out, calib=None)
    report = manifest["quantization"]["report"]["quantize_activations_ema"]
    # The running scales are not KV cache: the cache's bytes per token are those of the KV tensors alone.
    kv_only = tmp_path / "kv.json"
    kv_only.write_text(json.dumps({"name": "kv", "description": "test", "requires_calibration": False, "passes": [
        {"pass": "quantize_kv_cache", "options": {"bits": 8, "key_granularity": "token", "value_granularity": "token"}}]}))
    kv_manifest = compile_model(src, str(kv_only), tmp_path / "kv", calib=None)
    assert manifest["kv_cache"]["bytes_per_token"] == kv_manifest["kv_cache"]["bytes_per_token"] > 0
    assert report["tensors"] == 2 * 4  # 2 layers x (q/k/v input, o_proj input, gate/up input, down_proj input)
    onnx.checker.check_model(str(out / "model.onnx"))
    ids = np.random.default_rng(0).integers(5, 500, (1, 12))
    runner = CacheRunner(make_session(am.model_file(am.resolve_artifact(out))))
    assert sum(n.startswith("present.act_ema.") for n in runner.cache_outputs) == report["tensors"]
    logits = [runner.step(ids[:, :8])] + [runner.step(ids[:, i:i + 1]) for i in range(8, 12)]
    stepped = np.concatenate(logits, axis=1)
    assert all(runner.past[f"past_key_values.act_ema.{i}"].numpy().shape == (1, 1, 1, 1) for i in range(report["tensors"]))
    kv_only = sum(v.numpy().nbytes for n, v in runner.past.items() if not n.startswith("past_key_values.act_ema."))
    assert runner.cache_bytes() == kv_only  # the running scales are not counted as KV cache
    ref_session = make_session(am.model_file(am.resolve_artifact(src)))
    ref = ref_session.run(["logits"], causal_feed(ref_session, ids))[0]
    assert np.abs(stepped - ref).max() / np.abs(ref).max() < 0.1
    # The state is history: the same last token after a different history sees different scales.
    runner.reset()
    runner.step(ids[:, :8] * 0 + 7)
    other = runner.step(ids[:, 8:9])
    assert not np.allclose(other, logits[1])
