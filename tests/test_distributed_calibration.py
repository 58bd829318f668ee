"""Distributed calibration: real gloo processes on the tiny llama artifact."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_eqc
from eqcompiler.calibration.calibrate import calibrate
from eqcompiler.calibration.distributed import shard
from eqcompiler.calibration.stats import CalibrationStats

ARGS = ("--samples", "4", "--seq-len", "32", "--observers", "all", "--decode-steps", "2", "--threads", "1")


def assert_same_stats(a: CalibrationStats, b: CalibrationStats) -> float:
    """min/max/counts/histograms/KV ranges bit-identical, float sums within 1e-6 relative; returns worst."""
    assert sorted(a.tensors) == sorted(b.tensors)
    worst = 0.0
    for name, x in a.tensors.items():
        y = b.tensors[name]
        assert (x.min, x.max, x.count) == (y.min, y.max, y.count), name
        assert (x.absmax_channel is None) == (y.absmax_channel is None)
        if x.absmax_channel is not None:
            assert np.array_equal(x.absmax_channel, y.absmax_channel), name
        assert sorted(x.extra) == sorted(y.extra), name
        for key, value in x.extra.items():
            if key in ("abssum_channel", "gram"):
                rel = float(np.abs(value - y.extra[key]).max() / max(np.abs(value).max(), 1e-30))
                assert rel <= 1e-6, (name, key, rel)
                worst = max(worst, rel)
            else:
                assert value.dtype == y.extra[key].dtype and np.array_equal(value, y.extra[key]), (name, key)
    return worst


def test_shard():
    assert shard(7, 0, 2) == [0, 2, 4, 6] and shard(7, 1, 2) == [1, 3, 5]
    assert sorted(shard(10, 0, 3) + shard(10, 1, 3) + shard(10, 2, 3)) == list(range(10))


def test_two_ranks_equal_single_process(tiny_artifact, wiki_valid, tmp_path):
    art = tiny_artifact("llama")
    single = calibrate(art, wiki_valid, samples=4, seq_len=32, observers="all", decode_steps=2, threads=1)
    out = tmp_path / "dist.npz"
    proc = run_eqc("calibrate", art, "--data", wiki_valid, *ARGS, "--workers", "2", "-o", out, "--json")
    summary = json.loads(proc.stdout)
    assert summary["workers"] == 2 and summary["threads_per_worker"] == 1 and summary["data"]["samples"] == 4
    merged = CalibrationStats.load(out)
    assert merged.meta["model_fingerprint"] == single.meta["model_fingerprint"]
    assert merged.observers == single.observers
    worst = assert_same_stats(single, merged)
    assert worst < 5e-7  # sums in another order differ only by rounding (float32 Grams: measured 1.1e-7)
    # Sanity: the histogram counts every element exactly once across the two ranks.
    name = next(n for n in merged.tensors if not n.startswith("present."))
    assert int(merged.get(name).extra["hist"].sum()) == merged.get(name).count


def test_killed_rank_fails_fast_without_file(tiny_artifact, wiki_valid, tmp_path):
    out = tmp_path / "dead.npz"
    exe = pathlib.Path(sys.executable).parent / "eqc"
    start = time.monotonic()
    proc = subprocess.run([str(exe), "calibrate", str(tiny_artifact("llama")), "--data", str(wiki_valid), *ARGS,
                           "--workers", "2", "-o", str(out)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, EQC_TEST_KILL_RANK="1"))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr
    assert elapsed < 60, elapsed
    assert "rank 1 of 2 exited with code 17" in proc.stderr and "no statistics file was written" in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dead.npz")]  # no staged leftovers


def test_torchrun_entry_point(tiny_artifact, wiki_valid, tmp_path):
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "torchrun.npz"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                           "eqcompiler.calibration.distributed_calibrate", str(tiny_artifact("llama")), "--data", str(wiki_valid),
                           "--samples", "4", "--seq-len", "32", "--observers", "minmax,hist", "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = CalibrationStats.load(out)
    assert "workers" not in merged.meta and "seconds" not in merged.meta  # run facts: in the summary only
    single = calibrate(tiny_artifact("llama"), wiki_valid, samples=4, seq_len=32, observers="minmax,hist", threads=1)
    assert_same_stats(single, merged)


def test_more_workers_than_windows(tiny_artifact, wiki_valid, tmp_path):
    out = tmp_path / "s.npz"
    proc = run_eqc("calibrate", tiny_artifact("llama"), "--data", wiki_valid, "--samples", "1", "--seq-len", "32",
                   "--workers", "2", "-o", out, check=False)
    assert proc.returncode == 2 and "cannot be shared by 2 ranks" in proc.stderr and not out.exists()
