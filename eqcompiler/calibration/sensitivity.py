"""Measured per-layer sensitivity: KL divergence of the final logits, one layer quantized at a time.

The Gram proxy in eqcompiler.compile.bitwidth is local (how hard a weight is to quantize) and misses how
much the network amplifies one layer's error: on SmolLM2 it rates decoder layer 0's q/o/down_proj
as cheap although those layers alone cost +3.7% perplexity at int4. This module measures instead:

    kl(layer, p) = mean over tokens of KL(softmax(z_float) || softmax(z_p)),

z_p the logits of the model in which only `layer` is fake-quantized at precision p, on a few
held-out windows of the calibration text (the same windows the ppl+X% search scores; never test).
The reference z_float is the all-float PLAN, not the float model: the mixed recipe stores token
embeddings (and a tied lm_head) int8 per row in every plan, so the probe graph carries them
dequantized too; then a probe equals the compiled one-layer plan and 'float' measures 0.

Cost: one ONNX Runtime session on a copy of the float graph whose planned linear weights are
graph INPUTS, so a probe just feeds the float weight arrays (ORT reads numpy buffers in place, no
copy) except the probed layer's, which is fed as dequant(quant_p(W)) computed with the very
quantizer apply_precision_plan uses (quantize_site_weight -> QuantizedWeight.dequantize), so the
measured error is the artifact's error. One forward per (layer, quantized precision) plus one
reference; memory: the float weights once, the reference log-probabilities and one logits buffer.

The table is cached as JSON (default under $XDG_CACHE_HOME/eqc/sensitivity, or the
`sensitivity_cache` option), keyed by the statistics' model fingerprint, their calibration text
and the measurement options, so a second compile with another budget re-uses it. A recipe names
data, not places to write: `sensitivity_cache` must lie inside the user cache folder
($XDG_CACHE_HOME/eqc, else ~/.cache/eqc; a relative name is taken inside its sensitivity/ folder) or
inside a folder the caller granted with grant_cache_folder() (what a command-line flag or a Python
caller does); anything else (/etc/x, ../../x, a link leading out) is refused with exit 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from eqcompiler.artifact.atomic import staged_file
from eqcompiler.artifact.user_cache import cache_root
from eqcompiler.errors import EqcError

KL_FORMAT = 1
KL_WINDOWS = 1  # held-out calibration windows per probe (default)
KL_TOKENS = 256  # tokens of each window scored (default; a prefix of the calibration window)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of [T, V] logits (float64: int8 KLs are ~1e-5, below float32 noise)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mean_kl(ref_logp: np.ndarray, ref_p: np.ndarray, logits: np.ndarray) -> float:
    """Mean over tokens of KL(ref || softmax(logits)); clipped at 0 (rounding can go below)."""
    return max(float((ref_p * (ref_logp - log_softmax(logits))).sum(axis=-1).mean()), 0.0)


class WeightInputSession:
    """An ORT session on a copy of the float graph in which the named weights are graph inputs."""

    def __init__(self, model: ir.Model, weight_names: Sequence[str], embedding_bits: int | None = 8) -> None:
        from eqcompiler.artifact.folder import MODEL_FILE, save_ir
        from eqcompiler.compile.graph import embedding_gathers
        from eqcompiler.compile.qdq import quantize_channelwise
        from eqcompiler.runtime.session import make_session

        probe = model.clone()
        if embedding_bits:  # as apply_precision_plan stores them: int8 symmetric per row (the values it reads)
            for table in {id(g.inputs[0]): g.inputs[0] for g in embedding_gathers(probe.graph)}.values():
                w = np.asarray(table.const_value.numpy(), dtype=np.float32)
                deq = quantize_channelwise(w, axis=0, bits=embedding_bits, symmetric=True).dequantize()
                table.const_value = ir.tensor(deq, name=table.name)
        self.weights: dict[str, np.ndarray] = {}
        for name in weight_names:
            value = probe.graph.initializers.pop(name)
            array = np.ascontiguousarray(value.const_value.numpy(), dtype=np.float32)
            self.weights[name] = array
            value.const_value = None
            value.type = ir.TensorType(ir.DataType.FLOAT)
            value.shape = ir.Shape(array.shape)
            probe.graph.inputs.append(value)
        with tempfile.TemporaryDirectory(prefix="eqc-kl-") as tmp:
            save_ir(probe, pathlib.Path(tmp))
            del probe
            self.session = make_session(pathlib.Path(tmp) / MODEL_FILE)  # ORT has read the external data now

    def logits(self, ids: np.ndarray, override: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """[T, V] logits of one window [1, T], with `override` replacing some float weights."""
        from eqcompiler.runtime.session import causal_feed

        feed = causal_feed(self.session, ids)
        feed.update(self.weights)
        if override:
            feed.update(override)
        return self.session.run(["logits"], feed)[0][0]


def measure_kl(session: WeightInputSession, windows: Sequence[np.ndarray], layers: Sequence[tuple[str, str]],
               choices: Sequence[str], fake_quant: Callable[[str, str], np.ndarray],
               progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """{layer: {precision: mean KL}} for each (layer name, weight name); 'float' is 0 by definition."""
    refs = []
    for win in windows:
        logp = log_softmax(session.logits(win))
        refs.append((logp, np.exp(logp)))
    table: dict[str, dict[str, float]] = {}
    todo = [(layer, weight, p) for layer, weight in layers for p in choices if p != "float"]
    for layer, _ in layers:
        table[layer] = {p: 0.0 for p in choices if p == "float"}
    for i, (layer, weight, p) in enumerate(todo):
        override = {weight: fake_quant(weight, p)}
        kls = [mean_kl(lp, pr, session.logits(win, override)) for win, (lp, pr) in zip(windows, refs)]
        table[layer][p] = float(np.mean(kls))
        if progress:
            progress(i + 1, len(todo))
    return {layer: {p: table[layer][p] for p in choices} for layer, _ in layers}


def cache_key(stats_meta: dict[str, Any], choices: Sequence[str], windows: int, tokens: int) -> str:
    """What the measurement depends on: the model (its fingerprint), the held-out text, the options."""
    data = stats_meta.get("data") or {}
    blob = {"format": KL_FORMAT, "model": stats_meta.get("model_fingerprint"), "choices": list(choices),
            "windows": windows, "tokens": tokens,
            "text": {k: data.get(k) for k in ("path", "sha256", "samples", "seq_len", "decode_steps")}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> pathlib.Path:
    return cache_root() / "sensitivity"


_GRANTED: list[pathlib.Path] = []  # folders the user named outside any recipe (command line, Python caller)


def grant_cache_folder(folder: str | pathlib.Path) -> None:
    """Allow sensitivity_cache paths inside `folder`: for a folder the user passed on the command line or
    a Python caller chose, never for one a recipe names."""
    _GRANTED.append(pathlib.Path(os.path.expanduser(str(folder))).resolve())


def check_cache_option(option: Any) -> None:
    """Refuse a sensitivity_cache value that is not a string or leads outside the allowed folders (exit 2)."""
    if option is None:
        return
    if not isinstance(option, str) or not option or "\0" in option:
        raise EqcError(f"apply_precision_plan: sensitivity_cache must be a path or 'none', got {option!r}")
    if option.lower() != "none":
        _confined_cache(option)


def _confined_cache(option: str) -> pathlib.Path:
    """sensitivity_cache resolved (links followed) and required to lie in the cache root or a granted folder."""
    given = pathlib.Path(option)  # no '~' expansion: a recipe's '~/x' is a folder named '~' in the cache
    path = (given if given.is_absolute() else default_cache_dir() / given).resolve()
    roots = [cache_root().resolve(), *_GRANTED]
    if not any(path == root or root in path.parents for root in roots):
        raise EqcError(f"apply_precision_plan: sensitivity_cache '{option}' is outside the cache folder "
                       f"{cache_root()}; a recipe may not write elsewhere (use a path inside it, or 'none')")
    return path


def cache_path(option: str | None, key: str) -> pathlib.Path | None:
    """The cache file: a given path (a folder gets kl-<key>.json), 'none' for no cache, None for the default.

    A given path is confined (see _confined_cache) and the file itself must stay inside the allowed folders."""
    if option is not None and str(option).lower() == "none":
        return None
    if option is None:
        return default_cache_dir() / f"kl-{key}.json"
    check_cache_option(option)
    path = _confined_cache(option)
    return path / f"kl-{key}.json" if path.is_dir() or not path.suffix else path


def load_cached(path: pathlib.Path | None, key: str, layers: Sequence[str]) -> dict[str, Any] | None:
    """The cached measurement when it exists and matches `key` and the layer names; else None."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # a damaged cache is re-measured, not fatal
    if not isinstance(data, dict) or data.get("key") != key or sorted(data.get("table", {})) != sorted(layers):
        return None
    return data


def save_cached(path: pathlib.Path | None, record: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # a link planted in the cache folder must not redirect the write
        raise EqcError(f"sensitivity cache file '{path}' is a symbolic link; refused")
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def weight_entropy(w: np.ndarray, bins: int = 256) -> float:
    """Shannon entropy (bits) of the histogram of a weight's values over [min, max]: how much
    information the values carry at a fine grid; the entropy solver gives such layers more bits."""
    flat = np.asarray(w, dtype=np.float32).ravel()
    lo, hi = float(flat.min()), float(flat.max())
    if not hi > lo:
        return 0.0
    counts = np.histogram(flat, bins=bins, range=(lo, hi))[0].astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def timed_progress(label: str, every: int = 50) -> Callable[[int, int], None]:
    """A progress printer for long measurements (stderr-free: only when EQC_PROGRESS is set)."""
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        if os.environ.get("EQC_PROGRESS") and (done % every == 0 or done == total):
            print(f"{label}: {done}/{total} probes, {time.perf_counter() - start:.0f} s", flush=True)
    return report
