"""Perplexity budgets (recipe `mixed --budget ppl+X%`) on a real model, in one run.

For each X the plan is chosen exactly as `eqc compile --recipe mixed --budget ppl+X%` chooses it
(apply_precision_plan's search on held-out windows of the CALIBRATION text), but the sensitivity
table, the float reference and every probe are computed once and shared by all X. Each chosen
plan is then compiled into an artifact (`--plan` path) and scored on WikiText-2 TEST, the same
tokens as the existing table in tools/results/bitwidth_smollm2.md.

    python tools/bench_bitwidth.py --artifact /tmp/bw/smol --stats /tmp/bw/s.npz --work /tmp/bits/bench \
        --rises 3,2,1 --test-tokens 4096

Writes tools/results/bitwidth_<name>.json and the "Perplexity budgets" section of
tools/results/bitwidth_<name>.md (the rest of that file is kept).

With --sensitivity kl the table is the measured logits KL (eqcompiler.calibration.sensitivity; cached in
--cache), and the Spearman correlation of KL vs the Gram proxy is reported. --bits 6 --solvers
dp,entropy adds rows for plain bits budgets solved by each solver from the same table:

    python tools/bench_bitwidth.py --sensitivity kl --kl-tokens 128 --name smollm2_kl --rises 3 --bits 6 \
        --solvers dp,entropy --cache /tmp/bits2/cache --work /tmp/bits2/bench
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import numpy as np

from eqcompiler.compile import bitwidth as bw
from eqcompiler.artifact.folder import load_ir, model_file, resolve_artifact, size_bytes
from eqcompiler.data import find_wikitext
from eqcompiler.analysis.evaluate import perplexity
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.calibration import precision_search
from eqcompiler.passes.apply_precision_plan import ApplyPrecisionPlanPass
from eqcompiler.passes.gptq import weight_only_sites
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.calibration.stats import CalibrationStats

HERE = pathlib.Path(__file__).resolve().parent
BEGIN, END = "<!-- bench_bitwidth:begin -->", "<!-- bench_bitwidth:end -->"
TEST = str(find_wikitext("test"))


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda x: np.argsort(np.argsort(np.asarray(x))).astype(np.float64)  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def kl_vs_proxy(kl: list[bw.Layer], proxy: list[bw.Layer]) -> dict[str, Any]:
    """Spearman of measured KL vs the Gram proxy: joint over (layer, quantized precision) and per precision."""
    out: dict[str, Any] = {}
    quantized = [c for c in kl[0].choices if c != "float"]
    pairs = {c: ([l.error[l.choices.index(c)] for l in kl], [l.error[l.choices.index(c)] for l in proxy]) for c in quantized}
    out["joint"] = spearman(sum((pairs[c][0] for c in quantized), []), sum((pairs[c][1] for c in quantized), []))
    for c in quantized:
        out[c] = spearman(*pairs[c])
    top = sorted(kl, key=lambda l: -l.error[l.choices.index("int4-g128")])[:10]
    out["top_kl_int4_g128"] = [[l.name, l.error[l.choices.index("int4-g128")]] for l in top]
    return out


def choose_plans(artifact: pathlib.Path, stats_path: str, rises: list[float], windows: int,
                 steps: int, sensitivity: str = "proxy", cache: str | None = None,
                 solver: str = "dp", kl_tokens: int | None = None) -> tuple[dict[float, dict[str, Any]], dict[str, Any], list[bw.Layer]]:
    """The plan apply_precision_plan would pick for each ppl+X%, with probes shared between bounds."""
    stats = CalibrationStats.load(stats_path)
    if cache is not None and str(cache).lower() != "none":  # the user's --cache flag
        from eqcompiler.calibration.sensitivity import grant_cache_folder

        grant_cache_folder(pathlib.Path(cache) if pathlib.Path(cache).is_dir() or not pathlib.Path(cache).suffix
                           else pathlib.Path(cache).parent)
    model = load_ir(model_file(resolve_artifact(artifact)))
    p = ApplyPrecisionPlanPass(CompileContext(stats=stats, source_folder=str(artifact)), ppl_windows=windows,
                               sensitivity_cache=cache, kl_tokens=kl_tokens)
    start = time.perf_counter()
    groups = weight_only_sites(model.graph, None, None)
    table = [p._sensitivity(g[0].name, g) for g in groups]
    sens_s = time.perf_counter() - start
    extra: dict[str, Any] = {"sensitivity": sensitivity, "solver": solver}
    if sensitivity == "kl":
        start = time.perf_counter()
        kl, kl_info = precision_search.kl_table(model, {g[0].name: g for g in groups}, bw.DEFAULT_CHOICES, p)
        extra["kl"] = {**kl_info, "load_or_measure_s": round(time.perf_counter() - start, 1)}
        extra["spearman_kl_vs_proxy"] = kl_vs_proxy(kl, table)
        print(json.dumps(extra), flush=True)
        table = kl
    ids, window, text = precision_search.heldout_tokens(p)
    start = time.perf_counter()
    ref = precision_search.score(model, None, ids, window, p)
    ref_s = time.perf_counter() - start
    memo: dict[tuple, float] = {}
    timing = {"probes": 0, "seconds": 0.0}

    def score(plan: dict[str, Any]) -> float:
        key = tuple(sorted(plan["layers"].items()))
        if key not in memo:
            t = time.perf_counter()
            memo[key] = precision_search.score(model, plan, ids, window, p)
            timing["probes"] += 1
            timing["seconds"] += time.perf_counter() - t
            print(f"  probe {8 * plan['estimated']['linear_bytes'] / sum(l.params for l in table):.3f} bits: "
                  f"ppl {memo[key]:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        return memo[key]

    plans = {}
    for rise in rises:
        budget = bw.parse_budget(f"ppl+{rise:g}%")
        bound = ref * (1 + rise / 100)
        plan, probes = bw.search_ppl(table, budget, bound, score, solver, steps)
        plan["search"] = {"budget": budget.text, "ref_ppl": ref, "bound": bound, "probes": probes, "text": text,
                          "tokens": int(len(ids) - len(ids) // window), "window": window,
                          "windows": len(ids) // window}
        plans[rise] = plan
        print(f"ppl+{rise:g}%: {plan['estimated']['average_bits']:.3f} bits, valid ppl {chosen_ppl(plan):.4f}", flush=True)
    return plans, {"sensitivity_s": round(sens_s, 1), "reference_s": round(ref_s, 1),
                   "valid_ref_ppl": ref, "distinct_probes": timing["probes"], "calib_windows": stats.meta["data"]["samples"],
                   "seconds_per_probe": round(timing["seconds"] / max(timing["probes"], 1), 1), **extra}, table


def chosen_ppl(plan: dict[str, Any]) -> float:
    """The measured (held-out calibration) perplexity of the plan the search returned."""
    return next(q["ppl"] for q in plan["search"]["probes"]
                if q.get("ok") and q["linear_bytes"] == plan["estimated"]["linear_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default="/tmp/bw/smol")
    ap.add_argument("--stats", default="/tmp/bw/s.npz")
    ap.add_argument("--work", default="/tmp/bits/bench")
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--rises", default="3,2,1")
    ap.add_argument("--ppl-windows", type=int, default=bw.PPL_WINDOWS)
    ap.add_argument("--steps", type=int, default=bw.PPL_STEPS)
    ap.add_argument("--test-tokens", type=int, default=4096)
    ap.add_argument("--test-window", type=int, default=512)
    ap.add_argument("--fp32-test-ppl", type=float, default=None, help="Skip re-measuring the float model on test.")
    ap.add_argument("--sensitivity", choices=bw.SENSITIVITIES, default="proxy")
    ap.add_argument("--cache", default=None, help="KL sensitivity cache file or folder (default: the user cache).")
    ap.add_argument("--solver", default="dp", help="Solver of the ppl+X%% search.")
    ap.add_argument("--kl-tokens", type=int, default=None, help="Tokens per KL window (default: the pass's, 256).")
    ap.add_argument("--bits", default="", help="Also plain bits budgets (e.g. 6), solved by each of --solvers.")
    ap.add_argument("--solvers", default="dp")
    args = ap.parse_args()
    artifact, work = pathlib.Path(args.artifact), pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rises = [float(r) for r in args.rises.split(",")]
    start = time.perf_counter()
    plans, cost, table = choose_plans(artifact, args.stats, rises, args.ppl_windows, args.steps, args.sensitivity,
                                      args.cache, args.solver, args.kl_tokens)
    fp32_bytes = size_bytes(artifact)
    fp32_ppl = args.fp32_test_ppl or perplexity(artifact, TEST, max_tokens=args.test_tokens,
                                                     window=args.test_window)["ppl"]
    rows = []
    for rise, plan in plans.items():
        out = work / f"ppl{rise:g}"
        bw.save_plan(work / f"plan_ppl{rise:g}.json", plan)
        compile_model(artifact, "mixed", out, calib=args.stats, overwrite=True, pass_overrides={"plan": plan})
        test = perplexity(out, TEST, max_tokens=args.test_tokens, window=args.test_window)
        search = plan["search"]
        valid = chosen_ppl(plan)
        rows.append({"budget": f"ppl+{rise:g}% ({args.sensitivity}, {args.solver})", "size_bytes": size_bytes(out), "plan_probes": len(search["probes"]),
                     "average_bits": plan["estimated"]["average_bits"], "counts": plan["estimated"]["counts"],
                     "valid_ppl": valid, "valid_ref_ppl": search["ref_ppl"], "valid_rise_pct": 100 * (valid / search["ref_ppl"] - 1),
                     "test_ppl": test["ppl"], "test_tokens": test["tokens"], "test_rise_pct": 100 * (test["ppl"] / fp32_ppl - 1),
                     "vs_fp32": fp32_bytes / size_bytes(out), "vs_fp16": fp32_bytes / 2 / size_bytes(out),
                     "probes": search["probes"]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "probes"}), flush=True)
    for bits in [b for b in args.bits.split(",") if b]:
        for solver in args.solvers.split(","):
            plan = bw.make_plan(table, bw.parse_budget(f"{bits}bits"), solver)
            out = work / f"b{bits}-{solver}"
            bw.save_plan(work / f"plan_b{bits}_{solver}.json", plan)
            compile_model(artifact, "mixed", out, calib=args.stats, overwrite=True, pass_overrides={"plan": plan})
            test = perplexity(out, TEST, max_tokens=args.test_tokens, window=args.test_window)
            rows.append({"budget": f"{bits}bits ({args.sensitivity}, {solver})", "size_bytes": size_bytes(out),
                         "average_bits": plan["estimated"]["average_bits"], "counts": plan["estimated"]["counts"],
                         "valid_ppl": None, "test_ppl": test["ppl"], "test_tokens": test["tokens"],
                         "test_rise_pct": 100 * (test["ppl"] / fp32_ppl - 1), "vs_fp32": fp32_bytes / size_bytes(out),
                         "vs_fp16": fp32_bytes / 2 / size_bytes(out)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"artifact": str(artifact), "stats": args.stats, "fp32_bytes": fp32_bytes, "fp32_test_ppl": fp32_ppl,
              "ppl_windows": args.ppl_windows, "steps": args.steps, "cost": cost, "rows": rows,
              "window": plans[rises[0]]["search"]["window"],
              "calib_windows": cost["calib_windows"],
              "seconds": round(time.perf_counter() - start, 1)}
    (HERE / "results" / f"bitwidth_{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_md(HERE / "results" / f"bitwidth_{args.name}.md", result, args)


def _extra_flags(args: argparse.Namespace) -> str:
    """The non-default flags of this run, for the command line quoted in the results file."""
    flags = [("--sensitivity", args.sensitivity, "proxy"), ("--kl-tokens", args.kl_tokens, None),
             ("--cache", args.cache, None), ("--solver", args.solver, "dp"), ("--bits", args.bits, ""),
             ("--solvers", args.solvers, "dp"), ("--name", args.name, "smollm2"), ("--work", args.work, "/tmp/bits/bench")]
    return "".join(f" {flag} {value}" for flag, value, default in flags if value != default)


def write_md(path: pathlib.Path, r: dict[str, Any], args: argparse.Namespace) -> None:
    lines = [BEGIN, "## Perplexity budgets (`--budget ppl+X%`)", "",
             f"    python tools/bench_bitwidth.py --artifact {args.artifact} --stats {args.stats} --rises {args.rises} "
             f"--test-tokens {args.test_tokens}" + _extra_flags(args) + f"   # {r['seconds'] / 60:.0f} min on a shared 2-core CPU", "",
             f"The bound is checked on {args.ppl_windows} held-out windows of the calibration text (WikiText-2 valid: "
             f"the {args.ppl_windows} x {r['window']} tokens right after the {r['calib_windows']} calibrated windows); the "
             f"float model scores {r['cost']['valid_ref_ppl']:.3f} there. Test perplexity: WikiText-2 test, "
             f"{r['rows'][0]['test_tokens']} tokens, fp32 {r['fp32_test_ppl']:.3f}. fp16 size = half of fp32 "
             f"({r['fp32_bytes'] / 2e6:.1f} MB).", "",
             "| budget | size (MB) | vs fp32 | vs fp16 | avg bits | int4-g128 / int4-g64 / int8 / float | valid ppl (rise) | test ppl (rise vs fp32) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        c = row["counts"]
        valid = "-" if row["valid_ppl"] is None else f"{row['valid_ppl']:.3f} ({row['valid_rise_pct']:+.2f}%)"
        lines.append(f"| {row['budget']} | {row['size_bytes'] / 1e6:.1f} | {row['vs_fp32']:.2f}x smaller | "
                     f"{row['vs_fp16']:.2f}x smaller | {row['average_bits']:.2f} | {c['int4-g128']} / {c['int4-g64']} / "
                     f"{c['int8']} / {c['float']} | {valid} | {row['test_ppl']:.3f} ({row['test_rise_pct']:+.2f}%) |")
    over = [row["budget"] for row in r["rows"] if row["budget"].startswith("ppl")
            and row["test_rise_pct"] > float(row["budget"][4:].split("%")[0])]
    lines += ["", (f"Test-set rise above the budget for: {', '.join(over)} (the bound holds on the held-out "
                   "calibration windows it was searched on, not on the test set)." if over else
                   "Every plan's test-set rise is within its budget too.")]
    lines += ["", f"Cost: sensitivity table {r['cost']['sensitivity_s']} s, float reference {r['cost']['reference_s']} s, "
                  f"{r['cost']['distinct_probes']} distinct probes at ~{r['cost']['seconds_per_probe']} s each "
                  "(probes are shared across the budgets here; one `eqc compile --budget ppl+X%` runs at most "
                  f"{4 + args.steps} probes plus the float reference). Raw rows and probes: bitwidth_{args.name}.json."]
    if "kl" in r["cost"]:
        kl, sp = r["cost"]["kl"], r["cost"]["spearman_kl_vs_proxy"]
        lines += ["", f"Sensitivity: measured logits KL, {kl['windows']} held-out window(s) x {kl['tokens']} tokens, "
                      f"{kl['probes']} ORT probes in {kl['measure_seconds']} s when measured (cache {kl['cache']}; "
                      f"{'re-used' if kl['cached'] else 'measured'} in this run). Spearman(KL, Gram proxy): joint "
                      f"{sp['joint']:.3f}, " + ", ".join(f"{c} {v:.3f}" for c, v in sp.items()
                                                         if c not in ("joint", "top_kl_int4_g128")) + ".",
                  "Highest KL at int4-g128: " + ", ".join(f"{n} {v:.2e}" for n, v in sp["top_kl_int4_g128"]) + "."]
    lines.append(END)
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old:
        head, rest = old.split(BEGIN, 1)
        old = head + rest.split(END, 1)[1].lstrip("\n")
    path.write_text(old.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
