"""`eqc calibrate --for` keeps the alpha search's rows during the statistics pass (activation_rows.RowTaker) when
the search would sample the same model run: the search then opens no second session, and its rows, and so the
stored scales and choices, are byte for byte those of sample_activation_rows. Anything else samples as before."""
from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

from conftest import WIKI_VALID


def _calibrate_taking_rows(art: pathlib.Path, out: pathlib.Path, request, samples: int = 4, seq_len: int = 64,
                           **options):
    from eqcompiler.calibration.calibrate import Calibrator, run_calibration

    return run_calibration(Calibrator(art, WIKI_VALID, samples, seq_len, rows_for=request, **options), out=out)


def _smooth_extras(path: pathlib.Path) -> dict[str, np.ndarray]:
    from eqcompiler.calibration.stats import CalibrationStats

    stats = CalibrationStats.load(path)
    return {f"{name}/{key}": value for name, t in stats.tensors.items() for key, value in t.extra.items()
            if key.startswith("smooth_")}


def _no_model_run(*args, **kwargs):
    raise AssertionError("the search sampled its rows in a second session")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_taken_rows_store_the_same_search_as_a_second_session(tiny_artifact, tmp_path, monkeypatch, family):
    """The w8a8-dynamic search on the statistics pass's rows stores exactly the scales and choices (dtype and
    bytes) of the search that samples its own rows (the path without them, as `eqc compile` runs it)."""
    from eqcompiler.calibration import activation_rows
    from eqcompiler.calibration.smoothing_search import rows_request
    from eqcompiler.compile.pipeline import store_model_searches

    art = tiny_artifact(family)
    request = rows_request(["w8a8-dynamic"], ["minmax", "absmax_channel", "abssum"])
    assert request is not None and (request.count, request.rows) == (4, 2048)
    stats, taken = _calibrate_taking_rows(art, tmp_path / "new.npz", request)
    assert taken is not None and len(taken.kept) == len(stats.tensors)
    shutil.copy(tmp_path / "new.npz", tmp_path / "old.npz")

    keys_old = store_model_searches(art, tmp_path / "old.npz", ["w8a8-dynamic"])  # samples in its own session
    with monkeypatch.context() as patch:
        patch.setattr(activation_rows, "sample_activation_rows", _no_model_run)
        keys_new = store_model_searches(art, tmp_path / "new.npz", ["w8a8-dynamic"], taken)
    assert keys_new == keys_old and len(keys_new) == 1
    assert len(taken.kept) < len(stats.tensors)  # handed over to the search, which dropped each site's as scored
    old, new = _smooth_extras(tmp_path / "old.npz"), _smooth_extras(tmp_path / "new.npz")
    assert len(old) >= 4 and sorted(new) == sorted(old)  # scale and choice of each site (BERT: 2 sites)
    for key, value in old.items():
        assert new[key].dtype == value.dtype and new[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("rows", [2048, 100])
def test_taken_rows_are_sample_activation_rows(tiny_artifact, tmp_path, rows):
    """Every row, or a draw of fewer rows than the windows hold: the same selection, dtype, order and bytes."""
    from eqcompiler.calibration.activation_rows import RowRequest, sample_activation_rows

    art = tiny_artifact("llama")
    stats, taken = _calibrate_taking_rows(art, tmp_path / "s.npz", RowRequest(3, rows))
    names = list(stats.tensors)
    sampled = sample_activation_rows(art, names, stats.meta, 3, rows)
    model_path = taken.model_path
    assert not taken.serves(model_path, stats.meta, 4, rows, names)  # other windows
    assert not taken.serves(model_path, {**stats.meta, "data": {**stats.meta["data"], "seq_len": 32}}, 3, rows, names)
    if rows < 3 * 64:  # a draw depends on the names drawn for: another list is another draw
        assert not taken.serves(model_path, stats.meta, 3, rows, names[1:])
    got = taken.take(model_path, stats.meta, 3, rows, names)
    assert got is not None and list(got) == names
    for n in names:
        assert got[n].shape == (min(rows, 3 * 64), sampled[n].shape[1])
        assert got[n].dtype == sampled[n].dtype and got[n].tobytes() == sampled[n].tobytes(), n


def test_no_rows_taken_where_the_windows_differ(tiny_artifact, tmp_path):
    """Fewer statistics windows than the search samples, or a layer-streamed pass: nothing is taken (the search
    samples as before)."""
    from eqcompiler.calibration.activation_rows import RowRequest

    art = tiny_artifact("llama")
    assert _calibrate_taking_rows(art, tmp_path / "a.npz", RowRequest(4, 2048), samples=2)[1] is None
    assert _calibrate_taking_rows(art, tmp_path / "b.npz", RowRequest(2, 2048), stream_layers=True)[1] is None


def test_rows_are_asked_only_of_a_search_that_runs_the_model():
    """search 'ort' always runs the model; 'auto' (w8a8-smooth) only without sample (or, per tensor, gram) rows."""
    from eqcompiler.calibration.activation_rows import RowRequest
    from eqcompiler.calibration.smoothing_search import rows_request

    default = ["minmax", "absmax_channel", "abssum"]
    assert rows_request(["w8", "w8a8-dynamic"], default) == RowRequest(4, 2048)
    assert rows_request(["w8a8-dynamic"], [*default, "sample"]) == RowRequest(4, 2048)
    assert rows_request(["w8a8-smooth"], default) == RowRequest(1, 512)
    assert rows_request(["w8a8-smooth"], [*default, "sample"]) is None
    assert rows_request(["w8", "w4-gptq"], default) is None


def test_calibrate_for_stores_what_a_compile_would_search(tiny_artifact, tmp_path):
    """`eqc calibrate --for w8a8-dynamic` (rows taken in its statistics pass) writes the same file as plain
    statistics whose search then samples its own rows."""
    from conftest import run_eqc
    from eqcompiler.compile.pipeline import store_model_searches

    art = tiny_artifact("llama")
    args = ("calibrate", art, "--data", WIKI_VALID, "--samples", "4", "--seq-len", "64")
    run_eqc(*args, "--for", "w8a8-dynamic", "-o", tmp_path / "for.npz")
    run_eqc(*args, "-o", tmp_path / "plain.npz")
    assert len(store_model_searches(art, tmp_path / "plain.npz", ["w8a8-dynamic"])) == 1
    new, old = np.load(tmp_path / "for.npz"), np.load(tmp_path / "plain.npz")
    assert sorted(new.files) == sorted(old.files) and any("smooth_" in k for k in old.files)
    for key in old.files:
        assert new[key].dtype == old[key].dtype and new[key].tobytes() == old[key].tobytes(), key
