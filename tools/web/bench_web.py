"""Browser (onnxruntime-web WASM, headless Chromium) vs native `eqc generate` on the same artifacts and prompt.

    .venv/bin/python tools/web/bench_web.py ART [ART ...] --threads 1 2 --repeat 3 [--json OUT.json]

For each artifact and thread count: eqc generate (EQC_THREADS=threads) is the reference; the page runs
--repeat times (one fresh browser each) and the median decode tokens/s is reported, with whether the
browser's tokens equal eqc generate's. For quantized artifacts it also runs eqc generate with
EQC_ORT_CONFIG=session.qdq_matmulnbits_accuracy_level=1: native ORT otherwise fuses DequantizeLinear+MatMul
into MatMulNBits with int8 activations (accuracy_level 4), arithmetic onnxruntime-web does not do.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import serve as web  # noqa: E402

FP32_ACTIVATIONS = "session.qdq_matmulnbits_accuracy_level=1"


def eqc_generate(artifact: pathlib.Path, prompt: str, new_tokens: int, threads: int, ort_config: str = "") -> dict:
    eqc = shutil.which("eqc") or str(pathlib.Path(sys.executable).parent / "eqc")
    env = {**os.environ, "EQC_THREADS": str(threads), "EQC_ORT_CONFIG": ort_config, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([eqc, "generate", str(artifact), "--prompt", prompt, "--max-new-tokens", str(new_tokens),
                           "--json"], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=pathlib.Path)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=pathlib.Path, help="also write every run here")
    args = ap.parse_args()
    if reason := web.npm_ready():
        raise SystemExit(reason)
    server, base = web.serve({str(k): a for k, a in enumerate(args.artifacts)})
    rows = []
    for k, art in enumerate(args.artifacts):
        quantized = json.loads((art / "manifest.json").read_text()).get("quantization") is not None
        for threads in args.threads:
            ref = eqc_generate(art, args.prompt, args.max_new_tokens, threads)
            ref_fp32act = eqc_generate(art, args.prompt, args.max_new_tokens, threads, FP32_ACTIVATIONS) if quantized else ref
            runs = [web.run_page(web.page_url(base, str(k), args.prompt, args.max_new_tokens, threads), timeout_s=900)
                    for _ in range(args.repeat)]
            row = {"artifact": str(art), "threads": threads, "load_avg": os.getloadavg()[0],
                   "browser_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                   "browser_prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
                   "browser_load_ms": statistics.median(r["load_ms"] for r in runs),
                   "eqc_generate_tokens_per_s": 1000 / ref["ms_per_token"],
                   "eqc_generate_fp32act_tokens_per_s": 1000 / ref_fp32act["ms_per_token"],
                   "new_tokens": len(runs[0]["tokens"]), "stopped": runs[0]["stopped"],
                   "browser_runs_agree": all(r["tokens"] == runs[0]["tokens"] for r in runs),
                   "matches_eqc_generate": runs[0]["tokens"] == ref["tokens"],
                   "matches_eqc_generate_fp32act": runs[0]["tokens"] == ref_fp32act["tokens"],
                   "browser_text": runs[0]["text"], "eqc_generate_text": ref["text"], "runs": runs}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), file=sys.stderr, flush=True)
    server.shutdown()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("| artifact | threads | browser tok/s | browser prefill ms | eqc generate tok/s | "
          "eqc generate (accuracy_level=1) tok/s | tokens | = eqc generate | = eqc generate (accuracy_level=1) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['artifact']} | {r['threads']} | {r['browser_tokens_per_s']:.2f} | {r['browser_prefill_ms']:.0f} | "
              f"{r['eqc_generate_tokens_per_s']:.2f} | {r['eqc_generate_fp32act_tokens_per_s']:.2f} | "
              f"{r['new_tokens']} ({r['stopped']}) | {'yes' if r['matches_eqc_generate'] else 'no'} | "
              f"{'yes' if r['matches_eqc_generate_fp32act'] else 'no'} |")


if __name__ == "__main__":
    main()
