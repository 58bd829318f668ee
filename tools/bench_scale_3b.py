"""Scale check: a 3B-parameter LLaMA-shaped model through calibrate and compile with bounded memory.

The model is built directly as ONNX with onnx-ir (eqcompiler.models.synthetic), random weights
written to model.onnx.data one tensor at a time (no 3B HF checkpoint exists offline, and
instantiating one in PyTorch would itself need 12 GB). Each step runs as a separate process under
/usr/bin/time -v, which gives its peak resident set size (including memory-mapped weight pages
it touched) and wall time. Every step must stay under 6 GB: weights are memory-mapped and used one
layer at a time, never all loaded:
- calibrate runs layer-streamed (`--stream-layers`, eqcompiler/calibration/layer_stream.py: one small ORT
  session per decoder layer over all windows) and records the 'sample' observer (bounded token rows
  per linear input) so that w8a8-smooth's alpha search needs no whole-model session;
- compile quantizes one weight at a time and releases its mapping (passes/quantize_weights.py);
  smooth_quant keeps smoothed copies of mapped weights lazy (passes/smooth_quant.py _rescaled).

    .venv/bin/python tools/bench_scale_3b.py [--workdir /tmp/scale3b] [--keep] [--steps calibrate,w8a8-smooth]

Writes tools/results/scale_3b.json and .md; deletes the ~12 GB model and the outputs unless --keep.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

from eqcompiler.data import find_wikitext

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
EQC = pathlib.Path(sys.executable).parent / "eqc"
WIKI_VALID = find_wikitext("valid")
RSS_LIMIT_GB = 6.0

SPEC_3B = dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=32000, norm="rms", act="silu",
               tied=False, linear="matmul", dynamic=True, kv_cache=True, weight_std=0.02, seed=0)

BUILD = """
import pathlib, sys, time
from eqcompiler.models.synthetic import SynthSpec, save_artifact
spec = SynthSpec(**{spec})
text = pathlib.Path({text!r}).read_text()
t = time.perf_counter()
save_artifact(spec, pathlib.Path({out!r}), text=text)
print('parameters', spec.parameters(), 'seconds', round(time.perf_counter() - t, 1))
"""


def timed(cmd: list[str], label: str) -> dict:
    """Run `cmd` under /usr/bin/time -v; return peak RSS (GB), wall seconds, exit code and output tail."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss_gb = int(m.group(1)) / 1024 ** 2 if m else float("nan")
    tail = [line for line in proc.stderr.splitlines() if not line.startswith("\t")][-3:]
    row = {"step": label, "exit_code": proc.returncode, "peak_rss_gb": round(rss_gb, 2), "wall_s": round(wall, 1),
           "stdout_tail": proc.stdout.strip().splitlines()[-3:], "stderr_tail": tail}
    print(json.dumps(row), flush=True)
    return row


# abssum: w8a8-smooth's quantize_activations dynamic_above reads it
CALIB_OBSERVERS = "minmax,absmax_channel,abssum,sample"
RECIPES = ("w8a8", "w8a8-smooth", "w4-rtn")
STEPS = ("build", "calibrate", *RECIPES)


def dir_gb(path: pathlib.Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/scale3b")
    ap.add_argument("--keep", action="store_true", help="keep the model and outputs")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    ap.add_argument("--merge", action="store_true", help="keep rows of steps not run from the existing results file")
    args = ap.parse_args()
    steps = [x.strip() for x in args.steps.split(",") if x.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "fp32"
    stats = work / "stats.npz"
    rows: list[dict] = []
    commands: dict[str, str] = {}

    def step(label: str, cmd: list[str]) -> None:
        commands[label] = " ".join(map(str, cmd))
        rows.append({**timed(cmd, label), "command": commands[label]})

    if "build" in steps:
        shutil.rmtree(model, ignore_errors=True)
        step("build", [sys.executable, "-c", BUILD.format(spec=SPEC_3B, text=str(WIKI_VALID), out=str(model))])
    sizes = {"fp32": dir_gb(model)} if model.is_dir() else {}
    if "calibrate" in steps:
        step("calibrate", [str(EQC), "calibrate", str(model), "--data", str(WIKI_VALID), "--samples", str(args.samples),
                           "--seq-len", str(args.seq_len), "--observers", CALIB_OBSERVERS, "--stream-layers",
                           "-o", str(stats), "--overwrite"])
    for recipe in [r for r in RECIPES if r in steps]:
        out = work / recipe
        step(f"compile {recipe}", [str(EQC), "compile", str(model), "--recipe", recipe, "--calib", str(stats),
                                   "-o", str(out), "--overwrite"])
        if out.is_dir():
            sizes[recipe] = dir_gb(out)
            if not args.keep:
                shutil.rmtree(out)
    write_results(rows, sizes, args, merge=args.merge)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def write_results(rows: list[dict], sizes: dict[str, float], args: argparse.Namespace, merge: bool) -> None:
    from eqcompiler.models.synthetic import SynthSpec

    path = RESULTS / "scale_3b.json"
    if merge and path.is_file():
        old = json.loads(path.read_text())
        done = {r["step"] for r in rows}
        rows = [r for r in old.get("steps", []) if r["step"] not in done] + rows
        sizes = {k: v for k, v in {**old.get("sizes_gb", {}), **sizes}.items() if k in ("fp32", *RECIPES)}
    order = {"build": 0, "calibrate": 1, **{f"compile {r}": 2 + i for i, r in enumerate(RECIPES)}}
    rows = sorted((r for r in rows if r["step"] in order), key=lambda r: order[r["step"]])
    result = {"spec": SPEC_3B, "parameters": SynthSpec(**SPEC_3B).parameters(), "rss_limit_gb": RSS_LIMIT_GB,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "stream_layers": True},
              "steps": rows, "sizes_gb": sizes}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# 3B-parameter scale check", "",
             f"LLaMA-shaped synthetic model ({result['parameters'] / 1e9:.2f} B parameters: hidden 3072, 28 layers, "
             "24 heads / 8 KV heads, MLP 8192, vocab 32000, untied), random weights, built directly as ONNX with "
             "onnx-ir (eqcompiler/models/synthetic.py), weights written layer by layer as external data.",
             f"Calibration: {args.samples} windows x {args.seq_len} tokens of WikiText-2 valid, layer-streamed, "
             "observers as in the recorded command below. Peak RSS from /usr/bin/time -v (includes touched memory-mapped "
             "weight pages). 2-core machine shared with other jobs: wall times are indicative.", "",
             "| step | exit | peak RSS (GB) | wall (s) | under 6 GB | run |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        # rows without a recorded command were kept (--merge) from a run of the earlier script version
        run = "this version" if "command" in r else "earlier run"
        lines.append(f"| {r['step']} | {r['exit_code']} | {r['peak_rss_gb']} | {r['wall_s']} | "
                     f"{'yes' if r['peak_rss_gb'] < RSS_LIMIT_GB and r['exit_code'] == 0 else 'no'} | {run} |")
    lines += ["", "Sizes on disk (GB): " + ", ".join(f"{k} {v}" for k, v in sizes.items()), "", NOTES, "",
              "Commands (`python tools/bench_scale_3b.py` runs them all):", ""]
    lines += [f"    {r['command']}" for r in rows if "command" in r and r["step"] != "build"]
    lines.append("")
    (RESULTS / "scale_3b.md").write_text("\n".join(lines))
    print("\n".join(lines))


NOTES = """How memory stays bounded:
- calibrate (`--stream-layers`, chosen automatically when the weights exceed 25% of available memory):
  eqcompiler/calibration/layer_stream.py cuts the graph into one stage per decoder layer (nodes keyed by the layer
  index in the names of the weights they read; weightless nodes sink to their first consumer's stage),
  runs each stage as its own ORT session over all windows with its weights read from the original
  model.onnx.data (the stage graph is passed as bytes, ORT pointed at the artifact folder; nothing is
  written), keeps only the per-window boundary tensors (hidden state, mask, rotary cos/sin) and drops
  each session before opening the next. Statistics equal whole-graph calibration (tests/test_layer_stream.py).
  Before this, one whole-graph session peaked at 11.56 GB (338 s).
- the 'sample' observer keeps a deterministic bottom-k subset of at most 512 token rows per linear input
  (extra sample_rows/sample_keys); w8a8-smooth's search="auto" scores alphas on those rows with numpy
  (search="sample") instead of opening an ORT session on the whole model (which reached 11.8 GB before).
  Without samples or gram statistics on a model this large, search="auto" fails and names the observer.
- compile: weights stay memory-mapped; smooth_quant's smoothed copies of mapped weights are lazy tensors
  (computed when quantize_weights reads them, source mapping released after), and quantize_weights
  releases each mapping once quantized; the int8/int4 outputs (~3 GB / ~1.7 GB) are what stays in memory.
- w8a8-smooth wall time is the numpy alpha search (15 candidates x 113 sites, each quantizing the site's
  weights), on 2 cores shared with other jobs (load average ~6 during the run).

Checks on the real SmolLM2-135M (2026-11-25): streamed and whole-graph calibration give identical
statistics (all observers + sample + kv, 1 decode step: max difference 0); w8a8-smooth from a streamed
calibration with the sample observer (16 x 512 tokens, search="auto" -> "sample") reaches perplexity
32.553 on 8192 WikiText-2 test tokens (fp32 29.602; the whole-model ORT search gave 32.777). With the
w8a8-smooth recipe as changed at 19:07 that day (untie_lm_head, dynamic_above 0.15, needs abssum) and
observers minmax,absmax_channel,abssum,sample: method "sample" on all 121 sites, perplexity 30.428.
The 3B rows marked "this version" were measured with that current recipe (untie_lm_head is a no-op on
this untied model; dynamic_above picked its per-token inputs from the abssum statistics). An earlier
run with the previous recipe (no dynamic fallback) gave the same 5.18 GB peak in 1855 s under heavier load."""


if __name__ == "__main__":
    main()
