"""Quantized KV cache (passes/quantize_kv_cache.py) and cache-path decoding (eqcompiler/runtime/decode.py)."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import run_eqc
from eqcompiler.artifact.folder import load_ir, resolve_artifact, save_ir
from eqcompiler.runtime.decode import CacheRunner, chunked_perplexity
from eqcompiler.errors import EqcError
from eqcompiler.analysis.evaluate import perplexity
from eqcompiler.compile.pass_base import CompileContext, make_pass
from eqcompiler.passes import quantize_kv_cache as kvq
from eqcompiler.runtime.session import make_session
from eqcompiler.calibration.stats import CalibrationStats, TensorStats

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- numpy math

@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_math_error_bound_and_constant_rows(bits: int) -> None:
    x = RNG.normal(size=(2, 3, 5, 16)).astype(np.float32) * 3
    x[0, 0, 0] = 0.0  # all-zero token
    x[0, 0, 1] = 2.5  # constant positive token (zero range)
    x[0, 0, 2] = -7.0  # constant negative token
    scale, zp = kvq.quant_params(x.min(-1, keepdims=True), x.max(-1, keepdims=True), bits)
    q = kvq.quantize(x, scale, zp, bits)
    y = kvq.dequantize(q, scale, zp)
    assert np.isfinite(y).all() and q.max() <= 2 ** bits - 1
    assert np.all(np.abs(y - x) <= scale / 2 + 1e-6)  # round-to-nearest within the (0-including) range
    np.testing.assert_array_equal(y[0, 0, 0], 0.0)
    np.testing.assert_allclose(y[0, 0, 1], 2.5, rtol=2e-3)  # [0, 2.5] range: 2.5 is the top code
    np.testing.assert_allclose(y[0, 0, 2], -7.0, rtol=2e-3)
    np.testing.assert_array_equal(kvq.fake_quant_per_token(x, bits), y)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_math_constant_channels(bits: int) -> None:
    x = RNG.normal(size=(1, 2, 9, 8)).astype(np.float32)
    x[..., 3] = 0.0  # channel that never moves
    x[..., 5] = 4.0
    lo, hi = x.min(axis=(0, 2)), x.max(axis=(0, 2))  # [heads, dim]
    y = kvq.fake_quant_per_channel(x, lo, hi, bits)
    scale, _ = kvq.quant_params(lo, hi, bits)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[..., 3], 0.0)
    np.testing.assert_allclose(y[..., 5], 4.0, rtol=2e-3)
    assert np.all(np.abs(y - x) <= scale[None, :, None, :] / 2 + 1e-6)


def test_pack4_roundtrip() -> None:
    q = RNG.integers(0, 16, size=(2, 3, 4, 8)).astype(np.uint8)
    p = kvq.pack4(q)
    assert p.shape == (2, 3, 4, 4) and p.dtype == np.uint8
    np.testing.assert_array_equal(kvq.unpack4(p), q)


def test_search_clip_ratio_clips_heavy_tails_not_uniform_data() -> None:
    rng = np.random.default_rng(1)
    # a Gaussian bulk plus one outlier token that sets max: shrinking the range lowers the 4-bit error
    x = rng.normal(size=(1, 2, 1000, 8)).astype(np.float32)
    x[:, :, 0, :] = 10.0
    lo, hi = x.min(axis=(0, 2)), x.max(axis=(0, 2))
    grid = np.array([1.0, 0.8, 0.6, 0.4, 0.2])
    best, errs = kvq.search_clip_ratio([(x, lo, hi)], bits=4, grid=grid)
    assert best == 0.8 and min(errs) < 0.8 * errs[0]
    assert errs[-1] > errs[0]  # clipping too hard saturates the bulk
    assert errs[list(grid).index(best)] == min(errs)
    assert errs[0] == pytest.approx(kvq.clip_error(x, lo, hi, 1.0, 4))
    # uniform data fills its range: any clipping saturates real mass, so the raw min/max wins
    u = rng.uniform(-3, 3, size=(1, 2, 400, 8)).astype(np.float32)
    best_u, errs_u = kvq.search_clip_ratio([(u, u.min(axis=(0, 2)), u.max(axis=(0, 2)))], bits=4, grid=grid)
    assert best_u == 1.0 and errs_u == sorted(errs_u)
    with pytest.raises(EqcError, match="no calibration samples"):
        kvq.search_clip_ratio([], bits=4)


# ----------------------------------------------------------------------------- synthetic graph

def _synthetic(tmp: pathlib.Path, heads: int = 2, dim: int = 8) -> pathlib.Path:
    """present.0.{k} = Concat(past, new); `seen_{k}` exposes what attention would read."""
    h = onnx.helper
    nodes, inputs, outputs = [], [], []
    for kind in ("key", "value"):
        inputs += [h.make_tensor_value_info(f"past_key_values.0.{kind}", onnx.TensorProto.FLOAT, ["batch", heads, "past", dim]),
                   h.make_tensor_value_info(f"new_{kind}", onnx.TensorProto.FLOAT, ["batch", heads, "seq", dim])]
        nodes += [h.make_node("Concat", [f"past_key_values.0.{kind}", f"new_{kind}"], [f"present.0.{kind}"], axis=-2),
                  h.make_node("Identity", [f"present.0.{kind}"], [f"seen_{kind}"])]
        outputs += [h.make_tensor_value_info(f"present.0.{kind}", onnx.TensorProto.FLOAT, ["batch", heads, "total", dim]),
                    h.make_tensor_value_info(f"seen_{kind}", onnx.TensorProto.FLOAT, ["batch", heads, "total", dim])]
    graph = h.make_graph(nodes, "kv", inputs, outputs)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    path = tmp / "syn.onnx"
    onnx.save(model, path)
    return path


def _kv_stats(tensors: dict[str, tuple[np.ndarray, np.ndarray]]) -> CalibrationStats:
    return CalibrationStats(meta={"observers": ["minmax", "kv"]}, tensors={
        name: TensorStats(min=float(lo.min()), max=float(hi.max()), count=1,
                          extra={"kv_min_channel": lo, "kv_max_channel": hi}) for name, (lo, hi) in tensors.items()})


def _apply(src: pathlib.Path, out: pathlib.Path, stats: CalibrationStats | None = None, manifest: dict | None = None,
           **options) -> tuple[pathlib.Path, CompileContext]:
    model = load_ir(src)
    ctx = CompileContext(stats=stats, manifest=dict(manifest or {"kv_cache": {"head_dim": 8}}))
    make_pass("quantize_kv_cache", ctx, options)(model)
    out.mkdir(parents=True, exist_ok=True)
    path = save_ir(model, out)
    onnx.checker.check_model(str(path), full_check=True)
    return path, ctx


@pytest.mark.parametrize("bits", [8, 4])
def test_synthetic_graph_matches_numpy_reference_across_steps(tmp_path: pathlib.Path, bits: int) -> None:
    src = _synthetic(tmp_path)
    lo = RNG.normal(size=(2, 8)).astype(np.float32) - 2
    hi = lo + 4
    hi[1, 2] = lo[1, 2] = 0.0  # constant (zero-range) key channel
    stats = _kv_stats({"present.0.key": (lo, hi)})
    path, ctx = _apply(src, tmp_path / "q", stats=stats, bits=bits, key_granularity="channel", value_granularity="token")
    sess = make_session(path)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["present.0.key", "seen_key", "present.0.value", "present.0.value_scale",
                     "present.0.value_zero_point", "seen_value"]
    feed = {i.name: np.zeros([1 if d == "batch" else (0 if d == "past" else d) for d in i.shape],
                             dtype={"tensor(uint8)": np.uint8, "tensor(float16)": np.float16}.get(i.type, np.float32))
            for i in sess.get_inputs() if i.name.startswith("past")}
    steps = [RNG.normal(size=(1, 2, s, 8)).astype(np.float32) * 2 for s in (5, 1, 3)]
    for new in steps:
        new[:, 1, :, 2] = 0.0  # the channel calibrated as constant stays constant
    ref_k, ref_v = [], []
    for new in steps:
        out = dict(zip(names, sess.run(None, {**feed, "new_key": new, "new_value": new * 0.5})))
        ref_k.append(kvq.fake_quant_per_channel(new, lo, hi, bits))
        ref_v.append(kvq.fake_quant_per_token(new * 0.5, bits))
        np.testing.assert_allclose(out["seen_key"], np.concatenate(ref_k, axis=2), atol=1e-6)
        np.testing.assert_allclose(out["seen_value"], np.concatenate(ref_v, axis=2), atol=1e-6)
        assert out["present.0.key"].dtype == np.uint8 and out["present.0.key"].shape[-1] == 8 * bits // 8
        assert np.isfinite(out["seen_key"]).all()
        np.testing.assert_array_equal(out["seen_key"][:, 1, :, 2], 0.0)
        feed = {"past_key_values.0.key": out["present.0.key"], "past_key_values.0.value": out["present.0.value"],
                "past_key_values.0.value_scale": out["present.0.value_scale"],
                "past_key_values.0.value_zero_point": out["present.0.value_zero_point"]}
    codes = out["present.0.key"] if bits == 8 else kvq.unpack4(out["present.0.key"])
    scale, zp = kvq.quant_params(lo[None, :, None], hi[None, :, None], bits)
    np.testing.assert_array_equal(codes, kvq.quantize(np.concatenate(steps, axis=2), scale, zp, bits))
    kv = ctx.manifest["kv_cache"]
    assert kv["quantized"]["bits"] == bits and kv["quantized"]["key"]["scale"] == "constant"
    assert kv["quantized"]["value"]["scale"] == "past_key_values.{layer}.value_scale"
    # per token per layer: keys dim*bits/8 per head, values the same + 3 bytes (fp16 scale, uint8 zp) per head
    assert kv["bytes_per_token"] == 2 * (2 * 8 * bits // 8) + 2 * 3


def test_channel_keys_without_kv_stats_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(EqcError, match="--observers kv"):
        _apply(_synthetic(tmp_path), tmp_path / "q", stats=None, bits=8, key_granularity="channel")
    with pytest.raises(EqcError, match="bits must be 8 or 4"):
        _apply(_synthetic(tmp_path), tmp_path / "q", bits=3, key_granularity="token")


def test_clip_ratios_shrink_frozen_ranges_in_the_graph(tmp_path: pathlib.Path) -> None:
    src = _synthetic(tmp_path)
    lo_k, hi_k = np.full((2, 8), -4.0, np.float32), np.full((2, 8), 4.0, np.float32)
    lo_v, hi_v = np.full((2, 8), -2.0, np.float32), np.full((2, 8), 3.0, np.float32)
    stats = _kv_stats({"present.0.key": (lo_k, hi_k), "present.0.value": (lo_v, hi_v)})
    path, ctx = _apply(src, tmp_path / "q", stats=stats, bits=4, key_granularity="channel",
                       value_granularity="channel", key_clip=0.5, value_clip=0.75)
    sess = make_session(path)
    names = [o.name for o in sess.get_outputs()]
    new = RNG.normal(size=(1, 2, 6, 8)).astype(np.float32) * 3
    feed = {"past_key_values.0.key": np.zeros((1, 2, 0, 4), np.uint8),
            "past_key_values.0.value": np.zeros((1, 2, 0, 4), np.uint8), "new_key": new, "new_value": new}
    out = dict(zip(names, sess.run(None, feed)))
    np.testing.assert_allclose(out["seen_key"], kvq.fake_quant_per_channel(new, lo_k * 0.5, hi_k * 0.5, 4), atol=1e-6)
    np.testing.assert_allclose(out["seen_value"], kvq.fake_quant_per_channel(new, lo_v * 0.75, hi_v * 0.75, 4), atol=1e-6)
    step = 8.0 * 0.5 / 15
    assert np.abs(new).max() > 4.0 and np.abs(out["seen_key"]).max() <= 2.0 + step  # beyond the clipped range: saturated
    assert ctx.manifest["kv_cache"]["ratio_vs_fp16"] == 0.25  # both frozen: codes only
    assert ctx.manifest["kv_cache"]["quantized"]["key"]["clip"] == 0.5
    with pytest.raises(EqcError, match="key_clip must be in"):
        _apply(src, tmp_path / "q2", stats=stats, bits=4, key_clip=1.5)


# ----------------------------------------------------------------------------- tiny llama

def _kv_stats_of(artifact: pathlib.Path, text: str) -> CalibrationStats:
    """kv_min/max_channel of every present.* output over one prefill of real text."""
    from eqcompiler.data import load_tokenizer, tokenize
    from eqcompiler.runtime.session import causal_feed

    sess = make_session(artifact / "model.onnx")
    ids = tokenize(load_tokenizer(artifact), text, max_tokens=256)[None]
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, causal_feed(sess, ids))))
    return _kv_stats({n: (v.min(axis=(0, 2)), v.max(axis=(0, 2))) for n, v in outs.items() if n.startswith("present.")})


def _compiled(src: pathlib.Path, dst: pathlib.Path, stats, **options) -> pathlib.Path:
    manifest = resolve_artifact(src).manifest
    _, ctx = _apply(src / "model.onnx", dst, stats=stats, manifest=manifest, **options)
    for f in src.iterdir():
        if f.suffix in (".json", ".txt") and f.name != "manifest.json":
            shutil.copy(f, dst / f.name)
    (dst / "manifest.json").write_text(json.dumps(ctx.manifest))
    return dst


@pytest.fixture(scope="module")
def tiny_kv(tiny_artifact, wiki_valid, tmp_path_factory) -> dict[str, pathlib.Path]:
    src = tiny_artifact("llama")
    stats = _kv_stats_of(src, wiki_valid.read_text()[:20000])
    root = tmp_path_factory.mktemp("tiny-kv")
    return {"fp32": src,
            "int8": _compiled(src, root / "int8", stats, bits=8),
            "int4": _compiled(src, root / "int4", stats, bits=4),
            "int8_token": _compiled(src, root / "int8_token", None, bits=8, key_granularity="token"),
            "int8_static": _compiled(src, root / "int8_static", stats, bits=8, value_granularity="channel")}


@pytest.mark.parametrize("variant,tol", [("int8", 0.05), ("int4", 0.6), ("int8_token", 0.05)])
def test_tiny_llama_prefill_then_decode_close_to_fp32(tiny_kv, variant: str, tol: float) -> None:
    ids = np.array([[5, 17, 40, 9, 33, 120, 7, 64, 12, 88, 3 + 100, 200]], dtype=np.int64)
    ref = CacheRunner(make_session(tiny_kv["fp32"] / "model.onnx"))
    run = CacheRunner(make_session(tiny_kv[variant] / "model.onnx"))
    errs = []
    for chunk in (ids[:, :8], ids[:, 8:9], ids[:, 9:10], ids[:, 10:12]):  # prefill, then decode steps
        a, b = ref.step(chunk), run.step(chunk)
        assert np.isfinite(b).all()
        errs.append(np.abs(a - b).max() / np.abs(a).max())
    assert run.past["past_key_values.0.key"].numpy().dtype == np.uint8
    assert max(errs) < tol, errs
    assert max(errs) > 0  # the cache really is quantized


def test_tiny_llama_cache_bytes(tiny_kv) -> None:
    fp16 = resolve_artifact(tiny_kv["int8"]).kv_cache["fp16_bytes_per_token"]
    kv = {k: resolve_artifact(v).kv_cache for k, v in tiny_kv.items() if k != "fp32"}
    assert kv["int8_static"]["bytes_per_token"] <= 0.5 * fp16  # scales frozen: exactly half
    assert kv["int8"]["bytes_per_token"] <= 0.5 * fp16 * (1 + 3 / 16)  # + per-token value scale/zp (head_dim 16)
    assert kv["int4"]["bytes_per_token"] < kv["int8"]["bytes_per_token"]
    run = CacheRunner(make_session(tiny_kv["int8_static"] / "model.onnx"))
    run.step(np.arange(5, 45, dtype=np.int64)[None])
    assert run.cache_bytes() == 40 * kv["int8_static"]["bytes_per_token"]


def test_chunked_eval_equals_unchunked_on_fp32(tiny_kv, wiki_test) -> None:
    whole = perplexity(tiny_kv["fp32"], wiki_test, max_tokens=1024, window=256)["ppl"]
    for chunk in (256, 64, 7):
        assert abs(chunked_perplexity(tiny_kv["fp32"], wiki_test, chunk=chunk, max_tokens=1024, window=256)["ppl"] - whole) < 1e-4


def test_quantized_prefill_sees_the_decode_error(tiny_kv, wiki_test) -> None:
    """Whole-window and chunked scoring agree on a quantized cache too: prefill quantizes what decode does."""
    a = chunked_perplexity(tiny_kv["int4"], wiki_test, chunk=256, max_tokens=512, window=256)["ppl"]
    b = chunked_perplexity(tiny_kv["int4"], wiki_test, chunk=16, max_tokens=512, window=256)["ppl"]
    fp = chunked_perplexity(tiny_kv["fp32"], wiki_test, chunk=16, max_tokens=512, window=256)["ppl"]
    assert abs(a - b) < 1e-3 * a
    assert a != fp


def test_cli_compile_kv_generate_and_chunked_eval(tiny_artifact, tmp_path: pathlib.Path, wiki_test) -> None:
    out = tmp_path / "kv8"
    run_eqc("compile", tiny_artifact("llama"), "--recipe", "none", "--kv-bits", "8", "-o", out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["kv_cache"]["quantized"]["bits"] == 8 and man["kv_cache"]["quantized"]["key"]["granularity"] == "token"
    assert any(i["name"] == "past_key_values.0.value_scale" and i["dtype"] == "FLOAT16" for i in man["inputs"])
    gen = json.loads(run_eqc("generate", out, "--prompt", "The game", "--max-new-tokens", "5", "--json").stdout)
    assert gen["new_tokens"] + (gen["stopped"] == "eos") >= 1 and gen["cache_bytes"] > 0
    ev = json.loads(run_eqc("eval", out, "--ppl", wiki_test, "--max-tokens", "600", "--window", "256", "--chunk", "64",
                            "--no-latency", "--json").stdout)
    assert ev["chunk"] == 64 and ev["windows"] == 2 and np.isfinite(ev["ppl"])
    bad = run_eqc("compile", tiny_artifact("llama"), "--recipe", "none", "--kv-bits", "8", "--kv-keys", "channel",
                  "-o", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "calibrate" in bad.stderr and not (tmp_path / "bad").exists()


def test_kv_on_top_of_w8a8(tiny_artifact, tiny_llama_stats, tmp_path: pathlib.Path, wiki_test) -> None:
    out = tmp_path / "w8a8kv"
    run_eqc("compile", tiny_artifact("llama"), "--recipe", "w8a8", "--calib", tiny_llama_stats, "--kv-bits", "4",
            "--kv-keys", "token", "-o", out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["quantization"]["report"]["quantize_kv_cache"]["bits"] == 4
    assert "quantize_activations" in man["quantization"]["report"]
    r = chunked_perplexity(out, wiki_test, chunk=32, max_tokens=512, window=256)
    assert np.isfinite(r["ppl"]) and r["cache_bytes_per_token"] == man["kv_cache"]["bytes_per_token"]


# ----------------------------------------------------------------------------- real SmolLM2

def test_smollm2_int8_kv_two_windows(smollm2_artifact, tmp_path: pathlib.Path, wiki_test) -> None:
    out = tmp_path / "smol-kv8"
    run_eqc("compile", smollm2_artifact, "--recipe", "none", "--kv-bits", "8", "-o", out)
    kw = dict(chunk=64, max_tokens=1024, window=512)
    fp = chunked_perplexity(smollm2_artifact, wiki_test, **kw)
    q = chunked_perplexity(out, wiki_test, **kw)
    assert q["windows"] == 2
    assert abs(q["ppl"] / fp["ppl"] - 1) < 0.01, (q["ppl"], fp["ppl"])
    fp16 = resolve_artifact(out).kv_cache["fp16_bytes_per_token"]
    assert q["cache_bytes_per_token"] <= 0.53 * fp16  # 0.5 + per-token scale/zp (3 bytes per 64-dim group)
