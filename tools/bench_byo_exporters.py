"""Bring your own ONNX (issue 20): SmolLM2-135M as Optimum and torch.onnx's dynamo exporter write it, through eqc,
against `eqc export` of the same weights.

    .venv/bin/python tools/bench_byo_exporters.py [--work /tmp/eqc-byo-exporters] [--eqc-fp32 DIR] [--max-tokens 2048]

Sources: the HF folder eqc converts SmolLM2's GGUF into (user cache, made by `eqc export smollm2`):
1. `optimum-cli export onnx --task text-generation-with-past` from .venv-optimum (`make optimum-env`);
2. `torch.onnx.export(..., dynamo=True)` of the model without its cache (input_ids, attention_mask -> logits);
3. `eqc export smollm2` (or --eqc-fp32, e.g. demo_out/fp32).
Each: WikiText-2 test perplexity of the float graph, of `eqc compile --recipe w8` and of w8a8-dynamic
(`eqc calibrate --for w8a8-dynamic`, 8 windows of 512 valid tokens). Writes tools/results/byo_exporters.md / .json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import warnings
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
WIKI = REPO / "eqcompiler" / "datasets" / "wikitext-2"
RESULTS = REPO / "tools" / "results"
OPTIMUM_CLI = REPO / ".venv-optimum" / "bin" / "optimum-cli"
sys.path.insert(0, str(REPO / "tools"))
from bench_byo import eqc  # noqa: E402  (the CLI as a user runs it, with the command recorded)


def smollm2_hf() -> pathlib.Path:
    """The HF folder `eqc export smollm2` converted the shipped GGUF into (converted here if it is not yet)."""
    from eqcompiler.artifact.user_cache import cache_root
    from eqcompiler.models.gguf_cache import DONE_MARKER, cache_key
    from eqcompiler.models.loaders import ALIASES, load_source, package_dir

    info = ALIASES["smollm2"]
    folder = cache_root() / "gguf" / cache_key(package_dir(info["package"]) / info["gguf_file"], info["special_tokens"])
    if not (folder / DONE_MARKER).is_file():
        load_source("smollm2")  # converts the GGUF into that folder once
    return folder


def transformers4_folder(hf: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The folder as Optimum's transformers 4.57 reads it: rope_theta lifted out of 5.x's rope_parameters (4.57
    ignores that key and would use base 10000 instead of SmolLM2's 100000) and a tokenizer class it can load (5.x
    names it TokenizersBackend: Optimum would copy no tokenizer). tests/test_optimum_exports.py uses it too."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in hf.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json") and not f.name.startswith("."):
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((hf / "config.json").read_text())
    if "rope_theta" in (config.get("rope_parameters") or {}):
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((hf / "tokenizer_config.json").read_text())
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    return out


def optimum_export(hf: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    if not OPTIMUM_CLI.is_file():
        raise SystemExit(f"{OPTIMUM_CLI} is missing: run `make optimum-env` first")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(OPTIMUM_CLI), "export", "onnx", "-m", str(hf), "--task", "text-generation-with-past", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"optimum-cli failed: {proc.stderr[-1500:]}")
    return out / "model.onnx"


def dynamo_export(hf: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(5, 1000, (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), (ids, torch.ones_like(ids)), str(out / "model.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamo=True,
                          dynamic_shapes={n: {0: batch, 1: seq} for n in ("input_ids", "attention_mask")})
    return out / "model.onnx"


def score(name: str, model: pathlib.Path, work: pathlib.Path, hf: pathlib.Path | None, max_tokens: int) -> dict[str, Any]:
    """fp32, w8 and w8a8-dynamic perplexity of one source graph (tokenizer from the HF folder for bare graphs)."""
    tok = ["--tokenizer", hf] if hf else []
    ppl = lambda m, *extra: eqc("eval", m, "--ppl", WIKI / "test.txt", "--max-tokens", max_tokens,  # noqa: E731
                                "--no-latency", "--json", *extra)
    rows = {"fp32": ppl(model, *tok)}
    stats = work / f"{name}-calib.npz"
    eqc("calibrate", model, "--data", WIKI / "valid.txt", "--samples", 8, "--for", "w8a8-dynamic", "-o", stats,
        "--overwrite", *tok)
    for recipe in ("w8", "w8a8-dynamic"):
        out = work / f"{name}-{recipe}"
        compiled = eqc("compile", model, "--recipe", recipe, "--calib", stats, "-o", out, "--overwrite", "--json")
        rows[recipe] = {**ppl(out), "compile": compiled["command"]}
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Bring your own ONNX: SmolLM2-135M from Optimum and torch.onnx dynamo (tools/bench_byo_exporters.py)", "",
             f"`{result['command']}` on {result['date']} ({result['load']}); WikiText-2 test, first "
             f"{result['max_tokens']} tokens, 512-token windows; optimum 2.1.0 + optimum-onnx 0.1.0 + transformers "
             "4.57.6 in .venv-optimum, torch 2.13 / ORT 1.32 in .venv.", "",
             "| source graph | fp32 ppl | w8 | w8a8-dynamic | fp32 vs eqc export |", "|---|---:|---:|---:|---:|"]
    ref = result["sources"]["eqc export"]["fp32"]["ppl"]
    for name, rows in result["sources"].items():
        f = rows["fp32"]["ppl"]
        cells = [f"{rows[r]['ppl']:.3f} ({100 * (rows[r]['ppl'] / f - 1):+.2f}%)" for r in ("w8", "w8a8-dynamic")]
        lines.append(f"| {name} | {f:.3f} | {cells[0]} | {cells[1]} | {100 * (f / ref - 1):+.4f}% |")
    lines += ["", "Commands (per source):", ""]
    for name, rows in result["sources"].items():
        lines += [f"- {name}: `{rows['fp32']['command']}`; `{rows['w8']['compile']}`; "
                  f"`{rows['w8a8-dynamic']['compile']}`"]
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/eqc-byo-exporters")
    parser.add_argument("--eqc-fp32", default=None, help="an `eqc export smollm2` artifact to use instead of exporting")
    parser.add_argument("--max-tokens", type=int, default=2048)
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf()
    eqc_fp32 = pathlib.Path(args.eqc_fp32) if args.eqc_fp32 else work / "eqc-fp32"
    if not args.eqc_fp32:
        eqc("export", "smollm2", "-o", eqc_fp32, "--overwrite")
    sources = {"Optimum (text-generation-with-past)": (optimum_export(transformers4_folder(hf, work / "hf-4x"),
                                                                      work / "optimum"), None),
               "torch.onnx dynamo (no cache)": (dynamo_export(hf, work / "dynamo"), hf),
               "eqc export": (eqc_fp32, None)}
    result = {"command": "tools/bench_byo_exporters.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "load": "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + " at the start, 2 cores",
              "max_tokens": args.max_tokens,
              "sources": {name: score(f"s{i}", model, work, tok, args.max_tokens)
                          for i, (name, (model, tok)) in enumerate(sources.items())}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "byo_exporters.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "byo_exporters.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
