"""Decode-step speed of the ort-cpu attention fusion per model family (random weights, fp32, `--recipe none`).

Usage (from the repo root; the op library built, e.g. EQC_OPS_LIB=eqcompiler/libeqc_ops.so):
    python tools/bench_fusions.py --work /tmp/bench-fusions [--before-pythonpath DIR] [--runs 20] [--rounds 3]

For each family a random-weight model at a small but realistic shape (hidden 256, 4 layers, 4 query heads of
head_dim 64, 2 kv heads, MLP 1024, a 512-word vocabulary from the shipped WikiText; gemma's sliding window
256, so the 512-token cache exercises it) is exported, then compiled with `--recipe none --target ort-cpu`:
the fusions and the packed projections, float arithmetic unchanged. `eqc bench --past 512 --threads 2` times
one decode step with 512 cached tokens (median of --runs; the lowest median of --rounds rounds, since the
machine is shared) of:
- portable: the exported fp32 graph (what ORT runs without eqc's fusions; ORT's own session fusions apply);
- before: the ort-cpu compile with eqc from --before-pythonpath (a checkout before the family's attention
  fused: its norms fused and projections packed, the attention left as exported);
- fused: the ort-cpu compile with this checkout.
It checks that the fused graph's logits match the portable graph's on a prompt and a decode step, then writes
tools/results/fusions_families.md and .json with the pass report (norms and attention blocks fused per
family) and the machine's load average before and after the timing.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
FAMILIES = ("llama", "qwen3", "phi3", "gemma2", "gemma3_text")
SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
PER_FAMILY = {  # 4 layers need 4 layer types; gemma scales scores by query_pre_attn_scalar ** -0.5
    "qwen3": dict(layer_types=["full_attention"] * 4),
    "gemma2": dict(sliding_window=256, query_pre_attn_scalar=64,
                   layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma3_text": dict(sliding_window=256, query_pre_attn_scalar=64,
                        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
}


def eqc(*args: object, pythonpath: str | None = None) -> str:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-m", "eqcompiler.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd="/")  # not the repo root: its eqcompiler/ folder would shadow PYTHONPATH
    if proc.returncode != 0:
        raise SystemExit(f"eqc {' '.join(map(str, args))} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def build(family: str, work: pathlib.Path, before: str | None) -> dict[str, pathlib.Path]:
    from eqcompiler.data import find_wikitext
    from eqcompiler.export.hf import export
    from eqcompiler.models.tiny import save_tiny_model

    root = work / family
    if not (root / "fp32" / "manifest.json").exists():
        hf = save_tiny_model(family, root / "hf", find_wikitext("valid").read_text()[:200_000],
                             **SHAPE, **PER_FAMILY.get(family, {}))
        export(str(hf), root / "fp32", overwrite=True)
    folders = {"portable": root / "fp32", "fused": root / "fused"}
    if before:
        folders["before"] = root / "before"
    for name in ("before", "fused"):
        if name in folders and not (folders[name] / "manifest.json").exists():
            eqc("compile", root / "fp32", "--recipe", "none", "--target", "ort-cpu", "-o", folders[name], "--overwrite",
                pythonpath=before if name == "before" else None)
    return folders


def check_logits(portable: pathlib.Path, fused: pathlib.Path) -> float:
    """max |fused - portable| / max |portable| over a 2 x 12 prompt and one decode step after it."""
    import numpy as np

    from eqcompiler.runtime.session import causal_feed, make_session

    ids = np.random.default_rng(0).integers(4, 500, (2, 13))
    worst = 0.0
    runs = []
    for folder in (portable, fused):
        session = make_session(folder / "model.onnx")
        names = [o.name for o in session.get_outputs()]
        outs = session.run(None, causal_feed(session, ids[:, :12]))
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs) if n.startswith("present.")}
        step = session.run(["logits"], causal_feed(session, ids[:, 12:], past=past, past_len=12))[0]
        runs.append((outs[0], step))
    for want, got in zip(runs[0], runs[1]):
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/eqc-bench-fusions"))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--before-pythonpath", help="PYTHONPATH of the eqc to compile the 'before' column with")
    parser.add_argument("--before-label", default="before", help="what the 'before' checkout is (for the table)")
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="eqc bench rounds per family (best median kept)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((RESULTS / "fusions_families.json").read_text())
        args.past, args.runs, args.rounds = saved["past"], saved["runs"], saved["rounds"]
        args.before_pythonpath = args.before_pythonpath or ("saved" if "before" in saved["rows"][0]["decode_ms"] else None)
        args.before_label = saved.get("before_label", args.before_label)
        write(saved["rows"], args)
        return
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    rows = []
    for family in families:
        folders = build(family, args.work, args.before_pythonpath)
        manifest = json.loads((folders["fused"] / "manifest.json").read_text())
        report = manifest["quantization"]["report"]
        err = check_logits(folders["portable"], folders["fused"])
        load_before = os.getloadavg()
        rounds = []  # the machine is shared: each round times every column once, one after the other
        for _ in range(args.rounds):
            out = eqc("bench", *folders.values(), "--past", args.past, "--prefill", 16, "--runs", args.runs,
                      "--threads", 2, "--json")
            rounds.append({name: _decode_ms(result) for name, result in zip(folders, json.loads(out)["results"])})
        load_after = os.getloadavg()
        # per column: the lowest median over the rounds (the least disturbed one), and the lowest single step
        decode = {name: {"median": min(r[name]["median"] for r in rounds), "min": min(r[name]["min"] for r in rounds)}
                  for name in folders}
        rows.append({"family": family, "decode_ms": decode, "logits_rel_err": err,
                     "attention_fused": report["fuse_group_query_attention"]["fused"],
                     "attention_unfused": report["fuse_group_query_attention"]["unfused"],
                     "skip_norms_fused": report["fuse_skip_rms_norm"]["fused"],
                     "gqa_report": report["fuse_group_query_attention"],
                     "load_1min": [round(load_before[0], 2), round(load_after[0], 2)]})
        print(json.dumps(rows[-1]), flush=True)
    write(rows, args)


def _decode_ms(result: dict) -> dict[str, float]:
    return {"median": round(result["decode"]["median_ms"], 3), "min": round(result["decode"]["min_ms"], 3)}


def write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fusions_families.json").write_text(json.dumps({"past": args.past, "runs": args.runs,
                                                              "rounds": args.rounds, "threads": 2,
                                                              "before_label": args.before_label,
                                                              "shape": SHAPE, "rows": rows}, indent=2) + "\n")
    cols = ["portable"] + (["before"] if args.before_pythonpath else []) + ["fused"]
    head = {"portable": "portable fp32", "before": f"ort-cpu {args.before_label}", "fused": "ort-cpu fused"}
    lines = ["# Attention fusion per family: decode step, fp32, random weights", "",
             f"One decode step with {args.past} cached tokens, batch 1, 2 threads (`eqc bench`, {args.runs} steps per round): the",
             f"lowest median of {args.rounds} rounds (each round times every column once), and in brackets the fastest step.",
             "Models: hidden 256, 4 layers, 4 query heads x head_dim 64, 2 kv heads, MLP 1024, vocabulary 512, random",
             "weights (gemma: sliding window 256). ort-cpu compiles use `--recipe none`: fusions and packed projections",
             "only, so every column computes the same float model (`rel err` = fused vs portable logits, prompt + decode).",
             "Written by `python tools/bench_fusions.py" + (" --before-pythonpath ..." if args.before_pythonpath else "")
             + f" --runs {args.runs} --rounds {args.rounds}`; load = 1-minute load average before / after each family's",
             "timing, on a 2-core machine shared with other jobs: the figures are noisy, compare columns within a row."]
    if args.before_pythonpath and "llama" in [row["family"] for row in rows]:
        lines += ["llama is the control: its attention fused before too, so its 'before' and 'fused' columns run the same",
                  "graph and their difference is the noise of the run."]
    lines += ["",
             "| family | " + " | ".join(f"{head[c]} ms" for c in cols) + " | fused / portable | attention fused | "
             "Skip norms fused | fused parts | rel err | load |",
             "|---|" + "---:|" * (len(cols) + 1) + "---:|---:|---|---:|---|"]
    for row in rows:
        d = row["decode_ms"]
        parts = ", ".join(f"{k} {row['gqa_report'][k]}" for k in ("head_norms", "softcapped", "partial_rotary")
                          if k in row["gqa_report"]) or "-"
        lines.append(f"| {row['family']} | " + " | ".join(f"{d[c]['median']:.2f} ({d[c]['min']:.2f})" for c in cols)
                     + f" | {d['fused']['median'] / d['portable']['median']:.2f}x | {row['attention_fused']} of "
                     f"{row['attention_fused'] + row['attention_unfused']} | {row['skip_norms_fused']} | {parts} | "
                     f"{row['logits_rel_err']:.1e} | {row['load_1min'][0]} / {row['load_1min'][1]} |")
    (RESULTS / "fusions_families.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
