"""`eqc bench`: prefill and decode-step latency, throughput, memory, size and KV-cache cost, side by side.

Each model is measured in its own subprocess (`python -m eqcompiler.analysis.bench --worker ...`) so that
peak-memory figures do not mix and one model's allocator state does not slow the next. Inside the
worker: RSS is read before the session is created; the peak RSS (ru_maxrss) after all runs minus
that baseline is the session's peak memory. Timings: `warmup` untimed runs, then `runs` timed runs,
reported as median/min/max in milliseconds.

- prefill: `prefill` tokens, empty cache, batch 1 (one session.run; logits copied out).
- decode: one new token with `past` cached tokens, batch 1; the cache is restored to exactly
  `past` tokens before every timed step (eqcompiler.runtime.decode.CacheRunner carries it as OrtValues,
  so a quantized KV cache stays quantized).
"""
from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
from typing import Any

import numpy as np

from eqcompiler.artifact import folder as art_mod
from eqcompiler.errors import EqcError
from eqcompiler.analysis.evaluate import timed

FIELDS = ("model", "size_bytes", "prefill", "decode", "peak_rss_mb", "kv_cache", "threads", "ort_version")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def kv_bytes_per_token(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Bytes the KV cache grows by per token (all layers, K and V), from the manifest's kv_cache section."""
    kv = manifest.get("kv_cache")
    if not kv:
        return None
    if kv.get("bytes_per_token"):
        per_token = int(kv["bytes_per_token"])
    else:
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "uint4x2": 0.5}.get(kv.get("dtype"), 4)
        per_token = int(2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * itemsize)
    bits = (kv.get("quantized") or {}).get("bits") or {"float32": 32, "float16": 16}.get(kv.get("dtype"), None)
    return {"dtype": kv.get("dtype"), "bits": bits, "bytes_per_token": per_token}


def measure(model: str | pathlib.Path, prefill: int = 512, past: int = 512, warmup: int = 2, runs: int = 10,
            threads: int = 2) -> dict[str, Any]:
    """All figures for one model, in this process (the CLI calls this through a worker subprocess)."""
    import onnxruntime as ort

    from eqcompiler.runtime.decode import CacheRunner
    from eqcompiler.runtime.session import make_session

    art = art_mod.resolve_artifact(model)
    if art.task != "causal-lm":
        raise EqcError(f"bench measures causal LMs; '{model}' is a {art.task} model")
    base = _rss_mb()
    session = make_session(art_mod.model_file(art), threads=threads)
    runner = CacheRunner(session)
    vocab = 100
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab, size=(1, prefill), dtype=np.int64)

    def run_prefill() -> None:
        runner.reset()
        runner.step(prompt)

    pre = timed(run_prefill, warmup, runs)
    pre["tokens"] = prefill
    pre["tokens_per_s"] = prefill / (pre["median_ms"] / 1000)
    runner.reset()
    runner.step(rng.integers(3, vocab, size=(1, past), dtype=np.int64))
    saved, saved_len = dict(runner.past), runner.past_len
    token = np.array([[7]], dtype=np.int64)

    def run_decode() -> None:
        runner.past, runner.past_len = dict(saved), saved_len
        runner.step(token)

    dec = timed(run_decode, warmup, runs)
    dec["past"] = past
    dec["tokens_per_s"] = 1000 / dec["median_ms"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": str(model), "size_bytes": art_mod.size_bytes(art.folder if art.manifest else pathlib.Path(model)),
            "recipe": (art.manifest.get("quantization") or {}).get("recipe", "none"), "target": art.manifest.get("target", "portable"),
            "prefill": pre, "decode": dec, "peak_rss_mb": round(peak - base, 1), "kv_cache": kv_bytes_per_token(art.manifest),
            "threads": threads, "ort_version": ort.__version__}


def bench(models: list[str], prefill: int = 512, past: int = 512, warmup: int = 2, runs: int = 10,
          threads: int = 2) -> list[dict[str, Any]]:
    """Measure each model in its own subprocess, one after the other (never concurrently)."""
    results = []
    for model in models:
        art_mod.resolve_artifact(model)  # fail early, with the usual message
        cmd = [sys.executable, "-m", "eqcompiler.analysis.bench", "--worker", str(model), str(prefill), str(past),
               str(warmup), str(runs), str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")  # the child's CLI line
            raise EqcError(f"benchmark of '{model}' failed: {last}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def table(results: list[dict[str, Any]]) -> list[str]:
    """A plain-text table, the first model as the reference for the x-ratios."""
    ref = results[0]
    lines = [f"{'model':<34} {'size MB':>8} {'prefill ms':>11} {'x':>5} {'tok/s':>7} {'decode ms':>10} {'x':>5} "
             f"{'tok/s':>6} {'peak MB':>8} {'KV B/tok':>9}"]
    for r in results:
        kv = r["kv_cache"]["bytes_per_token"] if r.get("kv_cache") else "-"
        lines.append(f"{pathlib.Path(r['model']).name[:34]:<34} {r['size_bytes'] / 1e6:>8.1f} "
                     f"{r['prefill']['median_ms']:>11.1f} {r['prefill']['median_ms'] / ref['prefill']['median_ms']:>5.2f} "
                     f"{r['prefill']['tokens_per_s']:>7.0f} {r['decode']['median_ms']:>10.2f} "
                     f"{r['decode']['median_ms'] / ref['decode']['median_ms']:>5.2f} {r['decode']['tokens_per_s']:>6.1f} "
                     f"{r['peak_rss_mb']:>8.0f} {kv:>9}")
    first = results[0]
    lines.append(f"prefill {first['prefill']['tokens']} tokens; decode 1 token with {first['decode']['past']} cached; "
                 f"{first['prefill']['warmup']} warm-up + {first['prefill']['runs']} timed runs, median (x = vs first model); "
                 f"{first['threads']} threads; ORT {first['ort_version']}")
    return lines


def _worker(argv: list[str]) -> None:
    model, prefill, past, warmup, runs, threads = argv
    try:
        result = measure(model, int(prefill), int(past), int(warmup), int(runs), int(threads))
    except EqcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        sys.exit("usage: python -m eqcompiler.analysis.bench --worker MODEL PREFILL PAST WARMUP RUNS THREADS")
