"""Calibration benchmark: peak RSS vs window count, and 1-rank vs 2-rank speed.

    .venv/bin/python tools/bench_calibration.py /tmp/x/smol --seq-len 256 --small 8 --large 128 --speed-windows 16

Each configuration runs `eqc calibrate` as a fresh child process; peak RSS is the child's own
ru_maxrss (os.wait4), summed over ranks for multi-rank runs is NOT reported (per-process peak
is what must not grow). Writes tools/results/calibration.json and tools/results/calibration.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from eqcompiler.data import find_wikitext

REPO = pathlib.Path(__file__).resolve().parents[1]
EQC = pathlib.Path(sys.executable).parent / "eqc"
DATA = find_wikitext("valid")


def run(model: str, samples: int, seq_len: int, workers: int, threads: int, observers: str) -> dict:
    out = pathlib.Path(tempfile.mkdtemp(prefix="eqc-bench-")) / "s.npz"
    cmd = [str(EQC), "calibrate", model, "--data", str(DATA), "--samples", str(samples), "--seq-len", str(seq_len),
           "--workers", str(workers), "--threads", str(threads), "--observers", observers, "-o", str(out), "--json"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {stderr[-1000:]}")
    summary = json.loads(stdout)
    out.unlink()
    out.parent.rmdir()
    # ru_maxrss (KiB) of a waited child covers the largest of it and its own waited children (the ranks).
    return {"samples": samples, "seq_len": seq_len, "workers": workers, "threads": threads, "observers": observers,
            "wall_s": round(wall, 2), "calib_s": summary["seconds"], "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--large", type=int, default=128)
    ap.add_argument("--speed-windows", type=int, default=16)
    ap.add_argument("--observers", default="minmax,absmax_channel,abssum,hist")
    args = ap.parse_args()
    rows = []
    for n in (args.small, args.large):
        rows.append({"what": "rss", **run(args.model, n, args.seq_len, 1, 2, args.observers)})
        print(rows[-1], flush=True)
    for workers, threads in ((1, 1), (1, 2), (2, 1)):
        rows.append({"what": "speed", **run(args.model, args.speed_windows, args.seq_len, workers, threads, args.observers)})
        print(rows[-1], flush=True)
    results = REPO / "tools/results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    rss = [r for r in rows if r["what"] == "rss"]
    speed = {(r["workers"], r["threads"]): r for r in rows if r["what"] == "speed"}
    growth = rss[1]["peak_rss_mib"] / rss[0]["peak_rss_mib"] - 1
    lines = [
        "# Calibration benchmark", "",
        f"Model `{args.model}`, WikiText-2 valid, seq-len {args.seq_len}, observers `{args.observers}`; "
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} when the run started.", "",
        "## Peak RSS vs windows (1 process, 2 threads)", "",
        "| windows | peak RSS (MiB) | wall (s) |", "|---|---|---|",
        *[f"| {r['samples']} | {r['peak_rss_mib']} | {r['wall_s']} |" for r in rss], "",
        f"Growth {args.small} -> {args.large} windows: {growth * 100:+.1f}% (target <= +10%).", "",
        f"## Speed, {args.speed_windows} windows", "",
        "| ranks x threads | calibrate time (s, incl. model load) | wall (s, incl. process start) |", "|---|---|---|",
        *[f"| {w} x {t} | {r['calib_s']} | {r['wall_s']} |" for (w, t), r in speed.items()], "",
        f"2 ranks x 1 thread vs 1 rank x 1 thread: {speed[(1, 1)]['calib_s'] / speed[(2, 1)]['calib_s']:.2f}x; "
        f"vs 1 rank x 2 threads: {speed[(1, 2)]['calib_s'] / speed[(2, 1)]['calib_s']:.2f}x (calibrate time).", "",
    ]
    (results / "calibration.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
