"""Decoding through the KV cache: a step runner, chunked perplexity and greedy generation.

The cache is whatever the graph's present.* outputs are (float32, or quantized codes plus scale and
zero-point tensors after `quantize_kv_cache`): each present.X output feeds the past_key_values.X input
of the next step unchanged, so a quantized cache stays quantized between steps and is never
re-quantized. Outputs stay in ONNX Runtime (OrtValues through I/O binding) between steps: only the
logits are copied out to numpy.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from eqcompiler.artifact import folder as art_mod
from eqcompiler.data import load_tokenizer, read_text, tokenize
from eqcompiler.errors import EqcError
from eqcompiler.io_names import PAST, PRESENT, STATE_PAST
from eqcompiler.analysis.evaluate import score_windows
from eqcompiler.runtime.session import empty_past, make_session



class CacheRunner:
    """Runs a causal-LM session step by step, carrying the (possibly quantized) cache as OrtValues."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = {i.name for i in session.get_inputs()}
        self.cache_outputs = [o.name for o in session.get_outputs() if o.name.startswith(PRESENT)]
        missing = [n for n in self.cache_outputs if PAST + n[len(PRESENT):] not in self.input_names]
        if not self.cache_outputs or missing:
            raise EqcError("the model has no usable KV cache (present.* outputs matching past_key_values.* inputs)")
        self.reset()

    def reset(self, batch: int = 1) -> None:
        self.past: dict[str, Any] = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in empty_past(self.session, batch).items()}
        self.past_len = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids [batch, S] after the cached tokens; returns logits [batch, S, vocab] and extends the cache."""
        batch, seq = ids.shape
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        if "attention_mask" in self.input_names:
            binding.bind_cpu_input("attention_mask", np.ones((batch, self.past_len + seq), dtype=np.int64))
        if "position_ids" in self.input_names:
            pos = np.broadcast_to(np.arange(self.past_len, self.past_len + seq, dtype=np.int64), (batch, seq))
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
        for name, value in self.past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")
        for name in self.cache_outputs:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        names = ["logits", *self.cache_outputs]
        by_name = dict(zip(names, outputs))
        self.past = {PAST + n[len(PRESENT):]: by_name[n] for n in self.cache_outputs}
        self.past_len += seq
        return by_name["logits"].numpy()

    def cache_bytes(self) -> int:
        """Bytes the KV cache occupies now (data plus per-token scales and zero points); other carried
        state (quantize_activations_ema's running scales, a few bytes per tensor) is not cache."""
        total = 0
        for name, value in self.past.items():
            if not name.startswith(STATE_PAST):
                total += value.numpy().nbytes
        return total


def _runner(model: str | pathlib.Path, threads: int | None) -> tuple[art_mod.Artifact, CacheRunner]:
    art = art_mod.resolve_artifact(model)
    if art.task != "causal-lm":
        raise EqcError(f"decoding needs a causal LM; '{model}' is a {art.task} model")
    return art, CacheRunner(make_session(art_mod.model_file(art), threads=threads))


def chunked_perplexity(model: str | pathlib.Path, text_path: str | pathlib.Path, chunk: int = 64,
                       max_tokens: int = 16384, window: int = 512, threads: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity like evaluate.perplexity, but each window goes through the cache `chunk` tokens at a time.

    Every token after the first chunk attends to cached (possibly quantized) keys and values, so the
    cache path's error is counted; with chunk == window this equals the unchunked score.
    """
    if chunk < 1 or chunk > window:
        raise EqcError(f"--chunk must be between 1 and the window ({window}), got {chunk}")
    art, runner = _runner(model, threads)
    text, sha = read_text(text_path)
    ids = tokenize(load_tokenizer(art.folder), text, max_tokens=max_tokens)
    cache_bytes = 0

    def logits_through_cache(win: np.ndarray) -> np.ndarray:
        nonlocal cache_bytes
        runner.reset(batch=1)
        logits = np.concatenate([runner.step(win[:, s:s + chunk])[0] for s in range(0, window, chunk)])
        cache_bytes = runner.cache_bytes()
        return logits

    result = score_windows(ids, window, logits_through_cache, progress)
    return {**result, "chunk": chunk, "cache_bytes_per_token": cache_bytes / window,
            "text": {"path": str(text_path), "sha256": sha}}


def generate(model: str | pathlib.Path, prompt: str, max_new_tokens: int = 32, threads: int | None = None) -> dict[str, Any]:
    """Greedy decoding: prefill the prompt, then one token per step until eos or max_new_tokens."""
    if max_new_tokens < 1:
        raise EqcError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    art, runner = _runner(model, threads)
    tok = load_tokenizer(art.folder)
    ids = np.asarray(tok(prompt)["input_ids"], dtype=np.int64)[None]
    if ids.shape[1] == 0:
        raise EqcError("the prompt is empty after tokenization")
    eos = (art.manifest.get("tokenizer") or {}).get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    start = time.perf_counter()
    logits = runner.step(ids)
    prefill_s = time.perf_counter() - start
    new: list[int] = []
    stopped = "max_new_tokens"
    while len(new) < max_new_tokens:
        token = int(np.argmax(logits[0, -1]))
        if token in eos_ids:
            stopped = "eos"
            break
        new.append(token)
        if len(new) == max_new_tokens:
            break
        logits = runner.step(np.array([[token]], dtype=np.int64))
    total = time.perf_counter() - start
    decode_steps = max(len(new) - 1, 0)
    return {"prompt": prompt, "text": tok.decode(new, skip_special_tokens=True), "tokens": new,
            "prompt_tokens": int(ids.shape[1]), "new_tokens": len(new), "stopped": stopped,
            "prefill_ms": round(prefill_s * 1000, 2),
            "ms_per_token": round((total - prefill_s) * 1000 / decode_steps, 2) if decode_steps else None,
            "cache_bytes": runner.cache_bytes()}
