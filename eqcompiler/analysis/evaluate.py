"""`eqc eval`: perplexity, embedding similarity, size and latency, measured on the artifact in ORT."""
from __future__ import annotations

import pathlib
import statistics
import time
from typing import Any, Callable

import numpy as np

from eqcompiler.artifact import folder as art_mod
from eqcompiler.data import load_tokenizer, read_text, tokenize, windows
from eqcompiler.errors import EqcError
from eqcompiler.runtime.session import causal_feed, make_session


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over positions; logits [S, V] float32, computed in float64."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


def perplexity(model: str | pathlib.Path, text_path: str | pathlib.Path, max_tokens: int = 16384,
               window: int = 512, threads: int | None = None,
               progress: Callable[[int, int], None] | None = None,
               tokenizer: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Perplexity over consecutive non-overlapping windows; each window scores tokens 2..window."""
    art = art_mod.resolve_artifact(model)
    if art.task not in ("causal-lm", "causal-lm-nocache"):
        raise EqcError(f"perplexity needs a causal LM; '{model}' is a {art.task} model")
    text, sha = read_text(text_path)
    ids = tokenize(load_tokenizer(art.folder, tokenizer), text, max_tokens=max_tokens)
    session = make_session(art_mod.model_file(art), threads=threads)
    result = score_windows(ids, window, lambda win: session.run(["logits"], causal_feed(session, win))[0][0], progress)
    return {**result, "text": {"path": str(text_path), "sha256": sha}}


def score_windows(ids: np.ndarray, window: int, logits_for: Callable[[np.ndarray], np.ndarray],
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity over consecutive windows of `ids`; `logits_for(window [1, W]) -> logits [W, V]`."""
    count = len(ids) // window
    if count == 0:
        raise EqcError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    nll, scored = 0.0, 0
    start = time.perf_counter()
    for i, win in enumerate(windows(ids, window)):
        logits = logits_for(win)
        nll += _log_softmax_nll(logits[:-1], win[0, 1:])
        scored += window - 1
        if progress:
            progress(i + 1, count)
    ppl = float(np.exp(nll / scored))
    if not np.isfinite(ppl):
        raise EqcError(f"perplexity is not finite ({ppl}); the model produces NaN/Inf logits")
    return {"ppl": ppl, "tokens": scored, "windows": count, "window": window,
            "seconds": round(time.perf_counter() - start, 1)}


def timed(fn: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    """Milliseconds per call of `fn` after `warmup` untimed calls: median, min and max of `runs`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "warmup": warmup, "runs": runs}


def decode_latency(model: str | pathlib.Path, past_len: int = 128, warmup: int = 3, runs: int = 20,
                   threads: int | None = None, data: str | None = None) -> dict[str, Any]:
    """Latency of one decode step (1 new token, `past_len` cached tokens, batch 1); without a cache, of one
    forward (128 tokens; a generic graph: the first `data` sample, or zeros shaped like its inputs)."""
    art = art_mod.resolve_artifact(model)
    session = make_session(art_mod.model_file(art), threads=threads)
    if art.task == "generic":
        from eqcompiler.analysis.output_error import sample_feed

        feed = sample_feed(session, art_mod.model_file(art), data)
        result = timed(lambda: session.run(None, feed), warmup, runs)
        return {**result, "what": "forward, first --data sample" if data else "forward, zero inputs"}
    if art.task == "causal-lm-nocache":
        feed = causal_feed(session, np.ones((1, 128), dtype=np.int64))
        return {**timed(lambda: session.run(None, feed), warmup, runs), "what": "forward, 128 tokens, no cache"}
    if art.task != "causal-lm":
        ids = np.ones((1, 128), dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": ids, "token_type_ids": np.zeros_like(ids)}
        result = timed(lambda: session.run(None, feed), warmup, runs)
        return {**result, "what": "encoder forward, 128 tokens"}
    prefill = causal_feed(session, np.ones((1, past_len), dtype=np.int64))
    outputs = session.run(None, prefill)
    names = [o.name for o in session.get_outputs()]
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outputs) if n.startswith("present.")}
    feed = causal_feed(session, np.ones((1, 1), dtype=np.int64), past=past, past_len=past_len)
    result = timed(lambda: session.run(["logits"], feed), warmup, runs)
    return {**result, "what": f"decode step, 1 token, {past_len} cached"}


def sentences(text: str, count: int, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Plain sentences from WikiText-style text (headings and short lines skipped)."""
    picked = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sent in line.split(" . "):
            words = sent.split()
            if min_words <= len(words) <= max_words:
                picked.append(" ".join(words) + " .")
                if len(picked) == count:
                    return picked
    if not picked:
        raise EqcError("no sentences found in the text")
    return picked


def embeddings(model: str | pathlib.Path, texts: list[str], batch: int = 16, threads: int | None = None,
               tokenizer: str | pathlib.Path | None = None) -> np.ndarray:
    """Mean-pooled (mask-aware) last hidden states of an encoder artifact, [n, hidden]."""
    art = art_mod.resolve_artifact(model)
    if art.task != "encoder":
        raise EqcError(f"embeddings need an encoder model; '{model}' is a {art.task} model")
    tok = load_tokenizer(art.folder, tokenizer)
    session = make_session(art_mod.model_file(art), threads=threads)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="np")
        feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
                "token_type_ids": enc.get("token_type_ids", np.zeros_like(enc["input_ids"])).astype(np.int64)}
        hidden = session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        out.append((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))
    return np.concatenate(out)


def embedding_similarity(model: str | pathlib.Path, reference: str | pathlib.Path, text_path: str | pathlib.Path,
                         count: int = 200, tokenizer: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Cosine of the two models' sentence embeddings; `tokenizer` (--tokenizer) serves a side that came without
    one (a bare .onnx), the other keeps its own."""
    text, _ = read_text(text_path)
    sents = sentences(text, count)

    def own_or_given(m: str | pathlib.Path) -> str | pathlib.Path | None:
        return None if art_mod.resolve_artifact(m).manifest.get("format") == art_mod.MANIFEST_FORMAT else tokenizer

    a = embeddings(model, sents, tokenizer=own_or_given(model))
    b = embeddings(reference, sents, tokenizer=own_or_given(reference))
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "sentences": len(sents)}
