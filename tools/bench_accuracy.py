"""Side-by-side accuracy: eqc's recipes against ONNX Runtime's own quantizers, on the same fp32 graph.

SmolLM2-135M: WikiText-2 test perplexity (512-token windows, --max-tokens tokens).
all-MiniLM-L6-v2: mean cosine of mean-pooled embeddings vs fp32 on --sentences WikiText sentences.

Every method starts from the eqc fp32 artifact's model.onnx. ONNX Runtime's quantizers write a new
model.onnx (+ model.onnx.data) into a copy of the artifact folder (tokenizer, manifest), so
eqcompiler.analysis.evaluate scores all of them the same way, in ORT's default CPU session:
- ort-dynamic / ort-dynamic-rr: quantize_dynamic (int8 weights, dynamic uint8 activations; reduce_range).
- ort-static-qdq: quantize_static, QDQ, MinMax over --ort-calib-windows WikiText valid windows.
- ort-nbits-rtn-{asym,sym}: MatMulNBitsQuantizer 4-bit g128 (RTN); ort-nbits-hqq: its HQQ config;
  ort-nbits-gptq: its GPTQ config (needs neural_compressor; recorded as an error if missing).
- eqc recipes (built-in ones present in this checkout), plus "+nbits": the w4 artifact lowered by
  lower_matmul_nbits (accuracy_level 0), i.e. the same MatMulNBits kernel ORT's quantizer uses.

Note: ORT 1.32 fuses a blocked DequantizeLinear->MatMul into MatMulNBits with accuracy_level 4
(int8 activations) by default, so a w4 QDQ artifact is scored with int8 activation blocks; the
"+nbits" rows are the float-compute numbers.

Usage: python tools/bench_accuracy.py [--max-tokens 32768] [--work /tmp/bench] [--only smollm2]
Writes tools/results/accuracy.json and accuracy.md (or --out-name).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
W4_RECIPES = ("w4-rtn", "w4-awq", "w4-gptq")
EQC_RECIPES = ("w8", "w8a8", "w8a8-smooth", "w8a8-dynamic", "zeroquant")
OBSERVERS = "minmax,absmax_channel,abssum,hist,gram"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_artifact_shell(src: pathlib.Path, dst: pathlib.Path) -> None:
    """dst gets src's tokenizer/config/manifest but no model (an ORT quantizer writes that)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.startswith("model.onnx"):
            shutil.copy2(item, dst / item.name)


def _save(model: Any, path: pathlib.Path) -> None:
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def _reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class TextReader(_reader_base()):  # type: ignore[misc]
    """onnxruntime CalibrationDataReader over WikiText valid windows (causal LM or encoder feeds)."""

    def __init__(self, art: pathlib.Path, valid: pathlib.Path, windows: int, seq_len: int, causal: bool) -> None:
        from eqcompiler.data import calibration_ids, load_tokenizer, read_text, windows as cut
        from eqcompiler.runtime.session import causal_feed, make_session

        # The windows eqc calibrates on (an encoder's framed by its special tokens).
        ids, _ = calibration_ids(load_tokenizer(art), read_text(valid)[0], seq_len, windows, causal)
        sess = make_session(art / "model.onnx") if causal else None
        self.feeds = []
        for w in cut(ids, seq_len, windows):
            if causal:
                self.feeds.append(causal_feed(sess, w))
            else:
                self.feeds.append({"input_ids": w, "attention_mask": np.ones_like(w), "token_type_ids": np.zeros_like(w)})
        self.it = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:  # CalibStridedMinMax calibrates in strides
        self.it = iter(self.feeds[start_index:end_index])

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):  # ORT's GPTQ path iterates the reader
        return iter(self.feeds)


def ort_methods(src: pathlib.Path, valid: pathlib.Path, causal: bool, calib_windows: int, seq_len: int
                ) -> dict[str, Callable[[pathlib.Path], None]]:
    """name -> function writing an ORT-quantized model.onnx into a folder."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model_path = src / "model.onnx"

    def dynamic(reduce_range: bool) -> Callable[[pathlib.Path], None]:
        return lambda out: quantize_dynamic(model_path, out / "model.onnx", weight_type=QuantType.QInt8,
                                            reduce_range=reduce_range, use_external_data_format=True)

    def static(out: pathlib.Path) -> None:
        reader = TextReader(src, valid, calib_windows, seq_len, causal)
        quantize_static(model_path, out / "model.onnx", reader, quant_format=QuantFormat.QDQ,
                        use_external_data_format=True, extra_options={"CalibStridedMinMax": 1})

    def nbits(config: Callable[[], Any] | None, symmetric: bool) -> Callable[[pathlib.Path], None]:
        def run(out: pathlib.Path) -> None:
            model = onnx.load(str(model_path))
            quant = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=symmetric,
                                             algo_config=config() if config else None)
            quant.process()
            _save(quant.model.model, out / "model.onnx")
        return run

    def gptq_config() -> Any:
        reader = TextReader(src, valid, calib_windows, seq_len, causal)
        return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128, percdamp=0.01)

    return {
        "ort-dynamic": dynamic(False),
        "ort-dynamic-rr": dynamic(True),
        "ort-static-qdq": static,
        "ort-nbits-rtn-asym": nbits(None, False),
        "ort-nbits-rtn-sym": nbits(None, True),
        "ort-nbits-hqq": nbits(lambda: mnq.HQQWeightOnlyQuantConfig(block_size=128, bits=4), False),
        "ort-nbits-gptq": nbits(gptq_config, False),
    }


def lower_recipe(work: pathlib.Path) -> pathlib.Path:
    path = work / "lower-nbits.json"
    path.write_text(json.dumps({"name": "lower-nbits", "description": "MatMulNBits lowering only",
                                "passes": [{"pass": "lower_matmul_nbits", "options": {"accuracy_level": 0}}]}))
    return path


def bench_model(kind: str, args: argparse.Namespace, work: pathlib.Path,
                checkpoint: Callable[[dict[str, Any]], None], prior: dict[str, Any] | None = None) -> dict[str, Any]:
    from eqcompiler.calibration.calibrate import calibrate
    from eqcompiler.analysis.evaluate import decode_latency, embedding_similarity, perplexity
    from eqcompiler.export.hf import export
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.compile.recipes import builtin_recipes

    causal = kind == "smollm2"
    src = work / f"{kind}-fp32"
    if not (src / "model.onnx").is_file():
        log(f"export {kind}")
        export(kind, src)
    # An encoder is calibrated on short framed windows ([CLS] + 30 tokens + [SEP]), the length of the
    # sentences it embeds; 128-token windows under-range the attention context of short inputs
    # (MiniLM w8a8-smooth: 0.9985 with 16 x 128, 0.9993 with 256 x 32; tools/results/accuracy_notes.md).
    seq_len = 512 if causal else args.encoder_seq_len
    calib_windows = args.calib_samples if causal else args.encoder_calib_windows
    ort_windows = args.ort_calib_windows if causal else args.encoder_calib_windows  # the same data as eqc

    def score(folder: pathlib.Path) -> dict[str, Any]:
        if causal:
            r = perplexity(folder, args.test, max_tokens=args.max_tokens)
            return {"ppl": r["ppl"], "tokens": r["tokens"], "eval_seconds": r["seconds"]}
        r = embedding_similarity(folder, src, args.test, count=args.sentences)
        return {"mean_cosine": r["mean_cosine"], "min_cosine": r["min_cosine"], "sentences": r["sentences"]}

    def size_mb(folder: pathlib.Path) -> float:
        return round(sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20, 1)

    rows: dict[str, Any] = dict(prior or {})  # --merge: rows of an earlier run, replaced one by one

    def record(name: str, family: str, fn: Callable[[], pathlib.Path]) -> None:
        if args.methods and name not in args.methods and name != "fp32":
            return
        if name == "fp32" and args.merge and ("ppl" in rows.get(name, {}) or "mean_cosine" in rows.get(name, {})):
            return  # same model and text: the merged run's fp32 score stands
        log(f"{kind}: {name}")
        t = time.perf_counter()
        try:
            folder = fn()
            build = round(time.perf_counter() - t, 1)
            rows[name] = {"family": family, "build_seconds": build, "size_mb": size_mb(folder), **score(folder)}
        except Exception as exc:  # a quantizer that cannot run is a result too
            rows[name] = {"family": family, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            traceback.print_exc()
        log(f"{kind}: {name} -> {json.dumps(rows[name])}")
        checkpoint(rows)

    def reuse(folder: pathlib.Path) -> bool:
        return bool(args.reuse) and (folder / "model.onnx").is_file()

    record("fp32", "fp32", lambda: src)
    stats = work / f"{kind}-stats.npz"
    if not stats.is_file():
        log(f"calibrate {kind} ({calib_windows} x {seq_len}-token windows, observers {OBSERVERS})")
        calibrate(src, args.valid, samples=calib_windows, seq_len=seq_len, out=stats, observers=OBSERVERS)
    available = builtin_recipes()

    def eqc_recipes(names: tuple[str, ...]) -> None:
        for recipe in names:
            if recipe not in available:
                continue
            calib = str(stats) if available[recipe].get("requires_calibration") else None
            out = work / f"{kind}-{recipe}"
            record(f"eqc {recipe}", "eqc", lambda r=recipe, o=out, c=calib: o if reuse(o) else
                   (compile_model(src, r, o, calib=c, overwrite=True), o)[1])
            if recipe in args.lower and (out / "model.onnx").is_file():
                low = work / f"{kind}-{recipe}-nbits"
                record(f"eqc {recipe}+nbits", "eqc", lambda o=out, lo=low: lo if reuse(lo) else
                       (compile_model(o, str(lower_recipe(work)), lo, overwrite=True), lo)[1])

    def ort(nbits: bool) -> None:
        for name, make in ort_methods(src, args.valid, causal, ort_windows, seq_len).items():
            if name.startswith("ort-nbits") != nbits:
                continue
            out = work / f"{kind}-{name}"

            def build(o: pathlib.Path = out, m: Callable[[pathlib.Path], None] = make) -> pathlib.Path:
                if not reuse(o):
                    copy_artifact_shell(src, o)
                    m(o)
                return o
            record(name, "onnxruntime", build)

    # 4-bit first (the headline comparison), then the 8-bit methods.
    eqc_recipes(("w4-gptq", "w4-rtn"))
    ort(nbits=True)
    eqc_recipes(("w4-awq",))
    eqc_recipes(EQC_RECIPES)
    ort(nbits=False)
    if causal and args.latency:
        for name in ("fp32", "eqc w4-gptq", "eqc w4-gptq+nbits", "ort-nbits-rtn-asym"):
            folder = {"fp32": src, "eqc w4-gptq": work / f"{kind}-w4-gptq", "eqc w4-gptq+nbits": work / f"{kind}-w4-gptq-nbits",
                      "ort-nbits-rtn-asym": work / f"{kind}-ort-nbits-rtn-asym"}[name]
            if name in rows and "error" not in rows[name] and (folder / "model.onnx").is_file():
                rows[name]["decode_ms"] = round(decode_latency(folder, past_len=128, runs=args.latency_runs)["median_ms"], 2)
    return rows


def verdict(rows: dict[str, Any]) -> dict[str, Any]:
    """The issue's bar: eqc's best 4-bit loses <= 0.75x the perplexity ORT's best 4-bit loses."""
    base = rows.get("fp32", {}).get("ppl")

    def best(names: list[str]) -> tuple[str | None, float | None]:
        ok = [(rows[n]["ppl"], n) for n in names if n in rows and "ppl" in rows[n]]
        return (min(ok)[1], min(ok)[0]) if ok else (None, None)

    eqc_name, eqc_ppl = best([f"eqc {r}{s}" for r in ("w4-awq", "w4-gptq") for s in ("", "+nbits")])
    ort_name, ort_ppl = best([n for n in rows if n.startswith("ort-nbits")])
    if base is None or eqc_ppl is None or ort_ppl is None:
        return {"met": None}
    ratio = (eqc_ppl - base) / (ort_ppl - base) if ort_ppl > base else float("inf")
    return {"fp32": base, "eqc_best": eqc_name, "eqc_ppl": eqc_ppl, "ort_best": ort_name, "ort_ppl": ort_ppl,
            "loss_ratio": ratio, "met": bool(ratio <= 0.75)}


def write_markdown(result: dict[str, Any], path: pathlib.Path) -> None:
    lines = ["# Accuracy: eqc recipes vs ONNX Runtime's quantizers", "",
             f"Generated by `tools/bench_accuracy.py` ({result['settings']}).", ""]
    for kind, rows in result["models"].items():
        metric = "ppl" if kind == "smollm2" else "mean_cosine"
        lines += [f"## {kind} ({'WikiText-2 test perplexity' if metric == 'ppl' else 'mean cosine vs fp32'})", ""]
        if metric != "ppl" and result.get("encoder_calibration"):
            lines += [f"Calibration: {result['encoder_calibration']}.", ""]
        lines += [f"| method | {metric} | size MB | build s | decode ms | note |", "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            value = f"{r[metric]:.4f}" if metric in r else "-"
            lines.append(f"| {name} | {value} | {r.get('size_mb', '-')} | {r.get('build_seconds', '-')} | "
                         f"{r.get('decode_ms', '-')} | {r.get('error', '')} |")
        lines.append("")
    v = result.get("verdict", {})
    if v.get("met") is not None:
        lines += ["## 4-bit g128 bar", "",
                  f"fp32 {v['fp32']:.3f}; eqc best {v['eqc_best']} {v['eqc_ppl']:.3f} (loss {v['eqc_ppl'] - v['fp32']:.3f}); "
                  f"ORT best {v['ort_best']} {v['ort_ppl']:.3f} (loss {v['ort_ppl'] - v['fp32']:.3f}); "
                  f"loss ratio {v['loss_ratio']:.3f} (bar <= 0.75): {'MET' if v['met'] else 'NOT MET'}", ""]
    notes = path.with_name(path.stem + "_notes.md")  # hand-written run notes survive regeneration
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    from eqcompiler.data import find_wikitext

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 test tokens for perplexity")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=32, help="eqc calibration windows (512 tokens for SmolLM2)")
    ap.add_argument("--ort-calib-windows", type=int, default=4, help="windows for ORT's quantize_static / GPTQ")
    ap.add_argument("--encoder-seq-len", type=int, default=32, help="MiniLM calibration window (special tokens included)")
    ap.add_argument("--encoder-calib-windows", type=int, default=256,
                    help="MiniLM calibration windows, for eqc and ORT's quantize_static alike")
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/eqc-bench-accuracy"))
    ap.add_argument("--only", choices=("smollm2", "minilm"), default=None)
    ap.add_argument("--methods", nargs="*", default=None, help="subset of method names (fp32 always runs)")
    ap.add_argument("--latency", action="store_true", help="also time one decode step for the 4-bit SmolLM2 variants")
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--out-name", default="accuracy")
    ap.add_argument("--lower", nargs="*", default=["w4-gptq", "w4-awq"],
                    help="w4 recipes also scored after lower_matmul_nbits (accuracy_level 0)")
    ap.add_argument("--reuse", action="store_true", help="score artifacts already in --work instead of rebuilding them")
    ap.add_argument("--merge", action="store_true",
                    help="start from the rows already in the results JSON (same settings) and replace/add the ones run now")
    args = ap.parse_args()
    args.valid, args.test = find_wikitext("valid"), find_wikitext("test")
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"settings": f"max_tokens={args.max_tokens}, sentences={args.sentences}, "
                                          f"calib_samples={args.calib_samples}, ort_calib_windows={args.ort_calib_windows}",
                              "models": {}}
    json_path, md_path = RESULTS / f"{args.out_name}.json", RESULTS / f"{args.out_name}.md"
    if args.merge and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") != result["settings"]:
            raise SystemExit(f"--merge: {json_path} was written with different settings ({old.get('settings')})")
        result = old
    result["encoder_calibration"] = (f"{args.encoder_calib_windows} x {args.encoder_seq_len}-token WikiText-2 valid "
                                     "windows framed by [CLS]/[SEP], for eqc and ORT's quantize_static alike")
    for kind in ("smollm2", "minilm"):
        if args.only and kind != args.only:
            continue
        def checkpoint(rows: dict[str, Any], kind: str = kind) -> None:
            """Write the results so far, so a long run that is stopped still leaves its numbers."""
            result["models"][kind] = rows
            if kind == "smollm2":
                result["verdict"] = verdict(rows)
            RESULTS.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")
            write_markdown(result, md_path)

        checkpoint(bench_model(kind, args, args.work, checkpoint, result["models"].get(kind)))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
