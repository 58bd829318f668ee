"""`make demo`: SmolLM2-135M from export to the recipes a user should pick, scored in ONNX Runtime.

Exports SmolLM2-135M, calibrates once with every observer the demo recipes read (`eqc calibrate --for`),
compiles w8a8-smooth, w8a8-dynamic and w4-gptq as portable QDQ artifacts, lowers each for
`--target ort-cpu` (when the op library is built), and prints one table: size, WikiText-2 test perplexity
against fp32, and decode-step latency. Runs the installed `eqc` CLI exactly as a user would and writes
demo_out/results.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from eqcompiler.data import find_wikitext

RECIPES = ["w8a8-smooth", "w8a8-dynamic", "w4-gptq"]


def eqc(*args: object) -> str:
    exe = pathlib.Path(sys.executable).parent / "eqc"
    print("$ eqc " + " ".join(map(str, args)), flush=True)
    proc = subprocess.run([str(exe), *map(str, args)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo failed: eqc {args[0]} exited {proc.returncode}")
    return proc.stdout


def op_library_problem() -> str | None:
    """Why `--target ort-cpu` cannot be compiled here (None when eqc's op library is built)."""
    from eqcompiler.runtime import custom_ops

    try:
        custom_ops.find_library()
    except custom_ops.EqcOpsError as exc:
        return str(exc)
    return None


def print_table(rows: list[dict], elapsed_note: str) -> None:
    base, first = rows[0]["portable"]["ppl"], rows[0]["portable"]
    print()
    print(f"SmolLM2-135M on WikiText-2 test ({first['tokens']} tokens, {first['window']}-token windows), "
          "ONNX Runtime CPU")
    print(f"{'artifact':<14}{'size MB':>8}{'ppl':>9}{'vs fp32':>9}{'decode ms':>11}"
          f"{'ort-cpu ppl':>13}{'vs fp32':>9}{'decode ms':>11}")
    for row in rows:
        r, lowered = row["portable"], row.get("ort-cpu")
        line = (f"{row['recipe']:<14}{r['size_bytes'] / 1e6:>8.1f}{r['ppl']:>9.3f}{(r['ppl'] / base - 1) * 100:>+8.2f}%"
                f"{r['latency']['median_ms']:>11.2f}")
        if lowered:
            line += (f"{lowered['ppl']:>13.3f}{(lowered['ppl'] / base - 1) * 100:>+8.2f}%"
                     f"{lowered['latency']['median_ms']:>11.2f}")
        print(line)
    print(f"(decode: {first['latency']['what']}, median of {first['latency']['runs']} runs; {elapsed_note})")


def evaluate(artifact: pathlib.Path, text: pathlib.Path, max_tokens: int) -> dict:
    return json.loads(eqc("eval", artifact, "--ppl", text, "--max-tokens", max_tokens, "--json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="demo_out", type=pathlib.Path)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated recipes to compile.")
    parser.add_argument("--max-tokens", type=int, default=8192, help="Test tokens scored per artifact.")
    parser.add_argument("--calib-samples", type=int, default=16)
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    start = time.perf_counter()
    out: pathlib.Path = args.out
    out.mkdir(exist_ok=True)
    valid, test = find_wikitext("valid"), find_wikitext("test")
    missing_ops = op_library_problem()
    if missing_ops:
        print(f"demo: skipping the --target ort-cpu rows: {missing_ops}", flush=True)
    fp32, stats = out / "fp32", out / "calib.npz"
    eqc("export", args.model, "-o", fp32, "--overwrite")
    eqc("calibrate", fp32, "--data", valid, "--for", ",".join(recipes), "--samples", args.calib_samples,
        "--seq-len", 512, "-o", stats, "--overwrite")
    rows = [{"recipe": "fp32", "portable": evaluate(out / "fp32", test, args.max_tokens)}]
    for recipe in recipes:
        eqc("compile", fp32, "--recipe", recipe, "--calib", stats, "-o", out / recipe, "--overwrite")
        row = {"recipe": recipe, "portable": evaluate(out / recipe, test, args.max_tokens)}
        if not missing_ops:  # lowering a compiled artifact is a separate, seconds-long step
            lowered = out / f"{recipe}-ort-cpu"
            eqc("compile", out / recipe, "--recipe", "none", "--target", "ort-cpu", "-o", lowered, "--overwrite")
            row["ort-cpu"] = evaluate(lowered, test, args.max_tokens)
        rows.append(row)
    elapsed = time.perf_counter() - start
    print_table(rows, f"demo took {elapsed / 60:.1f} min")
    if missing_ops:
        print(f"ort-cpu rows skipped: {missing_ops}")
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": round(elapsed, 1),
                                                  "ort_cpu_skipped": missing_ops}, indent=2))
    print(f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
