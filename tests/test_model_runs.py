"""Model runs are calibration steps, not passes (eqcompiler/calibration/model_runs.py). SmoothQuant's alpha
search is calibration data: the model run happens in calibration (or once in memory when a compile's statistics
lack it), the pass only reads the stored scales, and its integer scoring equals the float product of the
dequantized operands. A mixed-precision budget that needs the model is searched before the passes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from eqcompiler.errors import EqcError, InternalError


def test_int8_matmul_is_exact():
    from eqcompiler.compile.qdq import int8_matmul

    rng = np.random.default_rng(0)
    for m, k, n in ((7, 13, 5), (64, 1536, 96), (1, 64, 64)):
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        b = rng.integers(-128, 128, (k, n)).astype(np.int8)
        got = int8_matmul(a, b)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("granularity", ["tensor", "token"])
@pytest.mark.parametrize("block", [0, 32])
def test_quantized_output_equals_the_dequantized_product(granularity, block):
    """The score's int8 output: integer codes multiplied exactly, then scaled, agree with (and are more exact
    than) the float32 product of the dequantized activation and weight."""
    from eqcompiler.compile.qdq import quantize_channelwise
    from eqcompiler.passes.smooth_quant import quantized_output

    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 96)).astype(np.float32) * np.linspace(0.1, 30, 96, dtype=np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    amax = float(np.abs(x).max())
    step = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127) if granularity == "token" else amax / 127.0)
    xq = (np.clip(np.rint(x / step), -128, 127) * step).astype(np.float64)
    wq = quantize_channelwise(w, axis=0 if block else 1, bits=8, block_size=block).dequantize().astype(np.float64)
    exact = xq @ wq
    got = quantized_output(x, w, granularity, amax, block)
    assert got.dtype == np.float32 and got.shape == (256, 40)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * float(np.abs(exact).max()))
    # and far from the float output: the quantization is really there
    assert np.abs(got - x.astype(np.float64) @ w).max() > 1e-3 * np.abs(exact).max()


def _model_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model.onnx")}


def test_stored_search_compiles_the_same_bytes_without_a_model_run(tiny_artifact, tiny_llama_stats, tmp_path,
                                                                   monkeypatch):
    from eqcompiler.calibration import activation_rows
    from eqcompiler.calibration.smoothing_search import stored_choice
    from eqcompiler.calibration.stats import CalibrationStats
    from eqcompiler.compile.pipeline import compile_model, store_model_searches
    from eqcompiler.compile.recipes import load_recipe

    art = tiny_artifact("llama")
    # Statistics without the search: the compile runs it in memory (and leaves the file as it was).
    before = tiny_llama_stats.read_bytes()
    searched = compile_model(art, "w8a8-dynamic", tmp_path / "searched", calib=str(tiny_llama_stats))
    assert tiny_llama_stats.read_bytes() == before
    # What `eqc calibrate --for w8a8-dynamic` does after calibrating: the search stored with the statistics.
    stats = tmp_path / "stats.npz"
    shutil.copy(tiny_llama_stats, stats)
    keys = store_model_searches(art, stats, ["w8a8-dynamic", "w8"])
    assert len(keys) == 1  # w8 needs no model run
    loaded = CalibrationStats.load(stats)
    sites = searched["quantization"]["report"]["smooth_quant"]["sites"]
    assert len(sites) >= 6
    for site in sites.values():
        choice = stored_choice(loaded.get(site["tensor"]), keys[0])
        assert choice is not None and choice.alpha == site["alpha"] and choice.granularity == "token"
        assert choice.scale.dtype == np.float32 and np.all(choice.scale > 0)
    assert store_model_searches(art, stats, ["w8a8-dynamic"]) == []  # nothing left to search

    def no_model_run(*args, **kwargs):
        raise AssertionError("a compile from stored search results ran the model")

    monkeypatch.setattr(activation_rows, "sample_activation_rows", no_model_run)
    stored = compile_model(art, "w8a8-dynamic", tmp_path / "stored", calib=str(stats))
    assert _model_bytes(tmp_path / "stored") == _model_bytes(tmp_path / "searched")
    assert stored["quantization"]["report"] == searched["quantization"]["report"]
    # Other options are another search: not served by the stored one.
    recipe = json.loads(json.dumps(load_recipe("w8a8-dynamic")))
    next(step for step in recipe["passes"] if step["pass"] == "smooth_quant")["options"]["alpha_grid"] = [0.5, 0.6]
    path = tmp_path / "other.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(InternalError, match="model searches.*ran the model"):  # the run was attempted
        compile_model(art, str(path), tmp_path / "other", calib=str(stats))


def test_pass_reads_the_search_and_never_runs_the_model(tiny_artifact, tiny_llama_stats):
    """smooth_quant alone, on statistics without the search, names the calibration step instead of running ORT."""
    from eqcompiler.artifact import folder as am
    from eqcompiler.calibration.stats import CalibrationStats
    from eqcompiler.compile.pass_base import CompileContext
    from eqcompiler.passes.smooth_quant import SmoothQuantPass

    art = tiny_artifact("llama")
    model = am.load_ir(am.model_file(am.resolve_artifact(art)))
    context = CompileContext(stats=CalibrationStats.load(tiny_llama_stats), source_folder=str(art),
                             manifest=dict(am.resolve_artifact(art).manifest))
    step = SmoothQuantPass(context, search="ort", activation_granularity="token")
    assert len(step.model_rows_needed(model)) >= 6
    with pytest.raises(EqcError, match="eqc calibrate --for RECIPE"):
        step(model)


def test_precision_pass_never_runs_the_model(tiny_artifact, tiny_llama_stats):
    """A ppl+X% budget (or sensitivity kl) is searched before the passes (calibration/precision_search.py); the
    pass alone only applies the plan it is handed."""
    from eqcompiler.artifact import folder as am
    from eqcompiler.calibration.precision_search import needs_model_run
    from eqcompiler.calibration.stats import CalibrationStats
    from eqcompiler.compile.pass_base import CompileContext
    from eqcompiler.passes.apply_precision_plan import ApplyPrecisionPlanPass

    art = tiny_artifact("llama")
    model = am.load_ir(am.model_file(am.resolve_artifact(art)))
    context = CompileContext(stats=CalibrationStats.load(tiny_llama_stats), source_folder=str(art))
    for options, needed in (({"budget": "ppl+1%"}, True), ({"budget": "6bits", "sensitivity": "kl"}, True),
                            ({"budget": "6bits"}, False), ({"plan": {"version": 1, "layers": {}}}, False)):
        step = ApplyPrecisionPlanPass(context, **options)
        assert needs_model_run(step.options) is needed, options
        if needed:
            with pytest.raises(EqcError, match="needs the model run"):
                step(model)


def test_sampled_activation_rows_are_uniform_draws_of_every_windows_rows(tiny_artifact, tiny_llama_stats):
    """The alpha search's rows: each tensor's rows are its own sorted uniform draw over the rows of all windows
    (as if concatenated), cut window by window as ONNX Runtime returns them; with rows >= the windows' tokens,
    every row in order."""
    import pathlib

    from eqcompiler.artifact import folder as art_mod
    from eqcompiler.calibration.activation_rows import sample_activation_rows
    from eqcompiler.calibration.calibrate import instrumented_session, observed_tensors
    from eqcompiler.calibration.stats import CalibrationStats, recorded_text
    from eqcompiler.data import calibration_ids, load_tokenizer, windows
    from eqcompiler.runtime.session import causal_feed

    art = pathlib.Path(tiny_artifact("llama"))
    model = art_mod.model_file(art_mod.resolve_artifact(art))
    names = observed_tensors(model)
    meta = CalibrationStats.load(tiny_llama_stats).meta
    seq = int(meta["data"]["seq_len"])
    ids, _ = calibration_ids(load_tokenizer(art), recorded_text(meta)[0], seq, 3, True)
    session = instrumented_session(model, names)
    full = {n: [] for n in names}
    for window in windows(ids, seq, 3):
        for n, v in zip(names, session.run(names, causal_feed(session, window))):
            full[n].append(v.reshape(-1, v.shape[-1]))
    full = {n: np.concatenate(v) for n, v in full.items()}
    total = len(full[names[0]])

    # Rows are held as float16 (this model's activations fit it): ORT's rows, rounded once.
    everything = sample_activation_rows(art, names, meta, 3, total)
    for n in names:
        assert everything[n].dtype == np.float16
        np.testing.assert_array_equal(everything[n], full[n].astype(np.float16))
    rows = total // 3
    sampled = sample_activation_rows(art, names, meta, 3, rows)
    rng = np.random.default_rng(0)
    for n in names:
        np.testing.assert_array_equal(sampled[n], full[n][np.sort(rng.choice(total, rows, replace=False))].astype(np.float16))


def test_sampled_rows_keep_float32_where_float16_would_overflow():
    from eqcompiler.calibration.activation_rows import _compact

    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    half = _compact(x)
    assert half.dtype == np.float16 and np.all(np.abs(half - x) <= np.abs(x) * 2.0 ** -11 + 2.0 ** -25)
    x[3, 5] = 7.0e4  # a massive activation beyond float16's 65504
    assert _compact(x).dtype == np.float32 and np.array_equal(_compact(x), x)
    assert _compact(np.zeros((0, 16), np.float32)).shape == (0, 16)
