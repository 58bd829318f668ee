"""ORT CPU speed of eqc's lowerings on SmolLM2-135M vs fp32 and vs ONNX Runtime's own quantize_dynamic.

Usage (from the repo root; needs an exported fp32 artifact and calibration statistics):
    .venv/bin/python tools/bench_speed.py --fp32 /tmp/x/smol --calib /tmp/x/stats.npz --work /tmp/x/speed

Compiles each variant (portable QDQ and --target ort-cpu), checks perplexity on a small token budget,
then measures every model with `eqc bench` in ONE run (each model in its own subprocess, 2 threads)
and writes tools/results/speed.md and speed.json. Targets: W8A8 decode step <= 0.5x fp32,
4-bit decode <= 0.4x, prefill 512 <= 0.7x.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from eqcompiler.data import find_wikitext

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
W8_NBITS_RECIPE = {"name": "w8+nbits", "description": "w8, then per-channel int8 -> MatMulNBits bits=8 (bench only)",
                   "passes": [{"pass": "quantize_weights", "options": {"bits": 8, "symmetric": True, "block_size": 0}},
                              {"pass": "lower_weight_only_int8", "options": {}}]}
W4_RECIPE = {"name": "w4-g128", "description": "int4 symmetric, groups of 128 (bench only)",
             "passes": [{"pass": "quantize_weights", "options": {"bits": 4, "symmetric": True, "block_size": 128}}]}


def eqc(*args: str) -> str:
    exe = pathlib.Path(sys.executable).parent / "eqc"
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eqc {' '.join(map(str, args))} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def ort_quantize_dynamic(fp32: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """ONNX Runtime's own dynamic quantization (int8 weights, MatMulInteger + DynamicQuantizeLinear)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.onnx"
    if not target.exists():
        quantize_dynamic(str(fp32 / "model.onnx"), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True)
    for f in fp32.iterdir():  # tokenizer + a manifest marking it as an outside tool's output
        if f.suffix in (".json", ".txt") and not (out / f.name).exists():
            data = f.read_text()
            if f.name == "manifest.json":
                m = json.loads(data)
                m["quantization"] = {"recipe": "ort-quantize_dynamic"}
                m["model_file"] = "model.onnx"
                data = json.dumps(m)
            (out / f.name).write_text(data)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", required=True, type=pathlib.Path)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--work", required=True, type=pathlib.Path)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma-separated variant names to skip")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    (work / "w4.json").write_text(json.dumps(W4_RECIPE))
    (work / "w8nbits.json").write_text(json.dumps(W8_NBITS_RECIPE))
    variants = {  # name: (recipe, target, needs calib)
        "w8": ("w8", "portable", False),
        "w8_ort": ("w8", "ort-cpu", False),  # ai.eqc::Int8WeightGemm
        "w8_nbits": (str(work / "w8nbits.json"), "portable", False),  # MatMulNBits bits=8: the rejected candidate
        "w8a8": ("w8a8", "portable", True),
        "w8a8_ort": ("w8a8", "ort-cpu", True),
        "w8a8dyn_ort": ("w8a8-dynamic", "ort-cpu", True),
        "w4_ort": (str(work / "w4.json"), "ort-cpu", False),
    }
    skip = set(filter(None, args.skip.split(",")))
    models = {"fp32": args.fp32}
    for name, (recipe, target, calib) in variants.items():
        if name in skip:
            continue
        out = work / name
        if not (out / "manifest.json").exists():
            extra = ["--calib", args.calib] if calib else []
            eqc("compile", args.fp32, "--recipe", recipe, "--target", target, "-o", out, "--overwrite", *extra)
        models[name] = out
    if "ort_qdyn" not in skip:
        models["ort_qdyn"] = ort_quantize_dynamic(args.fp32, work / "ort_qdyn")
    text = str(find_wikitext("test"))
    cache = work / f"ppl_{args.ppl_tokens}.json"  # perplexity does not change between bench reruns
    ppl = json.loads(cache.read_text()) if cache.exists() else {}
    for name, path in models.items():
        if name not in ppl:
            r = json.loads(eqc("eval", path, "--ppl", text, "--max-tokens", str(args.ppl_tokens), "--no-latency", "--json"))
            ppl[name] = r["ppl"]
            cache.write_text(json.dumps(ppl))
        print(f"{name}: ppl {ppl[name]:.3f}", flush=True)
    start = time.time()
    bench = json.loads(eqc("bench", *models.values(), "--prefill", "512", "--past", "512", "--warmup", "1",
                           "--runs", str(args.runs), "--threads", "2", "--json"))["results"]
    ops = {name: json.loads(eqc("inspect", path, "--json"))["layer_summary"] for name, path in models.items()}
    write(models, ppl, bench, ops, args, time.time() - start)


def cpu_description() -> str:
    """Model name, core count and whether int8 dot products are exact here (VNNI), for the results file."""
    import os

    from eqcompiler.lowering.cpu_features import int8_gemm_saturates

    name = "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} logical cores, {'no VNNI' if int8_gemm_saturates() else 'VNNI'}"


NOTES = """## Reading (SmolLM2-135M, run of 2026-11-27 on the 2-core CI-class AMD EPYC, AVX2 without VNNI)

- New this run: `--target ort-cpu` lowers every int8 weight-only layer, the tied lm_head included, to
  eqc's `ai.eqc::Int8WeightGemm` (reads the int8 weight in place, float math). Before, ORT dequantized
  the whole 49152x576 tied table (28M values) on every step: 73 ms of a 135 ms w8a8-dynamic decode step
  (ORT profile). Decode step vs fp32: w8a8dyn_ort 0.51x (2.25x earlier the same day, with the lm_head
  still QDQ), w4_ort 0.55x (2.33x in the 2026-11-25 run), w8_ort 0.60x vs portable w8 1.73x.
- w8 perplexity: w8_ort 25.479 is the QDQ graph's own value (the same as the unfused graph); portable w8
  scores 25.621 because ORT's default session rewrites its DequantizeLinear->MatMul pairs into
  MatMulNBits with int8-quantized activations. MatMulNBits bits=8 with float compute (w8_nbits,
  lower_weight_only_int8) keeps the numerics but is 14x slower than fp32 at decode.
- Targets: prefill 512 <= 0.7x fp32: not met in this run (best w8a8 / ORT quantize_dynamic 0.75-0.79x;
  the 2026-11-25 run measured 0.42-0.64x, on a machine whose CPU that run did not record). W8A8 decode <= 0.5x: 0.51x (w8a8dyn_ort), within this machine's noise of the
  target, not claimed as met. 4-bit decode <= 0.4x: 0.55x, missed; MatMulNBits at accuracy_level 0 (float
  compute, keeps the QDQ numerics) is the remaining cost.
- w8a8 (static, uint8 activations) is 39.464 portable vs 42.114 with ort-cpu: on this VNNI-less CPU
  ort-cpu keeps int8 weights in [-64, 63] (reduce_range auto, a compile warning says so) because ORT's
  u8s8 kernels saturate on full-range weights here.
- ORT's own quantize_dynamic collapses on this CPU (ppl 527,236): the u8s8 saturation again.
"""


def write(models: dict, ppl: dict, bench: list, ops: dict, args: argparse.Namespace, seconds: float) -> None:
    ref = bench[0]
    rows = []
    for (name, _), r in zip(models.items(), bench):
        rows.append({"name": name, "ppl": ppl[name], "size_mb": r["size_bytes"] / 1e6,
                     "prefill_ms": r["prefill"]["median_ms"], "prefill_x": r["prefill"]["median_ms"] / ref["prefill"]["median_ms"],
                     "decode_ms": r["decode"]["median_ms"], "decode_x": r["decode"]["median_ms"] / ref["decode"]["median_ms"],
                     "decode_min_ms": r["decode"]["min_ms"], "decode_max_ms": r["decode"]["max_ms"],
                     "peak_rss_mb": r["peak_rss_mb"], "kernels": ops[name]})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps({"rows": rows, "bench": bench}, indent=2) + "\n")
    lines = ["# ORT CPU speed: SmolLM2-135M (tools/bench_speed.py)", "",
             f"One `eqc bench` run, each model in its own subprocess, ONNX Runtime {ref['ort_version']} CPU provider, "
             f"{ref['threads']} threads; prefill 512 tokens; decode = 1 token with 512 cached; 1 warm-up + {args.runs} timed runs, "
             f"median (min-max for decode). Perplexity on WikiText-2 test, first {args.ppl_tokens} tokens. x = ratio to fp32 in the same run.",
             f"CPU: {cpu_description()}. Absolute times on a shared VM are noisy; ratios within the run are the "
             "comparable figures.", "",
             "| model | kernels | ppl | size MB | prefill ms | x fp32 | decode ms (min-max) | x fp32 | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kern = "; ".join(f"{v}x {k}" for k, v in r["kernels"].items())
        lines.append(f"| {r['name']} | {kern} | {r['ppl']:.3f} | {r['size_mb']:.1f} | {r['prefill_ms']:.0f} | {r['prefill_x']:.2f} | "
                     f"{r['decode_ms']:.1f} ({r['decode_min_ms']:.1f}-{r['decode_max_ms']:.1f}) | {r['decode_x']:.2f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"bench wall time {seconds:.0f} s.", "", NOTES]
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
