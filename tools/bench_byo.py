"""Bring your own ONNX (issue 20): eqc on graphs other tools wrote, through the README's commands.

    .venv/bin/python tools/bench_byo.py [--work /tmp/eqc-byo] [--builder-fp32 DIR] [--max-tokens 8192]

1. SmolLM2-135M as onnxruntime-genai's model builder writes it in fp32 (GroupQueryAttention, fused norms,
   packed QKV; built here unless --builder-fp32 names a folder): `eqc compile` w8 and w8a8-dynamic
   (`eqc calibrate --for w8a8-dynamic` first), perplexity through `eqc eval` on WikiText-2 test against the
   builder graph's own. Targets: w8 within +0.5%, w8a8-dynamic within +1%.
2. all-MiniLM-L6-v2 from a default torch.onnx export (TorchScript, opset 17, as a user's script writes it):
   w8, w8a8 and w8a8-dynamic, mean embedding cosine against the float graph (`eqc eval --embed-ref`).
   Target: w8 mean cosine >= 0.99.
Writes tools/results/byo.md and byo.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
EQC = pathlib.Path(sys.executable).parent / "eqc"
WIKI = REPO / "eqcompiler" / "datasets" / "wikitext-2"
RESULTS = REPO / "tools" / "results"
sys.path.insert(0, str(REPO / "tools"))


def eqc(*args: Any) -> dict[str, Any]:
    """Run the CLI; returns its --json output (or {} for commands printed as text) and the seconds it took."""
    cmd = [str(EQC), *map(str, args)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eqc {' '.join(cmd[1:])} failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")
    out = json.loads(proc.stdout) if "--json" in args else {}
    return {**out, "wall_seconds": round(time.perf_counter() - start, 1), "command": "eqc " + " ".join(cmd[1:])}


def builder_part(work: pathlib.Path, given: str | None, max_tokens: int) -> dict[str, Any]:
    import bench_vs_genai

    src = pathlib.Path(given) if given else work / "builder-fp32"
    if not given:
        bench_vs_genai.build_builder_models(work)  # int4 too: the builder's own call, as the vs-genai bench makes it
    model = src / "model.onnx"
    ppl = lambda folder: eqc("eval", folder, "--ppl", WIKI / "test.txt", "--max-tokens", max_tokens,  # noqa: E731
                             "--no-latency", "--json")
    rows = {"builder fp32 (as written)": ppl(model)}
    stats = work / "builder-calib.npz"
    eqc("calibrate", model, "--data", WIKI / "valid.txt", "--samples", 16, "--for", "w8a8-dynamic", "-o", stats,
        "--overwrite")
    for recipe in ("w8", "w8a8-dynamic"):
        out = work / f"builder-{recipe}"
        extra = ["--calib", stats] if recipe != "w8" else []
        compiled = eqc("compile", model, "--recipe", recipe, *extra, "-o", out, "--overwrite", "--json")
        rows[f"eqc {recipe}"] = {**ppl(out), "compile": compiled["command"], "report_keys": sorted(compiled["report"])}
        if "smooth_quant" in compiled["report"]:
            sq = compiled["report"]["smooth_quant"]
            rows[f"eqc {recipe}"]["smoothed_sites"] = len(sq.get("sites", {}))
            rows[f"eqc {recipe}"]["unsmoothed_sites"] = len(sq.get("skipped", {}))
    return rows


def export_minilm(out: pathlib.Path) -> None:
    import torch

    from eqcompiler.models.loaders import load_source

    loaded = load_source("all-minilm-l6-v2")
    model = loaded.model.eval()

    class Wrapper(torch.nn.Module):  # positional tensors in, hidden states out: a user's export script
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    enc = loaded.tokenizer(["hello world", "a longer sentence here"], padding=True, return_tensors="pt")
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Wrapper(), tuple(enc[k] for k in names), str(out / "model.onnx"), input_names=names,
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={k: {0: "batch", 1: "seq"} for k in [*names, "last_hidden_state"]})
    loaded.tokenizer.save_pretrained(str(out))


def minilm_part(work: pathlib.Path) -> dict[str, Any]:
    src = work / "minilm-torch-onnx"
    shutil.rmtree(src, ignore_errors=True)
    export_minilm(src)
    model = src / "model.onnx"
    stats = work / "minilm-calib.npz"
    eqc("calibrate", model, "--data", WIKI / "valid.txt", "--samples", 32, "--seq-len", 128, "-o", stats, "--overwrite")
    rows = {}
    for recipe in ("w8", "w8a8", "w8a8-dynamic"):
        out = work / f"minilm-{recipe}"
        extra = ["--calib", stats] if recipe != "w8" else []
        compiled = eqc("compile", model, "--recipe", recipe, *extra, "-o", out, "--overwrite", "--json")
        scored = eqc("eval", out, "--embed-ref", model, "--json")
        rows[f"eqc {recipe}"] = {"mean_cosine": scored["embedding"]["mean_cosine"], "embedding": scored["embedding"],
                                 "compile": compiled["command"]}
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Bring your own ONNX: eqc on graphs other tools wrote (tools/bench_byo.py)", "",
             f"`{result['command']}` on {result['date']}; WikiText-2 test, first {result['max_tokens']} tokens, "
             "512-token windows; 2-core machine.", "",
             "## SmolLM2-135M, onnxruntime-genai builder fp32 graph", "",
             "| model | ppl | vs the builder graph | command |", "|---|---:|---:|---|"]
    rows = result["builder"]
    ref = rows["builder fp32 (as written)"]["ppl"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['ppl']:.3f} | {100 * (row['ppl'] / ref - 1):+.2f}% | "
                     f"`{row.get('compile', row['command'])}` |")
    w8, dyn = (100 * (rows[f'eqc {r}']['ppl'] / ref - 1) for r in ("w8", "w8a8-dynamic"))
    lines += ["", f"- {'met' if w8 <= 0.5 else 'MISSED'}: w8 within +0.5% ({w8:+.2f}%)",
              f"- {'met' if dyn <= 1.0 else 'MISSED'}: w8a8-dynamic within +1% ({dyn:+.2f}%); SmoothQuant sites "
              f"smoothed {rows['eqc w8a8-dynamic'].get('smoothed_sites')}, not smoothed "
              f"{rows['eqc w8a8-dynamic'].get('unsmoothed_sites')}", "",
              "## all-MiniLM-L6-v2, default torch.onnx export (TorchScript, opset 17)", "",
              "| model | mean cosine vs the float graph | command |", "|---|---:|---|"]
    for name, row in result["minilm"].items():
        lines.append(f"| {name} | {row['mean_cosine']:.4f} | `{row['compile']}` |")
    cos = result["minilm"]["eqc w8"]["mean_cosine"]
    lines += ["", f"- {'met' if cos >= 0.99 else 'MISSED'}: w8 mean cosine >= 0.99 ({cos:.4f})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/eqc-byo")
    parser.add_argument("--builder-fp32", default=None, help="a builder fp32 folder to use instead of building one")
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": "tools/bench_byo.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "max_tokens": args.max_tokens, "builder": builder_part(work, args.builder_fp32, args.max_tokens),
              "minilm": minilm_part(work)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "byo.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "byo.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
