"""Layer-streamed calibration equals whole-graph calibration; the 'sample' observer; smooth_quant on samples."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from eqcompiler.calibration import layer_stream
from eqcompiler.calibration.calibrate import Calibrator, calibrate
from eqcompiler.errors import EqcError
from eqcompiler.calibration.observers import SAMPLE_ROWS
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.runtime.session import causal_feed, make_session
from eqcompiler.calibration.stats import CalibrationStats, TensorStats

from conftest import WIKI_VALID, run_eqc

SYNTH_SPECS = {
    "rms-matmul": dict(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96, vocab=256),
    "ln-gemm-tied-bias": dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=256, norm="layer",
                              act="gelu", linear="gemm", tied=True, bias=True),
}


def _synthetic(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    from eqcompiler.models.synthetic import SynthSpec, save_artifact

    return save_artifact(SynthSpec(**SYNTH_SPECS[name]), tmp_path / name, text=WIKI_VALID.read_text()[:100_000])


def assert_same_stats(a: CalibrationStats, b: CalibrationStats, rtol: float = 1e-5) -> int:
    """Every statistic of every tensor equal (integers exactly, floats within rtol of the tensor's scale)."""
    assert sorted(a.tensors) == sorted(b.tensors)
    compared = 0
    for name, x in a.tensors.items():
        y = b.tensors[name]
        assert x.count == y.count, name
        scale = max(abs(x.min), abs(x.max), 1e-12)
        assert abs(x.min - y.min) <= rtol * scale and abs(x.max - y.max) <= rtol * scale, name
        if x.absmax_channel is not None:
            np.testing.assert_allclose(y.absmax_channel, x.absmax_channel, rtol=rtol, atol=rtol * scale)
        assert sorted(x.extra) == sorted(y.extra), name
        for key, value in x.extra.items():
            if value.dtype.kind in "iu":
                np.testing.assert_array_equal(y.extra[key], value, err_msg=f"{name} {key}")
            else:
                np.testing.assert_allclose(y.extra[key], value, rtol=rtol, atol=rtol * float(np.abs(value).max() + 1e-30),
                                           err_msg=f"{name} {key}")
            compared += 1
    return compared


def test_stages_follow_layers_and_only_read_earlier_stages(tiny_artifact, tmp_path):
    for path, layers in ((tiny_artifact("llama") / "model.onnx", 2), (_synthetic(tmp_path, "rms-matmul") / "model.onnx", 3)):
        graph = onnx.load(str(path), load_external_data=False).graph
        stages = layer_stream.plan_stages(graph)
        assert [s.key for s in stages] == list(range(layers))
        assert sum(len(s.nodes) for s in stages) == len(graph.node)
        available = {i.name for i in graph.input}
        for stage in stages:
            assert set(stage.inputs) <= available, (stage.key, set(stage.inputs) - available)
            available |= stage.defined
            # each stage reads its own layer's weights, no later layer's (tiny llama shares its all-ones
            # norm weight, named for layer 0, across layers; embeddings and constants have no number)
            keys = {layer_stream.layer_key(n) for n in stage.initializers} - {None}
            assert stage.key in keys and max(keys) == stage.key, (stage.key, keys)


def test_all_observers_leave_out_sample_unless_named():
    from eqcompiler.calibration.observers import parse_observers

    assert "sample" not in parse_observers("all")
    assert parse_observers("all,sample") == (*parse_observers("all"), "sample")


def test_layer_key_rule():
    assert layer_stream.layer_key("model.layers.12.mlp.up_proj.weight_t") == 12
    assert layer_stream.layer_key("model/layers.3/self_attn/q_proj.weight_t") == 3
    assert layer_stream.layer_key("encoder.layer.5.output.dense.weight") == 5
    assert layer_stream.layer_key("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_stream.layer_key("model.embed_tokens.weight") is None
    assert layer_stream.layer_key("onnx::MatMul_1234") is None


def test_streamed_equals_whole_graph_tiny_llama_all_observers_with_decode(tiny_artifact):
    kwargs = dict(samples=3, seq_len=32, observers="all,sample", decode_steps=2, threads=1)
    whole = calibrate(tiny_artifact("llama"), WIKI_VALID, **kwargs)
    streamed = calibrate(tiny_artifact("llama"), WIKI_VALID, stream_layers=True, **kwargs)
    assert streamed.meta["stream_layers"] is True and whole.meta["stream_layers"] is False
    assert any(n.startswith("present.") for n in whole.tensors)  # the kv observer ran in both
    assert assert_same_stats(whole, streamed) > 50
    sample = streamed.tensors[next(n for n in streamed.tensors if "sample_rows" in streamed.tensors[n].extra)]
    assert sample.extra["sample_rows"].shape[0] == 3 * (32 + 2)  # every prefill and decode row, < SAMPLE_ROWS


def test_streamed_equals_whole_graph_bert_encoder(tiny_artifact):
    art = tiny_artifact("bert")
    kwargs = dict(samples=2, seq_len=32, observers="minmax,absmax_channel,abssum,sample", threads=1)
    whole = calibrate(art, WIKI_VALID, **kwargs)
    streamed = calibrate(art, WIKI_VALID, stream_layers=True, **kwargs)
    assert assert_same_stats(whole, streamed) == 3 * len(whole.tensors)


@pytest.mark.parametrize("spec", sorted(SYNTH_SPECS))
def test_streamed_equals_whole_graph_synthetic(tmp_path, spec):
    art = _synthetic(tmp_path, spec)
    kwargs = dict(samples=2, seq_len=24, observers="minmax,absmax_channel,abssum,hist,gram,sample", threads=1)
    whole = calibrate(art, WIKI_VALID, **kwargs)
    streamed = calibrate(art, WIKI_VALID, stream_layers=True, **kwargs)
    assert assert_same_stats(whole, streamed) >= 5 * len(whole.tensors)


def test_sample_observer_is_a_mergeable_bottom_k_subset(tiny_artifact):
    art = tiny_artifact("llama")
    cal = Calibrator(art, WIKI_VALID, samples=6, seq_len=128, observers="minmax,sample", threads=1)
    full = cal.run(range(6))
    odd, even = cal.run([1, 3, 5]), cal.run([4, 0, 2])  # any grouping and order
    for name, t in full.items():
        merged = TensorStats()
        merged.merge(odd[name])
        merged.merge(even[name])
        np.testing.assert_array_equal(merged.extra["sample_keys"], t.extra["sample_keys"])
        np.testing.assert_array_equal(merged.extra["sample_rows"], t.extra["sample_rows"])
        keys = t.extra["sample_keys"]
        assert len(keys) == SAMPLE_ROWS and np.all(np.diff(keys.astype(np.float64)) > 0)
        assert t.extra["sample_rows"].shape == (SAMPLE_ROWS, t.absmax_channel.shape[0] if t.absmax_channel is not None
                                                else t.extra["sample_rows"].shape[1])
        # kept rows are real rows: within the observed range
        assert t.extra["sample_rows"].min() >= t.min and t.extra["sample_rows"].max() <= t.max


def test_sample_rows_survive_the_stats_file(tiny_artifact, tmp_path):
    out = tmp_path / "s.npz"
    stats = calibrate(tiny_artifact("llama"), WIKI_VALID, samples=2, seq_len=32, observers="minmax,absmax_channel,sample",
                      out=out, stream_layers=True)
    back = CalibrationStats.load(out)
    assert back.meta["stream_layers"] is True
    assert assert_same_stats(stats, back, rtol=0) == 2 * len(stats.tensors)


def test_smooth_quant_auto_uses_samples_and_stays_exact(tiny_artifact, tmp_path):
    art = tiny_artifact("llama")
    stats = tmp_path / "s.npz"
    calibrate(art, WIKI_VALID, samples=4, seq_len=64, observers="minmax,absmax_channel,sample", out=stats)
    recipe = tmp_path / "smooth.json"
    recipe.write_text(json.dumps({"name": "smooth-only", "requires_calibration": True,
                                  "passes": [{"pass": "smooth_quant", "options": {"search": "auto"}}]}))
    manifest = compile_model(art, str(recipe), tmp_path / "out", calib=str(stats))
    report = manifest["quantization"]["report"]["smooth_quant"]
    assert report["method"] == "sample"
    sites = list(report["sites"].values())
    assert len(sites) >= 6 and all("score" in s for s in sites)
    assert all(s["score"] <= s["score_unsmoothed"] + 1e-12 for s in sites)  # identity competes
    assert any(s["alpha"] is not None for s in sites)
    ids = np.random.default_rng(0).integers(4, 500, (1, 40))
    ref, new = (make_session(p / "model.onnx") for p in (art, tmp_path / "out"))
    a = ref.run(["logits"], causal_feed(ref, ids))[0]
    b = new.run(["logits"], causal_feed(new, ids))[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_smooth_quant_auto_refuses_big_model_without_samples(tiny_artifact, tiny_llama_stats, tmp_path, monkeypatch):
    monkeypatch.setattr(layer_stream, "AUTO_FRACTION", 0.0)  # every model counts as too big for one session
    recipe = tmp_path / "smooth.json"
    recipe.write_text(json.dumps({"name": "smooth-only", "requires_calibration": True,
                                  "passes": [{"pass": "smooth_quant", "options": {"search": "auto"}}]}))
    with pytest.raises(EqcError, match="'sample'.*observer.*--observers minmax,absmax_channel,sample"):
        compile_model(tiny_artifact("llama"), str(recipe), tmp_path / "out", calib=str(tiny_llama_stats))
    assert not (tmp_path / "out").exists()


def test_smoothing_external_weights_stays_lazy(tmp_path):
    """Smoothed copies of memory-mapped weights are LazyTensors equal to the eager product."""
    from eqcompiler.artifact import folder as am
    from eqcompiler.compile.pass_base import CompileContext
    from eqcompiler.passes.smooth_quant import SmoothQuantPass

    art = _synthetic(tmp_path, "rms-matmul")
    stats = calibrate(art, WIKI_VALID, samples=2, seq_len=24, observers="minmax,absmax_channel,sample")
    model = am.load_ir(art)
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()
              if isinstance(v.const_value, ir.ExternalTensor)}
    SmoothQuantPass(CompileContext(stats=stats), search="none", alpha=0.5)(model)
    smoothed = {n: v.const_value for n, v in model.graph.initializers.items() if n.endswith("_smoothed")
                and v.const_value.shape is not None and len(v.const_value.shape) == 2}
    assert len(smoothed) >= 3 * 6  # q k v gate up down per layer (+ o_proj where the attn fold applies)
    assert all(isinstance(t, ir.LazyTensor) for t in smoothed.values())
    name = "model/layers.0/mlp/down_proj.weight_t"
    t = smoothed[f"{name}_smoothed"]
    ratio = t.numpy() / before[name]  # computed on demand from the mapped source
    assert t.shape == before[name].shape
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-5)  # one s per input row
    assert float(np.abs(ratio - 1).max()) > 0.01  # and it was smoothed


def test_cli_stream_layers_and_auto_message(tiny_artifact, tmp_path):
    art = tiny_artifact("llama")
    proc = run_eqc("calibrate", art, "--data", WIKI_VALID, "--samples", 2, "--seq-len", 32, "--stream-layers",
                   "-o", tmp_path / "a.npz", "--json")
    assert json.loads(proc.stdout)["stream_layers"] is True
    proc = run_eqc("calibrate", art, "--data", WIKI_VALID, "--samples", 2, "--seq-len", 32, "-o", tmp_path / "b.npz",
                   "--json")  # no flag: decided by size, and the summary says why
    auto = json.loads(proc.stdout)
    assert auto["stream_layers"] is False and "one whole-graph session" in auto["stream_reason"]
    assert "layer-streamed" not in run_eqc("calibrate", art, "--data", WIKI_VALID, "--samples", 1, "--seq-len", 32,
                                           "-o", tmp_path / "c.npz").stdout
    assert_same_stats(CalibrationStats.load(tmp_path / "b.npz"), CalibrationStats.load(tmp_path / "a.npz"))


def test_two_streamed_ranks_equal_one_process_with_samples(tiny_artifact, tmp_path):
    """--workers 2 --stream-layers: each rank streams its shard; sample rows merge exactly on rank 0."""
    art = tiny_artifact("llama")
    obs = "minmax,absmax_channel,hist,sample"
    single = calibrate(art, WIKI_VALID, samples=5, seq_len=128, observers=obs, threads=1)  # 128: tiny llama's positions
    proc = run_eqc("calibrate", art, "--data", WIKI_VALID, "--samples", 5, "--seq-len", 128, "--observers", obs,
                   "--workers", 2, "--threads", 1, "--stream-layers", "-o", tmp_path / "d.npz", "--json")
    assert json.loads(proc.stdout)["stream_layers"] is True
    merged = CalibrationStats.load(tmp_path / "d.npz")
    assert assert_same_stats(single, merged, rtol=1e-6) == 4 * len(single.tensors)  # hist, hist_max, sample x2
    name = next(iter(merged.tensors))
    assert merged.tensors[name].extra["sample_rows"].shape[0] == SAMPLE_ROWS  # 640 rows seen over 2 ranks
