"""GGUF input per family: the figures behind tests/test_gguf_families.py's bounds.

For each family transformers reads from GGUF (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, gpt2): a tiny
random model (tests/gguf_writer.py: test_families.py's config less what GGUF cannot carry, a byte-level BPE
vocabulary) is written as an F32 GGUF, both the HF folder and the GGUF are exported by eqc, the GGUF's artifact is
compiled w8 and w4-rtn, and each artifact is scored: max |logits - HF export| / max |HF export| on a 2x12 prompt,
WikiText-2 valid perplexity (512 tokens, 64-token windows) and its change vs the GGUF fp32 artifact. Export seconds
include the GGUF conversion (a fresh XDG_CACHE_HOME under --work).

Usage: python tools/bench_gguf_families.py [--work /tmp/bench-gguf] [--only llama,qwen3]
Writes tools/results/gguf_families.json and gguf_families.md (with the load average at start and end).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2"]
RECIPES = ["w8", "w4-rtn"]
PPL_TOKENS, PPL_WINDOW = 512, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench-gguf")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg-cache")  # conversions land here, not in the user cache
    sys.path.insert(0, str(REPO / "tests"))
    import numpy as np

    from eqcompiler.analysis.evaluate import perplexity
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.data import find_wikitext
    from eqcompiler.export.hf import export
    from eqcompiler.runtime.session import causal_feed, make_session
    from gguf_writer import save_tiny_gguf_source, write_gguf

    valid = find_wikitext("valid")
    prompt = np.random.default_rng(1).integers(4, 500, (2, 12))

    def logits(folder: pathlib.Path) -> np.ndarray:
        session = make_session(folder / "model.onnx")
        return session.run(["logits"], causal_feed(session, prompt))[0]

    def ppl(folder: pathlib.Path) -> float:
        return perplexity(folder, valid, max_tokens=PPL_TOKENS, window=PPL_WINDOW)["ppl"]

    load_start = os.getloadavg()
    rows = []
    for family in [f for f in args.only.split(",") if f] or FAMILIES:
        root = work / family
        hf = save_tiny_gguf_source(family, root / "hf", valid.read_text()[:200_000])
        gguf = write_gguf(hf, root / f"{family}.gguf")
        export(str(hf), root / "fp32-hf", overwrite=True)
        start = time.perf_counter()
        manifest = export(str(gguf), root / "fp32-gguf", overwrite=True)
        seconds = time.perf_counter() - start
        ref = logits(root / "fp32-hf")
        row = {"family": family, "loads_as": manifest["family"], "gguf_export_s": round(seconds, 1),
               "logits_vs_hf": float(np.abs(logits(root / "fp32-gguf") - ref).max() / np.abs(ref).max()),
               "ppl_fp32_hf": ppl(root / "fp32-hf"), "ppl_fp32_gguf": ppl(root / "fp32-gguf")}
        for recipe in RECIPES:
            compile_model(root / "fp32-gguf", recipe, root / recipe, overwrite=True)
            row[f"ppl_{recipe}"] = ppl(root / recipe)
            row[f"change_{recipe}"] = row[f"ppl_{recipe}"] / row["ppl_fp32_gguf"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"load_start": load_start, "load_end": os.getloadavg(), "rows": rows,
              "command": "python tools/bench_gguf_families.py" + (f" --only {args.only}" if args.only else "")}
    out = REPO / "tools" / "results"
    (out / "gguf_families.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# GGUF input per family (tiny random models)", "",
             f"`{result['command']}`; load average {load_start[0]:.2f} at start, {result['load_end'][0]:.2f} at end "
             "(2-core machine, shared).", "",
             "| family | loads as | GGUF export s | logits vs HF export | ppl fp32 HF | ppl fp32 GGUF | w8 | w4-rtn |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['loads_as']} | {r['gguf_export_s']} | {r['logits_vs_hf']:.1e} | "
                     f"{r['ppl_fp32_hf']:.2f} | {r['ppl_fp32_gguf']:.2f} | {r['ppl_w8']:.2f} ({r['change_w8']:+.2%}) | "
                     f"{r['ppl_w4-rtn']:.2f} ({r['change_w4-rtn']:+.2%}) |")
    (out / "gguf_families.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
