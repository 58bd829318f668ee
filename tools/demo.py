"""`make demo`: export SmolLM2-135M, calibrate, compile w8 and w8a8, and score every artifact in ORT.

Prints a table (size, WikiText-2 test perplexity, decode-step latency) and writes
demo_out/results.json. Runs the installed `eqc` CLI exactly as a user would.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from eqcompiler.data import find_wikitext

RECIPES = ["w8", "w8a8"]


def eqc(*args: object) -> str:
    exe = pathlib.Path(sys.executable).parent / "eqc"
    cmd = [str(exe), *map(str, args)]
    print("$ eqc " + " ".join(map(str, args)), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo failed: eqc {args[0]} exited {proc.returncode}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="demo_out", type=pathlib.Path)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()
    start = time.perf_counter()
    out: pathlib.Path = args.out
    out.mkdir(exist_ok=True)
    valid, test = find_wikitext("valid"), find_wikitext("test")
    fp32, stats = out / "fp32", out / "calib.npz"
    eqc("export", args.model, "-o", fp32, "--overwrite")
    eqc("calibrate", fp32, "--data", valid, "--samples", args.calib_samples, "--seq-len", 512, "-o", stats, "--overwrite")
    for recipe in RECIPES:
        eqc("compile", fp32, "--recipe", recipe, "--calib", stats, "-o", out / recipe, "--overwrite")
    rows = []
    for name in ["fp32", *RECIPES]:
        result = json.loads(eqc("eval", out / name, "--ppl", test, "--max-tokens", args.max_tokens, "--json"))
        rows.append({**result, "model": name})
    base = rows[0]["ppl"]
    print()
    print(f"SmolLM2-135M on WikiText-2 test ({rows[0]['tokens']} tokens, {rows[0]['window']}-token windows), ONNX Runtime CPU")
    print(f"{'artifact':<10}{'size MB':>10}{'ppl':>10}{'vs fp32':>10}{'decode ms':>12}")
    for r in rows:
        print(f"{r['model']:<10}{r['size_bytes'] / 1e6:>10.1f}{r['ppl']:>10.3f}{(r['ppl'] / base - 1) * 100:>+9.2f}%"
              f"{r['latency']['median_ms']:>12.2f}")
    print(f"(decode: {rows[0]['latency']['what']}, median of {rows[0]['latency']['runs']} runs)")
    elapsed = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": round(elapsed, 1)}, indent=2))
    print(f"demo finished in {elapsed / 60:.1f} min; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
