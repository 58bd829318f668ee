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
- encoders (and causal LMs without a cache): one forward per batch size x sequence length (`batch_sizes`,
  `seq_lens`), random token ids and a full attention mask: ms per batch, sequences/s and tokens/s.
- generic graphs: one forward of the first `--data` sample (or of zeros shaped like the inputs, symbolic
  dimensions 1 ... not 0), ms per run.
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
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "uint4x2": 0.5, "int4x2": 0.5}.get(kv.get("dtype"), 4)
        per_token = int(2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * itemsize)
    bits = (kv.get("quantized") or {}).get("bits") or {"float32": 32, "float16": 16}.get(kv.get("dtype"), None)
    return {"dtype": kv.get("dtype"), "bits": bits, "bytes_per_token": per_token}


def _common(art: art_mod.Artifact, model: str | pathlib.Path, threads: int, base: float) -> dict[str, Any]:
    import onnxruntime as ort

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": str(model), "size_bytes": art_mod.size_bytes(art_mod.model_file(art)),
            "recipe": (art.manifest.get("quantization") or {}).get("recipe", "none"), "kind": art.task,
            "target": art.manifest.get("target", "portable"), "peak_rss_mb": round(peak - base, 1),
            "threads": threads, "ort_version": ort.__version__}


def measure_forward(model: str | pathlib.Path, batch_sizes: list[int], seq_lens: list[int], warmup: int = 2,
                    runs: int = 10, threads: int = 2, data: str | None = None) -> dict[str, Any]:
    """An encoder's (or cache-less causal LM's) forward per batch size x sequence length; a generic graph's
    forward on one sample."""
    from eqcompiler.analysis.output_error import sample_feed
    from eqcompiler.runtime.session import causal_feed, make_session

    art = art_mod.resolve_artifact(model)
    base = _rss_mb()
    session = make_session(art_mod.model_file(art), threads=threads)
    grid = []
    if art.task == "generic":
        feed = sample_feed(session, art_mod.model_file(art), data)
        result = timed(lambda: session.run(None, feed), warmup, runs)
        grid.append({**result, "batch": None, "seq_len": None, "per_s": 1000 / result["median_ms"]})
    rng = np.random.default_rng(0)
    for batch in (batch_sizes if art.task != "generic" else []):
        for seq in seq_lens:
            ids = rng.integers(3, 100, size=(batch, seq), dtype=np.int64)
            feed = (causal_feed(session, ids) if art.task == "causal-lm-nocache" else
                    {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
            result = timed(lambda: session.run(None, feed), warmup, runs)
            grid.append({**result, "batch": batch, "seq_len": seq, "per_s": batch * 1000 / result["median_ms"],
                         "tokens_per_s": batch * seq * 1000 / result["median_ms"]})
    return {**_common(art, model, threads, base), "forward": grid, "kv_cache": None}


def measure(model: str | pathlib.Path, prefill: int = 512, past: int = 512, warmup: int = 2, runs: int = 10,
            threads: int = 2, batch_sizes: list[int] | None = None, seq_lens: list[int] | None = None,
            data: str | None = None) -> dict[str, Any]:
    """All figures for one model, in this process (the CLI calls this through a worker subprocess)."""
    from eqcompiler.runtime.decode import CacheRunner
    from eqcompiler.runtime.session import make_session

    art = art_mod.resolve_artifact(model)
    if art.task != "causal-lm":
        return measure_forward(model, batch_sizes or [1], seq_lens or [prefill], warmup, runs, threads, data)
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
    return {**_common(art, model, threads, base), "prefill": pre, "decode": dec,
            "kv_cache": kv_bytes_per_token(art.manifest)}


def bench(models: list[str], prefill: int = 512, past: int = 512, warmup: int = 2, runs: int = 10,
          threads: int = 2, batch_sizes: list[int] | None = None, seq_lens: list[int] | None = None,
          data: str | None = None, kind: str | None = None, input_map: str | None = None) -> list[dict[str, Any]]:
    """Measure each model in its own subprocess, one after the other (never concurrently)."""
    from eqcompiler.artifact.model_kind import choose

    results = []
    for model in models:
        art = art_mod.resolve_artifact(model)  # fail early, with the usual message
        choose(art_mod.model_file(art), art.manifest, kind, input_map)  # a bad --kind/--input-map: here, once
        config = {"model": str(model), "prefill": prefill, "past": past, "warmup": warmup, "runs": runs,
                  "threads": threads, "batch_sizes": batch_sizes, "seq_lens": seq_lens, "data": data,
                  "kind": kind, "input_map": input_map}
        cmd = [sys.executable, "-m", "eqcompiler.analysis.bench", "--worker", json.dumps(config)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")  # the child's CLI line
            raise EqcError(f"benchmark of '{model}' failed: {last}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def table(results: list[dict[str, Any]]) -> list[str]:
    """Plain-text tables: causal LMs with a cache (prefill/decode), then the others (forward per shape)."""
    causal = [r for r in results if "decode" in r]
    forward = [r for r in results if "forward" in r]
    return (_causal_table(causal) if causal else []) + (_forward_table(forward) if forward else [])


def _forward_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per model and shape; x = vs the first model's same shape."""
    ref = {(g["batch"], g["seq_len"]): g["median_ms"] for g in results[0]["forward"]}
    lines = [f"{'model':<34} {'kind':<17} {'size MB':>8} {'batch':>5} {'seq':>5} {'ms':>9} {'x':>5} {'seq/s':>8} "
             f"{'tok/s':>9} {'peak MB':>8}"]
    for r in results:
        for g in r["forward"]:
            base = ref.get((g["batch"], g["seq_len"]))
            x = f"{g['median_ms'] / base:>5.2f}" if base else f"{'-':>5}"
            tok = f"{g['tokens_per_s']:>9.0f}" if g.get("tokens_per_s") else f"{'-':>9}"
            lines.append(f"{pathlib.Path(r['model']).name[:34]:<34} {r['kind']:<17} {r['size_bytes'] / 1e6:>8.1f} "
                         f"{g['batch'] or '-':>5} {g['seq_len'] or '-':>5} {g['median_ms']:>9.2f} {x} "
                         f"{g['per_s']:>8.1f} {tok} {r['peak_rss_mb']:>8.0f}")
    first = results[0]["forward"][0]
    lines.append(f"one forward per shape (generic graphs: one sample, seq/s = runs/s); {first['warmup']} warm-up + "
                 f"{first['runs']} timed runs, median; {results[0]['threads']} threads; ORT {results[0]['ort_version']}")
    return lines


def _causal_table(results: list[dict[str, Any]]) -> list[str]:
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


def _worker(config_json: str) -> None:
    from eqcompiler.artifact.model_kind import choose

    c = json.loads(config_json)
    try:
        art = art_mod.resolve_artifact(c["model"])
        choose(art_mod.model_file(art), art.manifest, c["kind"], c["input_map"])
        result = measure(c["model"], c["prefill"], c["past"], c["warmup"], c["runs"], c["threads"],
                         c["batch_sizes"], c["seq_lens"], c["data"])
    except EqcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: python -m eqcompiler.analysis.bench --worker CONFIG_JSON")
