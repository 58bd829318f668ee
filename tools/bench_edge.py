"""eqc's --target web artifacts against ONNX Runtime's own quantizers as transformers.js ships them (issue 24).

    PYTHONPATH=... python tools/bench_edge.py --fp32 FP32_ART --w4 W4_PORTABLE_ART [--w4-g32 W4_G32_ART] [--work DIR]

Builds (into --work), from the fp32 artifact:
  eqc w8 web      eqc compile FP32 --recipe w8 --target web
  eqc w4 web      eqc compile W4 --recipe none --target web   (W4: a portable w4 artifact, e.g. w4-gptq)
  ort q8          onnxruntime.quantization.quantize_dynamic (int8 weights per tensor, MatMul + Gather; run as
                  DynamicQuantizeLinear + MatMulInteger: transformers.js's "q8")
  ort q4          onnxruntime.quantization MatMulNBitsQuantizer, 4 bits, block 32, symmetric (transformers.js's "q4")
  ort q4 g128     the same at block 128: SmolLM2's weights come from a GGUF Q4_1 file, i.e. they already lie on a
                  4-bit grid of 32-element groups, which flatters any 32-element 4-bit scheme; eqc's w4 recipes use
                  groups of 128, so this is the like-for-like row (and --w4-g32 adds eqc at block 32)
and measures, for each and fp32: the model files' size, perplexity (eqc eval, native ORT: the web artifacts fold
to the same float weights there; WikiText-2 test, --max-tokens windows of 512), greedy decode tokens/s in headless
Chromium (tools/web, onnxruntime-web WASM, one run each) and natively (eqc generate), and whether the browser's
tokens equal eqc generate's on the same artifact. Writes tools/results/edge.json and edge.md (--out; --md-only
rewrites the .md from the .json, --forms adds a bench_forms.py table).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "web"))
import serve as web  # noqa: E402

PROMPT = "The capital of France is"
CARRIED = ("manifest.json", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def eqc(*args: str, threads: int = 1) -> str:
    env = {**os.environ, "EQC_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    # cwd: not the repository root, whose eqcompiler/ folder (without passes/) would shadow the installed package
    proc = subprocess.run([sys.executable, "-c", "from eqcompiler.cli import main; main()", *map(str, args)],
                          env=env, capture_output=True, text=True, cwd="/")
    if proc.returncode:
        raise SystemExit(f"eqc {' '.join(map(str, args))}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _ort_folder(fp32: pathlib.Path, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        if (fp32 / name).is_file():
            shutil.copy(fp32 / name, out / name)


def build(fp32: pathlib.Path, w4: pathlib.Path, work: pathlib.Path, w4_g32: pathlib.Path | None = None
          ) -> dict[str, pathlib.Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    arts = {"fp32": fp32, "eqc w8 web": work / "eqc-w8-web", "eqc w4 web": work / "eqc-w4-web",
            "ort q8 (quantize_dynamic)": work / "ort-q8", "ort q4 (MatMulNBits)": work / "ort-q4",
            "ort q4 g128 (MatMulNBits)": work / "ort-q4-g128"}
    if w4_g32 is not None:
        arts["eqc w4 g32 web"] = work / "eqc-w4-g32-web"
        if not arts["eqc w4 g32 web"].exists():
            eqc("compile", w4_g32, "--recipe", "none", "--target", "web", "-o", arts["eqc w4 g32 web"])
    if not arts["eqc w8 web"].exists():
        eqc("compile", fp32, "--recipe", "w8", "--target", "web", "-o", arts["eqc w8 web"])
    if not arts["eqc w4 web"].exists():
        eqc("compile", w4, "--recipe", "none", "--target", "web", "-o", arts["eqc w4 web"])
    q8 = arts["ort q8 (quantize_dynamic)"]
    if not (q8 / "model.onnx").exists():
        _ort_folder(fp32, q8)
        quantize_dynamic(fp32 / "model.onnx", q8 / "model.onnx", op_types_to_quantize=["MatMul", "Gather"],
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    for name, block in (("ort q4 (MatMulNBits)", 32), ("ort q4 g128 (MatMulNBits)", 128)):
        q4 = arts[name]
        if not (q4 / "model.onnx").exists():
            _ort_folder(fp32, q4)
            quant = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), bits=4, block_size=block, is_symmetric=True)
            quant.process()
            quant.model.save_model_to_file(str(q4 / "model.onnx"), use_external_data_format=True)
    return arts


def files_bytes(folder: pathlib.Path) -> int:
    import onnx

    from eqcompiler.artifact.folder import external_data_locations

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return (folder / "model.onnx").stat().st_size + sum((folder / loc).stat().st_size
                                                         for loc in external_data_locations(proto))


def measure(name: str, art: pathlib.Path, wiki: pathlib.Path, max_tokens: int, threads: int, new_tokens: int,
            server) -> dict:
    row: dict = {"artifact": name, "path": str(art), "bytes": files_bytes(art)}
    ev = json.loads(eqc("eval", art, "--ppl", wiki, "--max-tokens", max_tokens, "--no-latency", "--json",
                        threads=threads))
    row["ppl"] = ev.get("ppl") or ev.get("perplexity") or ev
    gen = json.loads(eqc("generate", art, "--prompt", PROMPT, "--max-new-tokens", new_tokens, "--json", threads=threads))
    row["native_ms_per_token"] = gen.get("ms_per_token")
    srv, base = server
    key = f"a{len(srv.models)}"
    srv.models[key] = art.resolve()
    t0 = time.time()
    try:
        page = web.run_page(web.page_url(base, key, PROMPT, new_tokens, threads), timeout_s=900)
    except RuntimeError as exc:
        row["browser_error"] = str(exc)[-400:]
        return row
    row.update({"browser_tokens_per_s": page["tokens_per_s"], "browser_prefill_ms": page["prefill_ms"],
                "browser_load_ms": page["load_ms"], "browser_wall_s": time.time() - t0,
                "browser_tokens_equal_native": page["tokens"] == gen["tokens"],
                "first_differing_token": next((i for i, (a, b) in enumerate(zip(page["tokens"], gen["tokens"])) if a != b),
                                              None), "text": page["text"]})
    return row


# (eqc row, ORT row it is held against, judged): no larger, at least as many browser tokens/s, at most half the
# ppl loss vs fp32 (issue 24). 4-bit is judged at block 128, like for like: SmolLM2's weights come from a GGUF Q4_1
# file and already lie on a 4-bit grid of 32-element groups, which flatters any 32-element scheme (the project's
# rule: judge 4-bit at group 128 or per channel, not group 32). The g32 pairs, what transformers.js ships, are
# reported beside them, not judged.
PAIRS = (("eqc w8 web", "ort q8 (quantize_dynamic)", True), ("eqc w4 web", "ort q4 g128 (MatMulNBits)", True),
         ("eqc w4 g32 web", "ort q4 (MatMulNBits)", False), ("eqc w4 web", "ort q4 (MatMulNBits)", False))


def targets(rows: list[dict]) -> list[str]:
    """One met/MISSED line per target and judged pair whose rows were measured, then the reported pairs."""
    by = {r["artifact"]: r for r in rows}
    fp32 = by.get("fp32", {}).get("ppl")
    out = ["", "## Targets (issue 24: no larger, at least as many tokens/s, at most half the ppl loss)", "",
           "Judged: w8, and 4-bit at block 128 (SmolLM2's GGUF Q4_1 weights already lie on a 32-element 4-bit grid, "
           "which flatters block-32 schemes). Reported, not judged: the block-32 pairs.", ""]
    for mine, theirs, judged in PAIRS:
        a, b = by.get(mine), by.get(theirs)
        if a is None or b is None or not isinstance(fp32, (int, float)):
            continue
        checks = [("size", a["bytes"] <= b["bytes"], f"{a['bytes'] / 1e6:.2f} MB vs {b['bytes'] / 1e6:.2f} MB")]
        if "browser_tokens_per_s" in a and "browser_tokens_per_s" in b:
            checks.append(("tokens/s", a["browser_tokens_per_s"] >= b["browser_tokens_per_s"],
                           f"{a['browser_tokens_per_s']:.2f} vs {b['browser_tokens_per_s']:.2f}"))
        loss_a, loss_b = a["ppl"] / fp32 - 1, b["ppl"] / fp32 - 1
        checks.append(("ppl loss", loss_a <= max(loss_b, 0) / 2,
                       f"{loss_a:+.2%} vs half of {loss_b:+.2%} = {max(loss_b, 0) / 2:+.2%}"))
        for what, ok, detail in checks:
            verdict = ("met   " if ok else "MISSED") if judged else ("(ok)  " if ok else "(no)  ")
            out.append(f"- {verdict} {mine} vs {theirs}, {what}: {detail}" + ("" if judged else " (reported)"))
    return out


def markdown(meta: dict, rows: list[dict], forms: dict | None) -> str:
    out = ["# Edge: eqc `--target web` vs ONNX Runtime's quantizers (transformers.js style), SmolLM2-135M",
           "",
           f"`{meta.get('command', 'tools/bench_edge.py')}`; browser: headless Chromium, onnxruntime-web WASM, {meta['threads']} thread, one run "
           f"each; prompt \"{meta['prompt']}\", greedy, {meta['new_tokens']} new tokens (tokens/s: the decode steps "
           "after the prefill). ppl: `eqc eval --ppl` on WikiText-2 test, "
           f"{meta['max_tokens']} tokens in windows of 512, native ORT (the web artifacts fold to the same float "
           "weights there). **The machine was shared** (2 vCPUs, 1-minute load average "
           f"{', '.join(f'{x:.1f}' for x in meta['load_average'])} at the end; single runs vary by ±40 % or more): "
           "compare tokens/s within this table only, not with tools/results/web.md.",
           "",
           "| artifact | size MB | ppl | browser tok/s | browser prefill ms | browser load s | browser tokens = eqc generate on it |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = r["ppl"] if isinstance(r["ppl"], (int, float)) else float("nan")
        if "browser_error" in r:
            out.append(f"| {r['artifact']} | {r['bytes'] / 1e6:.1f} | {ppl:.3f} | failed | | | |")
            continue
        same = "yes" if r["browser_tokens_equal_native"] else f"no (from token {r['first_differing_token']})"
        out.append(f"| {r['artifact']} | {r['bytes'] / 1e6:.1f} | {ppl:.3f} | {r['browser_tokens_per_s']:.2f} | "
                   f"{r['browser_prefill_ms']:.0f} | {r['browser_load_ms'] / 1000:.1f} | {same} |")
    out += targets(rows)
    if meta.get("notes"):
        out += ["", f"Note: {meta['notes']}."]
    if forms:
        out += ["", "Linear-layer forms in the same browser, from the --forms file (a run of `tools/web/bench_forms.py`: 8 layers of SmolLM2's MLP "
                "shapes, median ms per run, 1 thread):", "",
                "| form | decode ms (1 token) | prefill ms (32 tokens) |", "|---|---|---|"]
        for form, r in forms["browser"]["forms"].items():
            out.append(f"| {form} | {r['decode_ms']:.2f} | {r['prefill_ms']:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=pathlib.Path, required=True)
    ap.add_argument("--w4", type=pathlib.Path, required=True)
    ap.add_argument("--w4-g32", type=pathlib.Path, default=None,
                    help="a portable w4 artifact at block 32, held against ORT's block-32 q4 like for like")
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/eqc-edge"))
    ap.add_argument("--wiki", type=pathlib.Path, default=REPO / "eqcompiler" / "datasets" / "wikitext-2" / "test.txt")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "tools" / "results" / "edge")
    ap.add_argument("--forms", type=pathlib.Path, default=None, help="a bench_forms.py --out JSON to include")
    ap.add_argument("--md-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    forms = json.loads(args.forms.read_text()) if args.forms else None
    if args.md_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown(saved["meta"], saved["rows"], forms))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    arts = build(args.fp32, args.w4, args.work, args.w4_g32)
    server = web.serve({})
    rows = []
    for name, art in arts.items():
        if args.only and name not in args.only:
            continue
        rows.append(measure(name, art, args.wiki, args.max_tokens, args.threads, args.new_tokens, server))
        print(json.dumps(rows[-1]), flush=True)
    server[0].shutdown()
    meta = {"command": "tools/bench_edge.py " + " ".join(sys.argv[1:]),
            "threads": args.threads, "max_tokens": args.max_tokens, "new_tokens": args.new_tokens, "prompt": PROMPT,
            "load_average": os.getloadavg()}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(meta, rows, forms))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
