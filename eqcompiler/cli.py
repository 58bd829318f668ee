"""The `eqc` command line: export, calibrate, compile, eval.

Every command has --json (machine-readable result on stdout). Failures print one line
`error: ...` on stderr and exit with the code documented in the README (2: bad input).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import click

from eqcompiler.errors import EqcError

if TYPE_CHECKING:  # (the command line imports what a command needs when it runs)
    from eqcompiler.calibration.activation_rows import RowRequest, TakenRows


def _emit(result: dict[str, Any], as_json: bool, lines: Callable[[dict[str, Any]], list[str]]) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        for line in lines(result):
            click.echo(line)


def _progress(label: str, enabled: bool) -> Callable[[int, int], None] | None:
    """A progress line on stderr (never on stdout, which --json owns)."""
    if not enabled or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        click.echo(f"\r{label}: {done}/{total}", nl=done == total, err=True)

    return show


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn EqcError and other failures into one line on stderr and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # SIGTERM unwinds like Ctrl-C, so staging folders are removed (its default would kill at once).
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except EqcError as exc:
            if exc.exit_code == 1 and os.environ.get("EQC_DEBUG"):  # an internal error, named: show where
                raise
            hint = " (set EQC_DEBUG=1 for a traceback)" if exc.exit_code == 1 else ""
            click.echo(f"error: {exc}{hint}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            from eqcompiler.artifact.atomic import COMMITTED

            done = f"; {', '.join(map(str, COMMITTED))} had been written completely" if COMMITTED else "; no output was written"
            click.echo(f"error: interrupted{done}", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory", err=True)
            sys.exit(4)
        except OSError as exc:
            click.echo(f"error: {exc.strerror or exc} ({exc.filename or ''})".replace(" ()", ""), err=True)
            sys.exit(2)
        except Exception as exc:  # unexpected: still one line, traceback only on request
            if os.environ.get("EQC_DEBUG"):
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            click.echo(f"error: internal error {type(exc).__name__}: {first} (set EQC_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper


def kind_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--kind and --input-map, for commands that read a model eqc did not export (artifact/model_kind.py)."""
    from eqcompiler.artifact.model_kind import KINDS

    fn = click.option("--input-map", "input_map", default=None, metavar="NAME=ROLE[,...]",
                      help="A text model's input names that are not the conventional ones, each mapped to its role "
                           "(input_ids, attention_mask, token_type_ids, position_ids), e.g. ids=input_ids,am=attention_mask.")(fn)
    return click.option("--kind", type=click.Choice(KINDS), default=None,
                        help="What the model is, when it has no eqc manifest (default: detected from its inputs and "
                             "outputs; `eqc inspect` says what and why).")(fn)


def _choose_kind(model: str, kind: str | None, input_map: str | None) -> Any:
    """The model's kind, --kind and --input-map checked against its graph (one line, exit 2), for this process."""
    from eqcompiler.artifact.folder import model_file, resolve_artifact
    from eqcompiler.artifact.model_kind import choose

    art = resolve_artifact(model)
    return choose(model_file(art), art.manifest, kind, input_map)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eqc")
def main() -> None:
    """eqc: export, calibrate, compile (quantize) and evaluate LLMs as ONNX."""


@main.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=pathlib.Path), help="Artifact folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--no-parity", is_flag=True, help="Skip the ORT-vs-PyTorch parity check (not recommended).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow running Python code shipped in the model folder (config auto_map). Off by default.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@guarded
def export(src: str, out: pathlib.Path, overwrite: bool, no_parity: bool, trust_remote_code: bool, as_json: bool) -> None:
    """Export SRC (HF folder, .gguf file, or alias such as smollm2) to an ONNX artifact folder."""
    from eqcompiler.export.hf import export as do_export

    manifest = do_export(src, out, overwrite=overwrite, check=not no_parity, trust_remote_code=trust_remote_code)
    _emit(manifest, as_json, lambda m: [
        f"exported {m['family']} ({m['task']}) to {out}",
        f"parity: {json.dumps({k: v for k, v in m['parity'].items() if k != 'metric'})}"])


@main.command()
@click.argument("model")
@click.option("--data", "text", required=True,
              help="UTF-8 text file (calibration split), or INPUTS.npz: one array per graph input, samples along the "
                   "first axis (graphs without text inputs; docs/bring-your-own-onnx.md).")
@click.option("--samples", default=32, show_default=True, help="Number of windows.")
@click.option("--seq-len", default=512, show_default=True,
              help="Tokens per window. An encoder's windows are framed by its special tokens ([CLS] ... [SEP]); "
                   "pick the length of the inputs it will embed (e.g. 32 for sentences).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=pathlib.Path), help="Statistics file (.npz).")
@click.option("--overwrite", is_flag=True, help="Replace an existing statistics file.")
@click.option("--skip-nonfinite", is_flag=True, help="Treat NaN/Inf activations as 0 instead of failing.")
@click.option("--for", "for_recipes", default=None, metavar="RECIPE[,RECIPE...]",
              help="Collect every observer these recipes read (names or .json files; 'kv' for --kv-bits), added "
                   "to --observers: e.g. --for w8a8-smooth,w4-gptq,kv calibrates once for all three.")
@click.option("--observers", default=None,
              help="Comma-separated statistics to record [default: minmax,absmax_channel,abssum]: minmax (per-tensor min/max/count, always on); "
                   "absmax_channel (per-channel max |x|); abssum (per-channel float64 sum |x|); hist (2048-bin |x| "
                   "histogram, power-of-two range: percentile/entropy/mse methods); gram (float64 X^T X per linear "
                   "input: GPTQ); sample (up to 512 token rows per linear input: SmoothQuant's alpha search without a model "
                   "session, for big models); kv (KV-cache present.* per-channel min/max); all (every one but sample).")
@click.option("--decode-steps", default=0, show_default=True,
              help="After each prefill window run N single-token decode steps (present fed back as past) and observe them.")
@click.option("--tokenizer", default=None, metavar="DIR|FILE",
              help="The tokenizer folder or tokenizer.json, for a model that came without one (a bare .onnx); recorded "
                   "in the statistics, so a compile's searches read the same tokens.")
@click.option("--workers", default=1, show_default=True,
              help="Local processes (torch.distributed gloo); windows are sharded and statistics merged exactly.")
@click.option("--threads", default=None, type=int, help="Intra-op threads per worker (default: cores // workers).")
@click.option("--stream-layers/--no-stream-layers", default=None,
              help="Run one decoder layer at a time over all windows (peak memory ~ one layer's weights, same "
                   "statistics). Default: on when the weights exceed 25% of available memory.")
@kind_options
@click.option("--json", "as_json", is_flag=True)
@guarded
def calibrate(model: str, text: str, samples: int, seq_len: int, out: pathlib.Path, overwrite: bool,
              skip_nonfinite: bool, for_recipes: str | None, observers: str | None, decode_steps: int, tokenizer: str | None,
              workers: int, threads: int | None, stream_layers: bool | None, kind: str | None, input_map: str | None,
              as_json: bool) -> None:
    """Record activation statistics of MODEL on TEXT windows (streaming; memory does not grow with N)."""
    from eqcompiler.calibration.calibrate import Calibrator, check_options, run_calibration, tqdm_progress
    from eqcompiler.calibration.tensor_data import is_tensor_data

    check_options(samples, seq_len, decode_steps)  # limits first: one line, exit 2, before any work
    chosen = _choose_kind(model, kind, input_map)
    if is_tensor_data(text):
        _calibrate_tensors(model, text, samples, out, overwrite, skip_nonfinite, for_recipes, observers, decode_steps,
                           tokenizer, workers, threads, stream_layers, chosen.kind, as_json)
        return
    if workers < 1:
        raise EqcError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise EqcError(f"--threads must be at least 1, got {threads}")
    from eqcompiler.artifact.atomic import check_output_file

    check_output_file(out, overwrite)  # exists, a folder, missing or read-only folder: before any work
    observers = ",".join(_observers_to_collect(observers, for_recipes))  # a bad name fails before any work
    reason = "--stream-layers" if stream_layers else ""
    taken = None  # rows the statistics pass kept for --for's alpha search (single process only)
    if stream_layers is None:  # decided here (for every rank) and said in the summary
        from eqcompiler.artifact.folder import model_file, resolve_artifact
        from eqcompiler.calibration.layer_stream import auto_stream

        stream_layers, reason = auto_stream(model_file(resolve_artifact(model)))
    if workers > 1:
        from eqcompiler.artifact.folder import resolve_artifact
        from eqcompiler.calibration.calibrate import check_positions
        from eqcompiler.calibration.distributed import launch_local

        check_positions(resolve_artifact(model).folder, seq_len, decode_steps)  # once here, not in every rank

        args = [model, "--data", text, "--samples", str(samples), "--seq-len", str(seq_len), "-o", str(out),
                "--observers", observers, "--decode-steps", str(decode_steps)]
        args += ["--overwrite"] * overwrite + ["--skip-nonfinite"] * skip_nonfinite + ["--stream-layers"] * stream_layers
        args += ["--tokenizer", tokenizer] if tokenizer else []
        result = launch_local(workers, args, threads=threads)  # ranks inherit the chosen kind and map (environment)
    else:
        start = time.perf_counter()
        progress, close = tqdm_progress("calibrate")
        try:
            cal = Calibrator(model, text, samples, seq_len, observers=observers, decode_steps=decode_steps,
                             skip_nonfinite=skip_nonfinite, threads=threads, stream_layers=stream_layers,
                             tokenizer=tokenizer, rows_for=_search_rows(for_recipes, observers))
            stats, taken = run_calibration(cal, out=out, overwrite=overwrite, progress=progress)
            del cal
        finally:
            close()
        # The run's time and worker count are said here, not written into the statistics file.
        result = {"output": str(out), "tensors": len(stats.tensors), **stats.meta, "workers": 1,
                  "seconds": round(time.perf_counter() - start, 2)}
    result["stream_reason"] = reason
    result["searches"] = _store_searches(model, out, for_recipes, taken)
    del taken  # what the search left (rows of tensors it does not smooth)
    _emit(result, as_json, lambda r: [f"calibrated {r['tensors']} tensors on {r['data']['samples']} windows "
                                      f"x {r['data']['seq_len']} tokens ({', '.join(r['observers'])}; "
                                      f"{r.get('workers', 1)} worker(s){_streamed(r)}) in {r['seconds']} s -> {out}"]
          + [f"stored the SmoothQuant alpha search of {len(s['keys'])} recipe step(s) ({s['seconds']} s): compiles "
             "from these statistics run no model" for s in [r["searches"]] if s["keys"]])


def _calibrate_tensors(model: str, data: str, samples: int, out: pathlib.Path, overwrite: bool, skip_nonfinite: bool,
                       for_recipes: str | None, observers: str | None, decode_steps: int, tokenizer: str | None,
                       workers: int, threads: int | None, stream_layers: bool | None, kind: str, as_json: bool) -> None:
    """`eqc calibrate --data INPUTS.npz`: statistics from named input tensors (graphs without text inputs)."""
    from eqcompiler.artifact.atomic import check_output_file
    from eqcompiler.calibration.calibrate import tqdm_progress
    from eqcompiler.calibration.tensor_data import calibrate_tensors

    given = [flag for flag, on in (("--decode-steps", decode_steps), ("--tokenizer", tokenizer), ("--workers", workers > 1),
                                   ("--stream-layers", stream_layers)) if on]
    if given:
        raise EqcError(f"{given[0]} reads text windows; it does not go with --data .npz")
    from eqcompiler.compile.recipes import KV_CACHE_TARGET, load_recipe

    for name in (r.strip() for r in (for_recipes or "").split(",") if r.strip()):
        # Refused before any work: the statistics file would be written and the search fail after it.
        if name == KV_CACHE_TARGET or any(s["pass"] == "smooth_quant" for s in load_recipe(name)["passes"]):
            raise EqcError(f"--for {name} reads text windows (the KV cache, SmoothQuant's alpha search); it does not "
                           "go with --data .npz")
    if threads is not None and threads < 1:
        raise EqcError(f"--threads must be at least 1, got {threads}")
    check_output_file(out, overwrite)
    chosen = ",".join(_observers_to_collect(observers, for_recipes))
    start = time.perf_counter()
    progress, close = tqdm_progress("calibrate")
    try:
        stats = calibrate_tensors(model, data, samples, out=out, overwrite=overwrite, observers=chosen,
                                  skip_nonfinite=skip_nonfinite, threads=threads, progress=progress)
    finally:
        close()
    result = {"output": str(out), "tensors": len(stats.tensors), "kind": kind, **stats.meta, "workers": 1,
              "seconds": round(time.perf_counter() - start, 2)}
    result["searches"] = _store_searches(model, out, for_recipes)
    _emit(result, as_json, lambda r: [f"calibrated {r['tensors']} tensors of a {kind} graph on {r['data']['samples']} "
                                      f"samples of {data} ({', '.join(r['observers'])}) in {r['seconds']} s -> {out}"])


def _store_searches(model: str, out: pathlib.Path, for_recipes: str | None, taken: TakenRows | None = None
                    ) -> dict[str, Any]:
    """The model runs --for's recipes need beyond statistics (SmoothQuant's alpha search), stored with them.
    The command has just written `out`: a failed search removes it (a failed command leaves no output).
    `taken`: the statistics pass's rows for the search, used when they fit."""
    from eqcompiler.compile.pipeline import store_model_searches

    start = time.perf_counter()
    names = _search_recipes(for_recipes)
    try:
        keys = store_model_searches(model, out, names, taken) if names else []
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return {"keys": keys, "seconds": round(time.perf_counter() - start, 2)}


def _search_recipes(for_recipes: str | None) -> list[str]:
    from eqcompiler.compile.recipes import KV_CACHE_TARGET

    return [r.strip() for r in (for_recipes or "").split(",") if r.strip() and r.strip() != KV_CACHE_TARGET]


def _search_rows(for_recipes: str | None, observers: str) -> RowRequest | None:
    """What --for's alpha search will sample, for the statistics pass to keep from the same windows: the search
    then opens no second session; None when no search samples the model run."""
    from eqcompiler.calibration.smoothing_search import rows_request

    names = _search_recipes(for_recipes)
    return rows_request(names, observers.split(",")) if names else None


def _observers_to_collect(observers: str | None, for_recipes: str | None) -> tuple[str, ...]:
    from eqcompiler.calibration.observers import DEFAULT_OBSERVERS, parse_observers
    from eqcompiler.compile.recipes import observers_for

    chosen = parse_observers(observers if observers is not None else DEFAULT_OBSERVERS)
    if not for_recipes:
        return chosen
    return parse_observers([*chosen, *observers_for(for_recipes)])


def _streamed(summary: dict[str, Any]) -> str:
    if not summary.get("stream_layers"):
        return ""
    reason = summary.get("stream_reason", "")
    return "; layer-streamed" + (f": {reason}" if reason and reason != "--stream-layers" else "")


@main.command(name="compile")
@click.argument("model")
@click.option("--recipe", required=True, help="Built-in recipe name or a recipe .json file.")
@click.option("--calib", default=None, help="Statistics file from `eqc calibrate`.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=pathlib.Path))
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--target", type=click.Choice(["portable", "tensorrt", "ort-cpu", "ort-cuda", "ort-mobile", "web"]), default="portable", show_default=True,
              help="portable: standard QDQ; tensorrt: QDQ + TensorRT placement check; ort-cpu: fastest ORT CPU kernels; ort-cuda: per-token W8A8 -> ai.eqc::FusedInt8Gemm (libeqc_ops_cuda.so); "
                   "ort-mobile: + model.ort and the reduced-build operator list; web: weights for onnxruntime-web (WASM).")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="Store int8 weights in [-64, 63] so ONNX Runtime's int8 CPU kernels do not saturate on x86 without "
                   "VNNI (AVX2/AVX-512 without VNNI); costs one bit of weight precision. Default: the recipe's choice "
                   "(w8a8: auto = on with --cpu avx2 for --target ort-cpu). --reduce-range also turns "
                   "--uint8-encoding off.")
@click.option("--cpu", type=click.Choice(["vnni", "avx2", "host"]), default=None,
              help="The CPU class ONNX Runtime's int8 kernels will run the artifact on: vnni (x86 with AVX512-VNNI/AVX-VNNI/"
                   "AMX, ARM; the default), avx2 (x86 without VNNI, where they saturate on full-range int8: static W8A8 "
                   "gets uint8-encoded or 7-bit weights), host (this machine's). The artifact never depends on the "
                   "compiling host unless --cpu host says so.")
@click.option("--uint8-encoding/--no-uint8-encoding", default=None,
              help="Store static W8A8 layers' int8 codes as uint8 with zero point 128 (same values) so ONNX Runtime "
                   "uses its exact uint8 x uint8 CPU kernels on x86 without VNNI; not for TensorRT. Default: the "
                   "recipe's choice (w8a8, w8a8-smooth: auto = on with --cpu avx2 for --target portable).")
@click.option("--kv-bits", type=click.Choice(["8", "4"]), default=None,
              help="Quantize the KV cache (graph inputs/outputs) to 8 or 4 bits on top of the recipe.")
@click.option("--kv-keys", type=click.Choice(["auto", "channel", "token"]), default="auto", show_default=True,
              help="Key groups: channel (frozen from --calib made with --observers kv), token (dynamic); auto: channel with --calib.")
@click.option("--kv-values", type=click.Choice(["auto", "token", "channel"]), default="auto", show_default=True,
              help="Value groups: token (dynamic per token) or channel (frozen from calibration); "
                   "auto: channel for --kv-bits 4 with per-channel keys (0.25x, lower ppl), else token.")
@click.option("--kv-scheme", type=click.Choice(["auto", "asymmetric", "symmetric"]), default="auto", show_default=True,
              help="KV-cache codes: asymmetric (zero points; per-token values allowed) or symmetric (per-channel keys "
                   "and values frozen from --calib, int8 / biased int4: the cache ONNX Runtime's GroupQueryAttention "
                   "reads, so --target ort-cpu fuses attention over it). auto: symmetric for --target ort-cpu when "
                   "--calib is given and neither --kv-keys nor --kv-values says token, else asymmetric. Compile the "
                   "portable artifact with symmetric to lower it for ort-cpu later.")
@click.option("--budget", default=None,
              help="Recipe mixed: average bits per linear weight (6bits), artifact size (120MB), or the smallest plan "
                   "within a perplexity rise on held-out calibration text (ppl+2%; compiles and scores up to 11 probes).")
@click.option("--ppl-windows", default=None, type=int,
              help="Recipe mixed, --budget ppl+X%: held-out calibration windows each probe scores (default 4).")
@click.option("--sensitivity", default=None, type=click.Choice(["proxy", "kl"]),
              help="Recipe mixed, --budget: rank layers by the Gram proxy (default) or by measured logits KL "
                   "(one ORT forward per layer and precision on held-out calibration text; cached).")
@click.option("--sensitivity-cache", "sensitivity_cache", default=None, metavar="DIR",
              help="Recipe mixed, --sensitivity kl: the folder that caches measured KL tables "
                   "(default ~/.cache/eqc/sensitivity).")
@click.option("--solver", default=None, type=click.Choice(["dp", "greedy", "grid", "entropy"]),
              help="Recipe mixed, --budget: dp (exact knapsack, default), greedy, grid (tiny models), "
                   "entropy (more bits to layers whose weights have higher entropy).")
@click.option("--plan", "plan_file", default=None, help="Recipe mixed: re-apply a saved per-layer precision plan.")
@click.option("--save-plan", "save_plan_file", default=None, type=click.Path(path_type=pathlib.Path),
              help="Recipe mixed: write the per-layer precision plan used (JSON).")
@kind_options
@click.option("--json", "as_json", is_flag=True)
@guarded
def compile_cmd(model: str, out: pathlib.Path, kind: str | None, input_map: str | None, as_json: bool,
                **flags: Any) -> None:
    """Run a recipe (a list of passes) over MODEL and write a new artifact folder."""
    from eqcompiler.compile.request import CompileRequest, run

    _choose_kind(model, kind, input_map)  # recorded in a foreign graph's compiled manifest (task, input_map)
    request = CompileRequest.from_flags(model, out, **flags)
    result = run(request)

    def lines(r: dict[str, Any]) -> list[str]:
        out_lines = [f"compiled with recipe '{r['recipe']}' -> {out} ({r['size_bytes'] / 1e6:.1f} MB, {r['seconds']} s)"]
        out_lines += [f"warning: {w}" for w in r["warnings"]]
        out_lines += [f"hint: {h}" for h in r["hints"]]
        kl = r["model_runs"].get("kl_sensitivity")
        if kl:  # how this run got the KL table (the artifact records only what was measured)
            if kl["cached"]:
                out_lines.append(f"kl sensitivity: read from {kl['cache']}")
            else:
                saved = f", saved to {kl['cache']}" if kl["cache"] else " (cache off)"
                out_lines.append(f"kl sensitivity: measured ({kl['probes']} ORT probes, {kl['measure_seconds']} s){saved}")
        if "apply_precision_plan" in r["report"]:  # recipe mixed: the per-layer table (and ppl probes)
            from eqcompiler.compile.bitwidth import plan_table

            out_lines += plan_table(r["report"]["apply_precision_plan"])
        return out_lines
    _emit(result, as_json, lines)


@main.command(name="eval")
@click.argument("model")
@click.option("--ppl", "ppl_text", default=None, help="Text file for perplexity (test split).")
@click.option("--max-tokens", default=16384, show_default=True, help="Tokens of the text to score.")
@click.option("--window", default=512, show_default=True, help="Window length (non-overlapping).")
@click.option("--embed-ref", default=None, help="Encoders: reference artifact for embedding cosine similarity.")
@click.option("--sentences", "n_sentences", default=200, show_default=True, help="Encoders: sentences to embed.")
@click.option("--text", "sentence_text", default=None, help="Encoders: text to take sentences from (default: WikiText-2 test).")
@click.option("--latency/--no-latency", default=True, show_default=True, help="Measure decode-step latency.")
@click.option("--chunk", default=0, show_default=True,
              help="Perplexity through the KV cache: feed each window CHUNK tokens at a time (0: whole window at once).")
@click.option("--tokenizer", default=None, metavar="DIR|FILE",
              help="Perplexity, --embed-ref: the tokenizer folder or tokenizer.json, for a model that came without one "
                   "(a bare .onnx).")
@click.option("--ort-config", "ort_config", multiple=True, metavar="KEY=VALUE",
              help="ONNX Runtime session config entry for every session (repeatable), e.g. "
                   "session.qdq_matmulnbits_accuracy_level=0 to keep weight-only int8 layers in float compute.")
@click.option("--data", "data", default=None, metavar="INPUTS.npz",
              help="Input samples (the layout of eqc calibrate --data): with --ref, the relative error and cosine of "
                   "every output against the reference; the latency runs the first sample.")
@click.option("--ref", "ref", default=None, help="With --data: the float model the outputs are compared with.")
@click.option("--samples", "n_samples", default=None, type=int, help="With --data: samples to compare (default: all).")
@kind_options
@click.option("--json", "as_json", is_flag=True)
@guarded
def eval_cmd(model: str, ppl_text: str | None, max_tokens: int, window: int, embed_ref: str | None,
             n_sentences: int, sentence_text: str | None, latency: bool, chunk: int, tokenizer: str | None,
             ort_config: tuple[str, ...], data: str | None, ref: str | None, n_samples: int | None, kind: str | None,
             input_map: str | None, as_json: bool) -> None:
    """Score MODEL (artifact folder or its model.onnx) through ONNX Runtime."""
    from eqcompiler.analysis import evaluate
    from eqcompiler.runtime import session as runtime
    from eqcompiler.artifact.folder import model_file, resolve_artifact, size_bytes
    from eqcompiler.lowering.cpu_features import saturation_warning

    if ort_config:
        os.environ[runtime.ORT_CONFIG_ENV] = ";".join(ort_config)
        runtime.ort_config_entries()  # refuse a malformed entry before any work
    art = resolve_artifact(model)
    chosen = _choose_kind(model, kind, input_map)
    result: dict[str, Any] = {"model": str(model), "size_bytes": size_bytes(model_file(art)),
                              "warnings": [w for w in [saturation_warning(art.manifest or {})] if w],
                              "ort_config": runtime.ort_config_entries(), "kind": chosen.kind}
    if tokenizer is not None and not embed_ref and (not ppl_text or chunk):
        raise EqcError("--tokenizer goes with --ppl (without --chunk) or --embed-ref")
    if (ref or n_samples is not None) and not data:
        raise EqcError("--ref and --samples go with --data INPUTS.npz")
    if n_samples is not None and n_samples < 1:
        raise EqcError(f"--samples must be at least 1, got {n_samples}")
    if data and not ref and not latency:
        raise EqcError("--data needs --ref FLOAT_MODEL (output error) or latency")
    if data and ref:
        from eqcompiler.analysis.output_error import output_error

        result["output_error"] = output_error(model, ref, data, samples=n_samples)
    if ppl_text and chunk:
        from eqcompiler.runtime.decode import chunked_perplexity

        result.update(chunked_perplexity(model, ppl_text, chunk=chunk, max_tokens=max_tokens, window=window,
                                         progress=_progress("perplexity", not as_json)))
    elif ppl_text:
        result.update(evaluate.perplexity(model, ppl_text, max_tokens=max_tokens, window=window,
                                          progress=_progress("perplexity", not as_json), tokenizer=tokenizer))
    if embed_ref:
        text = sentence_text or _default_text()
        result["embedding"] = evaluate.embedding_similarity(model, embed_ref, text, n_sentences, tokenizer=tokenizer)
    if latency:
        result["latency"] = evaluate.decode_latency(model, data=data)
    def lines(r: dict[str, Any]) -> list[str]:
        out = [f"warning: {w}" for w in r["warnings"]] + [f"size: {r['size_bytes'] / 1e6:.1f} MB ({r['kind']})"]
        if "output_error" in r:
            e = r["output_error"]
            out.append(f"outputs vs {e['reference']} on {e['samples']} samples: relative error max "
                       f"{e['rel_error_max']:.4g}, cosine min {e['cosine_min']:.6f}")
            out += [f"  {name}: rel. error mean {o['rel_error_mean']:.4g} max {o['rel_error_max']:.4g}, cosine mean "
                    f"{o['cosine_mean']:.6f} min {o['cosine_min']:.6f}" for name, o in e["outputs"].items()]
        if "ppl" in r:
            out.append(f"perplexity: {r['ppl']:.3f} over {r['tokens']} tokens ({r['windows']} windows of {r['window']}"
                       + (f", through the cache in chunks of {r['chunk']})" if r.get("chunk") else ")"))
        if "embedding" in r:
            out.append(f"embedding cosine vs reference: mean {r['embedding']['mean_cosine']:.4f} "
                       f"min {r['embedding']['min_cosine']:.4f} ({r['embedding']['sentences']} sentences)")
        if "latency" in r:
            out.append(f"latency ({r['latency']['what']}): median {r['latency']['median_ms']:.2f} ms")
        return out
    _emit(result, as_json, lines)


@main.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, help="Most tokens to generate (stops earlier at eos).")
@click.option("--json", "as_json", is_flag=True)
@guarded
def generate(model: str, prompt: str, max_new_tokens: int, as_json: bool) -> None:
    """Greedy generation from MODEL through its (possibly quantized) KV cache."""
    from eqcompiler.runtime.decode import generate as do_generate

    result = do_generate(model, prompt, max_new_tokens=max_new_tokens)
    _emit(result, as_json, lambda r: [r["prompt"] + r["text"],
                                      f"({r['new_tokens']} tokens, stopped at {r['stopped']}, "
                                      f"{r['ms_per_token']} ms/token, cache {r['cache_bytes']} bytes)"])


@main.command(name="bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--prefill", default=512, show_default=True, help="Prompt tokens for the prefill measurement.")
@click.option("--past", default=512, show_default=True, help="Cached tokens for the decode-step measurement.")
@click.option("--warmup", default=2, show_default=True, help="Untimed runs before timing.")
@click.option("--runs", default=10, show_default=True, help="Timed runs (median/min/max reported).")
@click.option("--threads", default=2, show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--batch-sizes", default="1", show_default=True, metavar="N[,N...]",
              help="Encoders and causal LMs without a cache: batch sizes to time a forward at.")
@click.option("--seq-lens", default=None, metavar="N[,N...]",
              help="Encoders and causal LMs without a cache: sequence lengths to time (default: --prefill).")
@click.option("--data", "data", default=None, metavar="INPUTS.npz",
              help="Generic graphs: time the first sample (default: zeros shaped like the inputs).")
@kind_options
@click.option("--json", "as_json", is_flag=True)
@guarded
def bench_cmd(models: tuple[str, ...], prefill: int, past: int, warmup: int, runs: int, threads: int, batch_sizes: str,
              seq_lens: str | None, data: str | None, kind: str | None, input_map: str | None, as_json: bool) -> None:
    """Latency, throughput, peak memory and size of MODELS, side by side: prefill/decode and KV bytes/token for
    causal LMs with a cache, forward per batch and sequence length for encoders, forward per sample otherwise."""
    from eqcompiler.analysis.bench import bench, table

    if min(prefill, past, runs) < 1 or warmup < 0:
        raise EqcError("--prefill, --past and --runs must be >= 1, --warmup >= 0")
    batches, seqs = _int_list("--batch-sizes", batch_sizes), _int_list("--seq-lens", seq_lens or str(prefill))
    results = bench(list(models), prefill=prefill, past=past, warmup=warmup, runs=runs, threads=threads,
                    batch_sizes=batches, seq_lens=seqs, data=data, kind=kind, input_map=input_map)
    if as_json:
        click.echo(json.dumps({"results": results}, indent=2, sort_keys=True))
    else:
        for line in table(results):
            click.echo(line)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EqcError(f"{flag} takes comma-separated whole numbers, got '{text}'") from None
    if not values or min(values) < 1:
        raise EqcError(f"{flag} takes numbers >= 1, got '{text}'")
    return values


@main.command(name="inspect")
@click.argument("model")
@kind_options
@click.option("--json", "as_json", is_flag=True)
@guarded
def inspect_cmd(model: str, kind: str | None, input_map: str | None, as_json: bool) -> None:
    """Model kind (and why), op counts, quantized MatMuls (bits, granularity, activation kind), KV-cache format,
    size by precision."""
    from eqcompiler.analysis.inspect_model import inspect, lines

    chosen = _choose_kind(model, kind, input_map)
    result = inspect(model)
    result["kind"] = {"kind": chosen.kind, "why": chosen.why, "source": chosen.source, "input_map": chosen.input_map}
    _emit(result, as_json, lines)


@main.command(name="report")
@click.argument("out", type=click.Path(path_type=pathlib.Path))
@click.option("--models", "models", required=True, multiple=True, help="Artifact folders (repeat, or separate with commas); first row is the reference.")
@click.option("--ppl", "ppl_text", default=None, help="Text for perplexity (test split); omitted: no perplexity column.")
@click.option("--ppl-tokens", default=2048, show_default=True, help="Tokens of the text to score (small budget).")
@click.option("--calib", default=None, help="Statistics file: plot calibration ranges and outlier channels.")
@click.option("--layers", default=None, help="Comma-separated regexes of layers for weight histograms.")
@click.option("--tensors", default=None, help="Regex of calibration tensors to plot per channel (default: the 2 most outlying).")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Measure prefill/decode latency (eqc bench).")
@click.option("--prefill", default=128, show_default=True)
@click.option("--past", default=128, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@guarded
def report_cmd(out: pathlib.Path, models: tuple[str, ...], ppl_text: str | None, ppl_tokens: int, calib: str | None,
               layers: str | None, tensors: str | None, speed: bool, prefill: int, past: int, runs: int,
               overwrite: bool, as_json: bool) -> None:
    """Write OUT.html: accuracy/size/speed table, weight histograms, per-layer error, calibration ranges."""
    from eqcompiler.analysis.report import DEFAULT_LAYERS, build_report

    names = [m for item in models for m in item.split(",") if m]
    result = build_report(out, names, ppl_text=ppl_text, ppl_tokens=ppl_tokens, calib=calib,
                          layers=tuple(layers.split(",")) if layers else DEFAULT_LAYERS, tensors=tensors,
                          speed=speed, prefill=prefill, past=past, runs=runs, overwrite=overwrite)
    _emit(result, as_json, lambda r: [f"wrote {r['output']} ({r['bytes'] / 1e6:.1f} MB, {r['figures']} figures)"])


def _default_text() -> str:
    from eqcompiler.data import find_wikitext

    return str(find_wikitext("test"))


if __name__ == "__main__":
    main()
