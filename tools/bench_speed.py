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
        "w8_nbits": (str(work / "w8nbits.json"), "portable", False),  # ort-cpu keeps w8 as QDQ; the rejected candidate
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
    text = "/work/shared/data/wikitext-2/test.txt"
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


NOTES = """## Reading (SmolLM2-135M, run of 2026-11-25 on the shared 2-core machine, load average ~13)

- w8a8 (uint8 static): ORT's own QDQ optimizer already fuses the uint8-activation QDQ MatMuls into its
  integer kernel, so portable w8a8 is fast; the explicit `lower_qdq_to_ort_int8` lowering
  (MatMulIntegerToFloat) gives the same perplexity to 3 decimals (39.655) and the same speed within the noise
  (decode 0.57x vs 0.67x, prefill 0.46x vs 0.50x). It is what makes symmetric int8 (w8a8-int8, the
  TensorRT form) fast too, which ORT does not fuse (the brief's 394 ms vs 24 ms fp32).
- Targets: prefill 512 <= 0.7x fp32 is met by w8a8 (0.46-0.50x) and ORT quantize_dynamic (0.55x).
  W8A8 decode <= 0.5x is missed narrowly (0.57-0.67x; ORT quantize_dynamic 0.56x): at batch 1 with
  512 cached tokens the float attention over the cache, the KV concat and the float32
  49152-wide logits are a fixed cost the int8 GEMMs do not remove. 4-bit decode <= 0.4x is missed
  badly (1.58x): the tied lm_head keeps an int8 per-row DequantizeLinear of the whole 28M-value table
  on every token (lower_matmul_nbits takes only [K,N] blocked weights), and MatMulNBits at
  accuracy_level 0 (float32 compute, needed to keep the QDQ numerics) is slow on this ORT build;
  accuracy_level 4 (int8 activations per block, ~7e-3 relative per layer) is the known fast path.
- w8 weight-only: MatMulNBits bits=8 (lower_weight_only_int8, exact numerics vs the unoptimized QDQ graph)
  is 6x slower at decode than the QDQ graph, so ort-cpu keeps w8 as QDQ. Note ORT's optimizer rewrites
  the w8 QDQ graph itself with ~2e-3 relative logit deviation (ppl 25.559 vs 25.479 unfused).
- w8a8-dynamic via ai.eqc::FusedInt8Gemm (210 layers) is the most accurate int8 variant (ppl 26.256), but
  its lm_head went through MatMulNBits bits=8 in this run (2.27x decode); without that lowering the
  lm_head dequantizes the whole table per token. A FusedInt8Gemm variant for the transposed tied table
  (or a per-row int8 GEMV) is what stands in the way.
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
             "Note: the 2-core machine was shared with other jobs during the run, so absolute times are inflated and noisy; "
             "ratios within the run are the comparable figures.", "",
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
