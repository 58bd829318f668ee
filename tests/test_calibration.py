"""Calibration observers, range-selection methods, stats file, decode/KV calibration, NaN handling."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import onnx
import pytest

from conftest import run_eqc
from eqcompiler.calibration.calibrate import calibrate
from eqcompiler.errors import EqcError
from eqcompiler.calibration.observers import HIST_BINS, hist_range_for, merge_extra, observe_activation, parse_observers
from eqcompiler.calibration.stats import CalibrationStats, TensorStats
from eqcompiler.passes.quantize_activations import METHODS, activation_range

ALL = ("minmax", "absmax_channel", "abssum", "hist", "gram")


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose max grows (0.3 .. 40) so the histogram range doubles several times."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((37, 24)) * s).astype(np.float32) for s in (0.1, 1.0, 0.5, 13.0, 2.0)]


def _observe(batches: list[np.ndarray]) -> TensorStats:
    t = TensorStats()
    for b in batches:
        observe_activation(t, b, ALL)
    return t


def test_histogram_merge_is_exact_and_order_free():
    batches = _batches()
    seq = _observe(batches)
    everything = np.concatenate(batches)
    hist_max = float(seq.extra["hist_max"])
    assert hist_max == hist_range_for(float(np.abs(everything).max())) and hist_max > np.abs(everything).max()
    direct = np.bincount((np.abs(everything) * np.float32(HIST_BINS / hist_max)).astype(np.int64).ravel(),
                         minlength=HIST_BINS)
    assert np.array_equal(seq.extra["hist"], direct)  # same as binning everything once at the final range
    # Shards in another order and grouping, merged: bit-identical histogram, min/max, absmax.
    a, b = _observe(batches[3:] + batches[:1]), _observe(batches[1:3][::-1])
    a.merge(b)
    assert np.array_equal(a.extra["hist"], seq.extra["hist"]) and float(a.extra["hist_max"]) == hist_max
    assert (a.min, a.max, a.count) == (seq.min, seq.max, seq.count) == (float(everything.min()), float(everything.max()),
                                                                       everything.size)
    assert np.array_equal(a.absmax_channel, np.abs(everything).max(axis=0))
    assert int(a.extra["hist"].sum()) == everything.size


def test_abssum_is_a_float64_sum_and_gram_a_float32_one():
    batches = _batches(1)
    t = _observe(batches)
    x = np.concatenate(batches).astype(np.float64)
    # The Gram is kept in float32 (half the memory); its entries stay within 1e-6 of the float64 sum,
    # relative to the diagonal they are bounded by (|G_ij| <= sqrt(G_ii G_jj)).
    assert t.extra["gram"].dtype == np.float32 and t.extra["gram"].shape == (24, 24)
    exact = x.T @ x
    bound = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert float(np.max(np.abs(t.extra["gram"] - exact) / bound)) < 1e-6
    assert np.array_equal(t.extra["gram"], t.extra["gram"].T)  # one symmetric product per window
    assert int(t.extra["gram_rows"]) == x.shape[0]
    np.testing.assert_allclose(t.extra["abssum_channel"], np.abs(x).sum(axis=0), rtol=1e-12)
    merged = _observe(batches[:2])
    merged.merge(_observe(batches[2:]))
    assert merged.extra["gram"].dtype == np.float32
    assert float(np.max(np.abs(merged.extra["gram"] - exact) / bound)) < 1e-6
    assert int(merged.extra["gram_rows"]) == x.shape[0]


def test_float32_gram_gives_gptq_the_float64_weights():
    """GPTQ from the float32 Gram of activations with outlier channels (SmolLM2-like: a few channels ~300x
    the rest) rounds the same 4-bit codes as from the float64 Gram (at most 1 in 1000 may differ by a tie)."""
    from eqcompiler.passes.gptq import gptq_quantize

    rng = np.random.default_rng(3)
    k, n = 128, 64
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    t = TensorStats()
    exact = np.zeros((k, k))
    for _ in range(16):  # 16 windows of 512 rows, as `eqc calibrate --samples 16`
        x = rng.standard_normal((512, k)).astype(np.float32)
        x[:, :3] *= 300.0
        observe_activation(t, x, ["minmax", "gram"])
        exact += x.astype(np.float64).T @ x
    rows = int(t.extra["gram_rows"])
    codes32 = gptq_quantize(w, t.extra["gram"], rows, bits=4, block_size=32).q
    codes64 = gptq_quantize(w, exact, rows, bits=4, block_size=32).q
    assert np.mean(codes32 != codes64) <= 0.001  # measured: 0 of 8192 differ


def test_parse_observers():
    assert parse_observers("hist,gram") == ("minmax", "hist", "gram")
    assert parse_observers(None) == ("minmax", "absmax_channel", "abssum")
    assert set(parse_observers("all")) == {"minmax", "absmax_channel", "abssum", "hist", "gram", "kv"}
    with pytest.raises(EqcError, match="unknown observer 'histo'"):
        parse_observers("minmax,histo")


class _Stats:
    def __init__(self, t: TensorStats) -> None:
        self.t = t

    def get(self, name: str) -> TensorStats:
        return self.t


@pytest.mark.parametrize("method", [m for m in METHODS if m != "minmax"])
def test_methods_clip_outliers(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 16)).astype(np.float32)
    x[5, 3], x[77, 9], x[901, 0] = 60.0, -45.0, 52.0  # three outliers among 320k values
    t = TensorStats()
    observe_activation(t, x, ("minmax", "hist"))
    lo, hi = activation_range(_Stats(t), "x", method, percentile=99.99)
    mm_lo, mm_hi = activation_range(_Stats(t), "x", "minmax")
    assert (mm_lo, mm_hi) == (pytest.approx(-45.0), pytest.approx(60.0))
    amax = max(abs(lo), abs(hi))
    # Narrower than min/max, yet keeps the Gaussian bulk (|x| < ~3.5 holds 99.95% of it). MSE weighs
    # the outliers' squared clipping error against rounding noise of all 320k values, so it clips less.
    upper = 40.0 if method == "mse" else 20.0
    assert 2.0 < amax < upper < mm_hi, (method, lo, hi)
    assert mm_lo <= lo < 0 < hi <= mm_hi


def test_method_without_histogram_names_the_observer():
    t = TensorStats()
    observe_activation(t, np.ones((4, 4), np.float32), ("minmax",))
    with pytest.raises(EqcError, match="'hist' calibration observer"):
        activation_range(_Stats(t), "x", "entropy")


def test_stats_file_header_and_model_check(tiny_artifact, wiki_valid, tmp_path):
    art = tiny_artifact("llama")
    out = tmp_path / "s.npz"
    proc = run_eqc("calibrate", art, "--data", wiki_valid, "--samples", "2", "--seq-len", "32", "-o", out,
                   "--observers", "minmax,hist,gram,abssum", "--json")
    summary = json.loads(proc.stdout)  # progress goes to stderr, never into the JSON
    assert summary["observers"] == ["minmax", "hist", "gram", "abssum"] and summary["data"]["samples"] == 2
    stats = CalibrationStats.load(out)
    assert stats.observers == ["minmax", "hist", "gram", "abssum"]
    assert stats.meta["data"]["seq_len"] == 32 and len(stats.meta["data"]["sha256"]) == 64
    name = next(iter(stats.tensors))
    t = stats.get(name)
    assert int(t.extra["hist"].sum()) == t.count == 2 * 32 * t.extra["gram"].shape[0]
    assert int(t.extra["gram_rows"]) == 64 and t.extra["abssum_channel"].dtype == np.float64
    with pytest.raises(EqcError, match="another model"):
        stats.check_model("0" * 32, "'other'")
    with pytest.raises(EqcError, match="'kv' calibration observer"):
        stats.require(name, "kv_min_channel", "kv", "the KV-cache pass")
    # A file from another model is refused by compile.
    other = tiny_artifact("qwen2")
    proc = run_eqc("compile", other, "--recipe", "w8a8", "--calib", out, "-o", tmp_path / "q", check=False)
    assert proc.returncode == 2 and "another model" in proc.stderr
    assert not (tmp_path / "q").exists()


def test_bad_observer_cli(tiny_artifact, wiki_valid, tmp_path):
    proc = run_eqc("calibrate", tiny_artifact("llama"), "--data", wiki_valid, "-o", tmp_path / "s.npz",
                   "--observers", "minmax,bogus", check=False)
    assert proc.returncode == 2 and "unknown observer 'bogus'" in proc.stderr
    assert not (tmp_path / "s.npz").exists()


def test_decode_steps_and_kv_observer(tiny_artifact, tiny_hf, wiki_valid):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_hf("llama"))
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    prefill = calibrate(tiny_artifact("llama"), wiki_valid, samples=2, seq_len=32, observers="minmax,kv", threads=1)
    decode = calibrate(tiny_artifact("llama"), wiki_valid, samples=2, seq_len=32, observers="minmax,kv", threads=1,
                       decode_steps=3)
    assert decode.meta["data"]["decode_steps"] == 3
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            t = decode.get(f"present.{i}.{kind}")
            assert t.extra["kv_min_channel"].shape == (kv_heads, head_dim)
            assert np.all(t.extra["kv_min_channel"] <= t.extra["kv_max_channel"])
            assert float(t.extra["kv_max_channel"].max()) == t.max and float(t.extra["kv_min_channel"].min()) == t.min
            # Decode steps observe only the new token's cache entries: 2 windows x (32 + 3) tokens.
            assert t.count == 2 * 35 * kv_heads * head_dim
            assert prefill.get(f"present.{i}.{kind}").count == 2 * 32 * kv_heads * head_dim
    name = next(n for n in decode.tensors if not n.startswith("present."))
    channels = decode.get(name).count // (2 * 35)
    assert decode.get(name).count == 2 * 35 * channels and prefill.get(name).count == 2 * 32 * channels


def _poisoned_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The tiny model with an Inf in its embedding table, so RMSNorm produces NaN in layer 0."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    for init in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.ndim == 2 and arr.shape[0] == 512:  # vocab x hidden embedding
            arr = arr.copy()
            arr[:, 0] = np.inf
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            break
    else:
        raise AssertionError("no embedding table found")
    (dst / "model.onnx").unlink()
    (dst / "model.onnx.data").unlink()
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst


def test_nonfinite_activation(tiny_artifact, wiki_valid, tmp_path):
    bad = _poisoned_copy(tiny_artifact("llama"), tmp_path / "bad")
    out = tmp_path / "s.npz"
    proc = run_eqc("calibrate", bad, "--data", wiki_valid, "--samples", "1", "--seq-len", "16", "-o", out, check=False)
    assert proc.returncode == 3 and "NaN or Inf" in proc.stderr and "layers.0" in proc.stderr, proc.stderr
    assert "--skip-nonfinite" in proc.stderr and not out.exists()
    run_eqc("calibrate", bad, "--data", wiki_valid, "--samples", "1", "--seq-len", "16", "-o", out, "--skip-nonfinite")
    stats = CalibrationStats.load(out)
    assert all(np.isfinite(t.min) and np.isfinite(t.max) for t in stats.tensors.values())


def test_entropy_recipe_compiles_and_runs(tiny_artifact, wiki_valid, tmp_path):
    from eqcompiler.runtime.session import causal_feed, make_session

    art = tiny_artifact("llama")
    stats = tmp_path / "s.npz"
    run_eqc("calibrate", art, "--data", wiki_valid, "--samples", "2", "--seq-len", "32", "-o", stats, "--observers", "hist")
    recipe = tmp_path / "a8-entropy.json"
    recipe.write_text(json.dumps({"name": "a8-entropy", "description": "test", "requires_calibration": True,
                                  "passes": [{"pass": "quantize_activations", "options": {"method": "entropy"}}]}))
    out = tmp_path / "q"
    run_eqc("compile", art, "--recipe", recipe, "--calib", stats, "-o", out)
    report = json.loads((out / "manifest.json").read_text())["quantization"]["report"]
    ranges = next(r for r in (report if isinstance(report, list) else [report]) if "ranges" in json.dumps(r))
    text = json.dumps(ranges)
    assert "entropy" in text
    session = make_session(out / "model.onnx")
    logits = session.run(["logits"], causal_feed(session, np.arange(1, 9, dtype=np.int64)[None, :]))[0]
    assert np.isfinite(logits).all()
    onnx.checker.check_model(str(out / "model.onnx"))
    # Every entropy range lies inside the observed min/max.
    loaded = CalibrationStats.load(stats)
    for name in loaded.tensors:
        if name.startswith("present."):
            continue
        lo, hi = activation_range(loaded, name, "entropy")
        assert loaded.get(name).min <= lo <= 0 <= hi <= loaded.get(name).max


def test_recipes_declare_the_observers_they_read():
    """Each built-in recipe's observer needs, derived from its passes' options (what `--for` collects)."""
    from eqcompiler.compile.recipes import builtin_recipes, observers_for, recipe_observers

    needs = {name: recipe_observers(r) for name, r in builtin_recipes().items()}
    assert needs["w4-gptq"].required == {"minmax", "gram"}
    assert needs["w4-awq"].required >= {"gram", "abssum"}
    assert needs["w4-rtn"].required == {"minmax"} and not needs["w4-rtn"].helpful
    # w8a8-smooth's GPTQ falls back to round-to-nearest without gram (missing_gram "skip"): helpful, not required
    assert needs["w8a8-smooth"].required == {"minmax", "absmax_channel"}
    assert needs["w8a8-smooth"].helpful == {"gram", "abssum"}
    assert needs["mixed"].helpful == {"gram"}
    assert observers_for("w8a8-smooth,w4-gptq,kv") == ("absmax_channel", "abssum", "gram", "kv", "minmax")
    with pytest.raises(EqcError, match="unknown recipe 'w5'"):
        observers_for("w8,w5")


def test_calibrate_for_collects_what_the_recipes_need(tiny_artifact, wiki_valid, tmp_path):
    art = tiny_artifact("llama")
    plain, full = tmp_path / "plain.npz", tmp_path / "for.npz"
    run_eqc("calibrate", art, "--data", wiki_valid, "--samples", "2", "--seq-len", "32", "-o", plain)
    assert CalibrationStats.load(plain).observers == ["minmax", "absmax_channel", "abssum"]
    # A compile whose recipe cannot run on these statistics is refused before any pass, naming --for.
    out = tmp_path / "gptq"
    proc = run_eqc("compile", art, "--recipe", "w4-gptq", "--calib", plain, "-o", out, check=False)
    assert proc.returncode == 2 and not out.exists()
    assert "lack the observer 'gram'" in proc.stderr and f"--for w4-gptq" in proc.stderr
    proc = run_eqc("compile", art, "--recipe", "w8", "--kv-bits", "8", "--calib", plain, "-o", out, check=False)
    assert proc.returncode == 2 and "'kv'" in proc.stderr and "--for w8,kv" in proc.stderr and not out.exists()
    # One calibration serves every recipe named in --for (added to --observers, here the default set).
    summary = json.loads(run_eqc("calibrate", art, "--data", wiki_valid, "--samples", "2", "--seq-len", "32",
                                 "-o", full, "--for", "w8a8-smooth,w4-gptq,kv", "--json").stdout)
    assert summary["observers"] == ["minmax", "absmax_channel", "abssum", "gram", "kv"]
    for recipe, extra in (("w4-gptq", []), ("w8a8-smooth", []), ("w8", ["--kv-bits", "8"])):
        run_eqc("compile", art, "--recipe", recipe, "--calib", full, "-o", tmp_path / recipe, *extra)
        manifest = json.loads((tmp_path / recipe / "manifest.json").read_text())
        assert not any("gram" in w for w in manifest["quantization"].get("warnings", [])), recipe
    proc = run_eqc("calibrate", art, "--data", wiki_valid, "--samples", "2", "--seq-len", "32", "-o", tmp_path / "x.npz",
                   "--for", "w9", check=False)
    assert proc.returncode == 2 and "unknown recipe 'w9'" in proc.stderr and not (tmp_path / "x.npz").exists()


def test_release_freed_memory_returns_a_fragmented_heap_to_the_os():
    """glibc keeps freed blocks below a live one (no automatic trim at the heap top); release_freed_memory hands
    their pages back, which is what lets calibrate --for's later steps start from a lower resident size."""
    import ctypes.util
    import platform

    import psutil

    from eqcompiler.runtime.memory import release_freed_memory

    if platform.system() != "Linux" or "glibc" not in " ".join(platform.libc_ver()) or not ctypes.util.find_library("c"):
        pytest.skip("malloc_trim is glibc's")
    proc = psutil.Process()
    blocks = [bytearray(4096) for _ in range(60_000)]  # ~250 MB of malloc'd (not mmapped) blocks
    keep = bytearray(4096)  # a live block above them: the heap top cannot shrink on its own
    del blocks
    before = proc.memory_info().rss
    release_freed_memory()
    after = proc.memory_info().rss
    assert before - after > 100 * 2**20, (before, after)
    del keep
