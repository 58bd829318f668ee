"""Scale check: a 3B-parameter LLaMA-shaped model through calibrate and compile with bounded memory.

The model is built directly as ONNX with onnx-ir (eqcompiler.models.synthetic), random weights
written to model.onnx.data one tensor at a time (no 3B HF checkpoint exists offline, and
instantiating one in PyTorch would itself need 12 GB). Each step runs as a separate process under
/usr/bin/time -v, which gives its peak resident set size (including memory-mapped weight pages
it touched) and wall time. Compile must stay under 6 GB: weights are memory-mapped, quantized one
at a time and their mapping released (passes/quantize_weights.py), never all loaded.

    .venv/bin/python tools/bench_scale_3b.py [--workdir /tmp/scale3b] [--keep]

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

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
EQC = pathlib.Path(sys.executable).parent / "eqc"
WIKI_VALID = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
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


def dir_gb(path: pathlib.Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/scale3b")
    ap.add_argument("--keep", action="store_true", help="keep the model and outputs")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--skip-build", action="store_true", help="reuse an existing model in the workdir")
    args = ap.parse_args()
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "fp32"
    rows: list[dict] = []
    if not args.skip_build:
        shutil.rmtree(model, ignore_errors=True)
        rows.append(timed([sys.executable, "-c", BUILD.format(spec=SPEC_3B, text=str(WIKI_VALID), out=str(model))], "build"))
    sizes = {"fp32": dir_gb(model)}
    stats = work / "stats.npz"
    rows.append(timed([str(EQC), "calibrate", str(model), "--data", str(WIKI_VALID), "--samples", str(args.samples),
                       "--seq-len", str(args.seq_len), "-o", str(stats), "--overwrite"], "calibrate"))
    w4 = work / "w4g128.json"
    w4.write_text(json.dumps({"name": "w4g128", "description": "int4 weights, blocks of 128",
                              "passes": [{"pass": "quantize_weights", "options": {"bits": 4, "block_size": 128}}]}))
    from eqcompiler.recipes import builtin_recipes

    recipes = [("w8a8", "w8a8")] + [(r, r) for r in ("w8a8-smooth",) if r in builtin_recipes()] + [("w4g128", str(w4))]
    for label, recipe in recipes:
        out = work / label
        rows.append(timed([str(EQC), "compile", str(model), "--recipe", recipe, "--calib", str(stats), "-o", str(out),
                           "--overwrite"], f"compile {label}"))
        if out.is_dir():
            sizes[label] = dir_gb(out)
            if not args.keep:
                shutil.rmtree(out)
    from eqcompiler.models.synthetic import SynthSpec

    result = {"spec": SPEC_3B, "parameters": SynthSpec(**SPEC_3B).parameters(), "rss_limit_gb": RSS_LIMIT_GB,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "steps": rows, "sizes_gb": sizes}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_3b.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# 3B-parameter scale check", "",
             f"LLaMA-shaped synthetic model ({result['parameters'] / 1e9:.2f} B parameters: hidden 3072, 28 layers, "
             "24 heads / 8 KV heads, MLP 8192, vocab 32000, untied), random weights, built directly as ONNX with "
             "onnx-ir (eqcompiler/models/synthetic.py), weights written layer by layer as external data.",
             f"Calibration: {args.samples} windows x {args.seq_len} tokens of WikiText-2 valid. "
             "Peak RSS from /usr/bin/time -v (includes touched memory-mapped weight pages).", "",
             "| step | exit | peak RSS (GB) | wall (s) | under 6 GB |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['exit_code']} | {r['peak_rss_gb']} | {r['wall_s']} | "
                     f"{'yes' if r['peak_rss_gb'] < RSS_LIMIT_GB else 'no'} |")
    lines += ["", "Sizes on disk (GB): " + ", ".join(f"{k} {v}" for k, v in sizes.items()), ""]
    (RESULTS / "scale_3b.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
