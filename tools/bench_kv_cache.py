"""Benchmark the quantized KV cache on SmolLM2: perplexity through the cache, bytes per token.

Every variant is scored the same way (`eqc eval --ppl TEST --chunk 64`): each 512-token window of
WikiText-2 test is fed 64 tokens at a time through the KV cache, so later chunks read cached
(quantized) keys and values. The fp32-cache artifact scored the same way is the baseline.

  python tools/bench_kv_cache.py --fp32 /tmp/x/smol --calib /tmp/x/stats.npz [--max-tokens 8192]
(stats from `eqc calibrate SMOL --data valid.txt --samples 16 --seq-len 512 --observers minmax,absmax_channel,abssum,kv`)
Writes tools/results/kv_cache.json and tools/results/kv_cache.md.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

from eqcompiler.artifact.folder import resolve_artifact
from eqcompiler.data import find_wikitext
from eqcompiler.runtime.decode import chunked_perplexity
from eqcompiler.compile.recipes import kv_step
from eqcompiler.compile.pipeline import compile_model

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# name -> (recipe, kv bits or None, key granularity, value granularity)
VARIANTS = {
    "fp32 cache": ("none", None, None, None),
    "int8 KV (keys per-channel frozen, values per-token)": ("none", 8, "channel", "token"),
    "int4 KV (keys per-channel frozen, values per-token)": ("none", 4, "channel", "token"),
    "int8 KV (keys per-token, values per-token)": ("none", 8, "token", "token"),
    "int4 KV (keys per-token, values per-token)": ("none", 4, "token", "token"),
    "int8 KV (keys and values per-channel frozen)": ("none", 8, "channel", "channel"),
    "int4 KV (keys and values per-channel frozen)": ("none", 4, "channel", "channel"),
    "w8a8 (fp32 cache)": ("w8a8", None, None, None),
    "w8a8 + int8 KV": ("w8a8", 8, "channel", "token"),
    "w8a8-smooth (fp32 cache)": ("w8a8-smooth", None, None, None),
    "w8a8-smooth + int8 KV": ("w8a8-smooth", 8, "channel", "token"),
}


def _previous(args: argparse.Namespace) -> dict[str, dict]:
    path = RESULTS / "kv_cache.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if (old.get("max_tokens"), old.get("chunk"), old.get("text")) != (args.max_tokens, args.chunk, args.text):
        return {}
    return {r["variant"]: r for r in old["rows"] if "ppl" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True, help="exported SmolLM2 artifact")
    ap.add_argument("--calib", required=True, help="stats with the kv observer")
    ap.add_argument("--text", default=str(find_wikitext("test")))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--work", default="/tmp/bench_kv_cache")
    ap.add_argument("--only", default=None, help="comma-separated substrings of variant names")
    args = ap.parse_args()
    work = pathlib.Path(args.work)
    rows = []
    previous = _previous(args)
    for name, (recipe, bits, keys, values) in VARIANTS.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        if name in previous:  # measured before with the same settings (the script can be resumed)
            rows.append(previous[name])
            continue
        folder = pathlib.Path(args.fp32)
        if recipe != "none" or bits:
            folder = work / (f"{recipe}_kv{bits}_{keys}_{values}" if bits else recipe)
            folder.parent.mkdir(parents=True, exist_ok=True)
            extra = [kv_step(bits, keys, values, args.calib)] if bits else []
            try:
                compile_model(args.fp32, recipe, folder, calib=args.calib, overwrite=True, extra_steps=extra)
            except Exception as exc:  # a recipe another engineer has not landed yet
                rows.append({"variant": name, "error": str(exc).splitlines()[0]})
                print(name, "skipped:", rows[-1]["error"], flush=True)
                continue
        t = time.perf_counter()
        r = chunked_perplexity(folder, args.text, chunk=args.chunk, max_tokens=args.max_tokens)
        kv = resolve_artifact(folder).kv_cache or {}
        fp16 = kv.get("fp16_bytes_per_token") or 2 * 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"]
        rows.append({"variant": name, "recipe": recipe, "kv_bits": bits, "keys": keys, "values": values,
                     "ppl": round(r["ppl"], 4), "tokens": r["tokens"], "windows": r["windows"],
                     "cache_bytes_per_token": r["cache_bytes_per_token"], "fp16_bytes_per_token": fp16,
                     "ratio_vs_fp16": round(r["cache_bytes_per_token"] / fp16, 4), "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["ppl"] for r in rows if r["variant"] == "fp32 cache" and "ppl" in r), None)
    for r in rows:
        if base and "ppl" in r:
            r["delta_vs_fp32_cache_pct"] = round(100 * (r["ppl"] / base - 1), 3)
    out = {"model": "SmolLM2-135M", "text": args.text, "max_tokens": args.max_tokens, "chunk": args.chunk,
           "window": 512, "host": platform.node(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv_cache.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
