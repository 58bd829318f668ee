"""Streaming calibration: run the model in ONNX Runtime on text windows, keep only statistics.

The observed tensors (inputs of every quantizable linear layer, and with the "kv" observer the
KV-cache outputs present.{i}.key/value) are exposed as extra graph outputs of a temporary copy of
the graph that shares the original weights file; each window's activations update mergeable
statistics (eqcompiler/calibration/observers.py) and are dropped, so memory does not grow with the window count.

With decode_steps=N, each prefill window is followed by N single-token decode steps that feed the
window's present KV back as past (the next tokens of the text, teacher-forced), so decode-time
activations (one token attending to a long cache) are calibrated too.

`Calibrator` computes statistics for any subset of windows; `calibrate()` runs all of them in one
process and eqcompiler/calibration/distributed.py shards them across ranks and merges with collectives.

With stream_layers (eqcompiler/calibration/layer_stream.py) the graph runs one decoder layer at a time over all
windows instead of one whole-graph session per process, so peak memory is one layer's weights (plus
the small per-window boundary tensors), not the model; the statistics are the same. stream_layers=None
chooses it when the weights exceed layer_stream.AUTO_FRACTION of the available memory.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx

from eqcompiler.artifact import folder as art_mod
from eqcompiler.artifact.folder import max_positions
from eqcompiler.calibration.activation_rows import RowRequest, RowTaker, TakenRows
from eqcompiler.data import calibration_ids, load_tokenizer, read_text, windows
from eqcompiler.errors import EqcError, NumericsError
from eqcompiler.compile.graph import find_linear_sites
from eqcompiler.calibration.observers import DEFAULT_OBSERVERS, observe_activation, observe_kv, parse_observers, row_ids
from eqcompiler.runtime.memory import release_freed_memory
from eqcompiler.runtime.session import causal_feed, make_session
from eqcompiler.calibration.stats import CalibrationStats, TensorStats

Progress = Callable[[int, int], None]


def observed_tensors(model_path: pathlib.Path) -> list[str]:
    """Names of the activations feeding quantizable linear layers, in graph order."""
    model = art_mod.load_ir(model_path)
    seen: dict[str, None] = {}
    for site in find_linear_sites(model.graph):
        if site.activation.name:
            seen.setdefault(site.activation.name, None)
    if not seen:
        raise EqcError(f"'{model_path}' has no quantizable layer (MatMul/Gemm with a constant weight) to calibrate")
    return list(seen)


def instrumented_session(model_path: pathlib.Path, tensors: list[str], threads: int | None = None) -> Any:
    """A session on the graph with `tensors` as extra outputs, reading the original weights file.

    The graph (without weights) is passed as bytes and ORT is pointed at the artifact folder for
    external data, so nothing is copied and nothing is written.
    """
    proto = onnx.load(str(model_path), load_external_data=False)
    existing = {o.name for o in proto.graph.output}
    for name in tensors:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return make_session(proto.SerializeToString(), threads=threads, external_data_dir=model_path.parent)


def check_options(samples: int, seq_len: int, decode_steps: int = 0) -> None:
    """Refuse window options no model can run (one line, exit 2)."""
    if samples < 1:
        raise EqcError(f"--samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise EqcError(f"window length must be at least 2 tokens, got {seq_len}")
    if decode_steps < 0:
        raise EqcError(f"--decode-steps must be 0 or more, got {decode_steps}")


def check_positions(folder: pathlib.Path, seq_len: int, decode_steps: int = 0) -> None:
    """Refuse windows longer than the positions the model was built for, before any session (exit 2)."""
    limit = max_positions(folder)
    if limit is not None and seq_len + decode_steps > limit:
        raise EqcError(f"--seq-len {seq_len}" + (f" plus --decode-steps {decode_steps}" if decode_steps else "")
                       + f" exceeds the {limit} positions the model was built for (config.json); use --seq-len "
                       f"{limit - decode_steps} or less")


def _check_finite(name: str, x: np.ndarray, skip_nonfinite: bool) -> np.ndarray:
    if np.isfinite(x).all():
        return x
    if skip_nonfinite:
        return np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    raise NumericsError(f"activation '{name}' has NaN or Inf during calibration (pass --skip-nonfinite to ignore them)")


class Calibrator:
    """Everything needed to calibrate one model on one text, for any subset of its windows."""

    def __init__(self, model: str | pathlib.Path, text_path: str | pathlib.Path, samples: int, seq_len: int,
                 observers: Iterable[str] | str | None = DEFAULT_OBSERVERS, decode_steps: int = 0,
                 skip_nonfinite: bool = False, threads: int | None = None, stream_layers: bool | None = False,
                 tokenizer: str | pathlib.Path | None = None, rows_for: RowRequest | None = None) -> None:
        check_options(samples, seq_len, decode_steps)
        self.art = art_mod.resolve_artifact(model)
        self.model_path = art_mod.model_file(self.art)
        self.text_path = text_path
        self.observers = parse_observers(observers)
        self.seq_len, self.decode_steps, self.skip_nonfinite, self.threads = seq_len, decode_steps, skip_nonfinite, threads
        if self.art.task not in ("causal-lm", "causal-lm-nocache", "encoder"):
            raise EqcError(f"'{model}' is a {self.art.task} graph (no text inputs): calibrate it with --data "
                           "INPUTS.npz (docs/bring-your-own-onnx.md), or state its kind with --kind")
        self.causal = self.art.task in ("causal-lm", "causal-lm-nocache")
        if decode_steps and not self.causal:
            raise EqcError(f"--decode-steps needs a causal LM; '{model}' is a {self.art.task} model")
        if "kv" in self.observers and self.art.task != "causal-lm":
            raise EqcError(f"the 'kv' observer needs a causal LM with a KV cache; '{model}' is a {self.art.task} model")
        self.linear_inputs = observed_tensors(self.model_path)  # the model is checked first, then the text
        text, self.text_sha = read_text(text_path)
        check_positions(self.art.folder, seq_len, decode_steps)  # before tokenizing and any session
        # An explicit tokenizer is recorded (absolute) so that the searches a compile runs read the same tokens.
        self.tokenizer = str(pathlib.Path(tokenizer).resolve()) if tokenizer is not None else None
        loaded = load_tokenizer(self.art.folder, self.tokenizer)
        self.ids, self.frame = calibration_ids(loaded, text, seq_len, samples, self.causal, extra=decode_steps)
        # A window needs seq_len tokens plus decode_steps following tokens to feed the decode steps.
        available = (len(self.ids) - decode_steps) // seq_len
        if available < 1:
            raise EqcError(f"text has {len(self.ids)} tokens, fewer than one window of {seq_len}"
                           + (f" plus {decode_steps} decode tokens" if decode_steps else ""))
        self.n_windows = min(samples, available)
        self._session: Any = None
        self._fingerprint: str | None = None
        self.kv_outputs: list[str] = []
        if stream_layers is None:
            from eqcompiler.calibration.layer_stream import auto_stream

            self.stream_layers, self.stream_reason = auto_stream(self.model_path)
        else:
            self.stream_layers, self.stream_reason = stream_layers, ("--stream-layers" if stream_layers else "")
        if self.stream_layers:
            self.kv_outputs = self._graph_kv_outputs()
        # A --for search's rows, kept from this run's windows (whole-graph session only: a streamed run yields
        # layer by layer, and the search, if any, samples them itself)
        self.row_taker = self._row_taker(rows_for, loaded, text) if rows_for and not self.stream_layers else None

    def _row_taker(self, request: RowRequest, tokenizer: Any, text: str) -> RowTaker | None:
        """A taker of the rows sample_activation_rows would sample, when its windows (tokenized as it tokenizes
        them: a shorter prefix of the text) are the first windows of this run, compared token by token."""
        ids, _ = calibration_ids(tokenizer, text, self.seq_len, request.count, self.causal)
        if len(ids) < self.seq_len:
            return None  # the search refuses such a text itself
        wanted = list(windows(ids, self.seq_len, request.count))
        ours = [self.ids[i * self.seq_len:(i + 1) * self.seq_len][None, :] for i in range(len(wanted))]
        if len(wanted) > self.n_windows or not all(np.array_equal(a, b) for a, b in zip(wanted, ours)):
            return None
        return RowTaker(self.linear_inputs, len(wanted), self.seq_len, request.rows)

    def close(self) -> None:
        """Drop the session (its memory returns with release_freed_memory)."""
        self._session = None

    @property
    def session(self) -> Any:
        if self._session is None:
            probe = instrumented_session(self.model_path, self.linear_inputs, threads=self.threads)
            self.kv_outputs = [o.name for o in probe.get_outputs() if o.name.startswith("present.")]
            if (self.decode_steps or "kv" in self.observers) and not self.kv_outputs:
                raise EqcError(f"'{self.model_path}' has no present.* KV-cache outputs to decode with or observe")
            self._session = probe
        return self._session

    def _graph_kv_outputs(self) -> list[str]:
        """present.* outputs read from the graph file (streaming never opens a whole-graph session)."""
        proto = onnx.load(str(self.model_path), load_external_data=False)
        kv = [o.name for o in proto.graph.output if o.name.startswith("present.")]
        if (self.decode_steps or "kv" in self.observers) and not kv:
            raise EqcError(f"'{self.model_path}' has no present.* KV-cache outputs to decode with or observe")
        return kv

    def new_stats(self) -> dict[str, TensorStats]:
        if not self.stream_layers:
            _ = self.session  # opening the session lists the KV outputs
        names = list(self.linear_inputs)
        if "kv" in self.observers:
            names += self.kv_outputs
        return {n: TensorStats() for n in names}

    def run(self, indices: Sequence[int], stats: dict[str, TensorStats] | None = None,
            progress: Progress | None = None, on_window: Callable[[int], None] | None = None) -> dict[str, TensorStats]:
        """Observe windows `indices` (0-based positions in the text) into `stats`."""
        stats = self.new_stats() if stats is None else stats
        if self.stream_layers:
            return self._run_streamed(list(indices), stats, progress, on_window)
        for done, index in enumerate(indices, 1):
            if on_window is not None:
                on_window(index)
            self._window(index, stats)
            if progress:
                progress(done, len(indices))
        return stats

    def _run_streamed(self, indices: list[int], stats: dict[str, TensorStats], progress: Progress | None,
                      on_window: Callable[[int], None] | None) -> dict[str, TensorStats]:
        """Stage-major: every window through layer 0, then through layer 1, ... (layer_stream)."""
        from eqcompiler.calibration.layer_stream import StreamedRunner, window_runs

        if not indices:
            return stats
        for index in indices:
            if on_window is not None:
                on_window(index)
        need_kv = bool(self.decode_steps) or "kv" in self.observers
        runner = StreamedRunner(self.model_path, list(self.linear_inputs) + (self.kv_outputs if need_kv else []),
                                threads=self.threads)
        runs = window_runs(self.ids, [i * self.seq_len for i in indices], self.seq_len, self.decode_steps,
                           self.causal, runner.graph_inputs, _encoder_feed)

        def observe(name: str, value: np.ndarray, w: int, r: int) -> None:
            first = 0 if r == 0 else self.seq_len + r - 1
            self._observe(stats, name, value, kv_slice=r > 0, window=indices[w], first_position=first)

        runner.run(runs, observe, kv_carry=bool(self.decode_steps), progress=progress)
        return stats

    def _observe(self, stats: dict[str, TensorStats], name: str, value: np.ndarray, kv_slice: bool = False,
                 window: int = 0, first_position: int = 0) -> None:
        value = _check_finite(name, value, self.skip_nonfinite)
        if name in self.kv_outputs:
            if "kv" in self.observers:
                observe_kv(stats[name], value[:, :, -1:, :] if kv_slice else value)
        elif name in stats:
            rows = row_ids(window, first_position, value.size // value.shape[-1]) if "sample" in self.observers else None
            observe_activation(stats[name], value, self.observers, rows=rows)

    def _window(self, index: int, stats: dict[str, TensorStats]) -> None:
        session = self.session
        start = index * self.seq_len
        window = self.ids[start:start + self.seq_len][None, :]
        need_kv = bool(self.decode_steps) or "kv" in self.observers
        wanted = list(self.linear_inputs) + (self.kv_outputs if need_kv else [])
        feed = causal_feed(session, window) if self.causal else _encoder_feed(window)
        values = dict(zip(wanted, session.run(wanted, feed)))
        if self.row_taker is not None:  # ORT's values, before an observer reads them (as the search samples them)
            for name in self.linear_inputs:
                self.row_taker.observe(index, name, values[name])
        for name, value in values.items():
            self._observe(stats, name, value, window=index)
        past_len = self.seq_len
        for step in range(self.decode_steps):
            past = {n.replace("present.", "past_key_values.", 1): values[n] for n in self.kv_outputs}
            token = self.ids[start + self.seq_len + step:start + self.seq_len + step + 1][None, :]
            values = dict(zip(wanted, session.run(wanted, causal_feed(session, token, past=past, past_len=past_len))))
            for name, value in values.items():  # kv_slice: only the new token's cache entries
                self._observe(stats, name, value, kv_slice=True, window=index, first_position=self.seq_len + step)
            past_len += 1
        del values

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (computed once: it reads every weight)."""
        if self._fingerprint is None:
            self._fingerprint = art_mod.model_fingerprint(self.model_path)
        return self._fingerprint

    def meta(self, windows: int, **more: Any) -> dict[str, Any]:
        """The statistics header: what the statistics depend on. Facts about the run (its time, the worker and
        thread counts) are left out, so the same model, data and options give the same file."""
        return {
            "model_fingerprint": self.fingerprint,
            "data": {"path": str(self.text_path), "sha256": self.text_sha, "samples": windows,
                     "seq_len": self.seq_len, "decode_steps": self.decode_steps,
                     "special_tokens": [list(map(int, self.frame[0])), list(map(int, self.frame[1]))],
                     **({"tokenizer": self.tokenizer,
                         "tokenizer_sha256": art_mod.tokenizer_digest(pathlib.Path(self.tokenizer))}
                        if self.tokenizer else {})},
            "observers": list(self.observers),
            "stream_layers": self.stream_layers,  # (not why: that depends on free memory, the file must not)
            **more,
        }


def calibrate(model: str | pathlib.Path, text_path: str | pathlib.Path, samples: int, seq_len: int,
              out: pathlib.Path | None = None, overwrite: bool = True, skip_nonfinite: bool = False,
              progress: Progress | None = None, threads: int | None = None,
              observers: Iterable[str] | str | None = DEFAULT_OBSERVERS, decode_steps: int = 0,
              stream_layers: bool | None = False, tokenizer: str | pathlib.Path | None = None) -> CalibrationStats:
    """Compute statistics over `samples` windows of `seq_len` tokens in this process; write them to `out` if given.

    stream_layers: True runs one decoder layer at a time (bounded memory), None decides by model size.
    Progress then counts stages, not windows.
    """
    cal = Calibrator(model, text_path, samples, seq_len, observers=observers, decode_steps=decode_steps,
                     skip_nonfinite=skip_nonfinite, threads=threads, stream_layers=stream_layers, tokenizer=tokenizer)
    return run_calibration(cal, out, overwrite, progress)[0]


def run_calibration(cal: Calibrator, out: pathlib.Path | None = None, overwrite: bool = True,
                    progress: Progress | None = None) -> tuple[CalibrationStats, TakenRows | None]:
    """All of `cal`'s windows in this process (written to `out` if given), and the rows it was asked to keep
    for a search (Calibrator's rows_for; None when not asked or not its windows)."""
    stats = cal.run(range(cal.n_windows), progress=progress)
    result = CalibrationStats(meta=cal.meta(cal.n_windows), tensors=stats)
    taken = cal.row_taker.finish(str(cal.model_path), result.meta["data"]) if cal.row_taker is not None else None
    cal.row_taker = None
    cal.close()
    release_freed_memory()  # the session's memory, before a --for search runs the model again
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result, taken


def tqdm_progress(label: str, enabled: bool = True) -> tuple[Progress | None, Callable[[], None]]:
    """A tqdm bar on stderr (shown only on a terminal) as a progress callback, and its closer."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def show(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=label, unit="window", disable=None, leave=False)
        bar["bar"].n = done
        bar["bar"].refresh()

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return show, close


def _encoder_feed(window: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": window, "attention_mask": np.ones_like(window), "token_type_ids": np.zeros_like(window)}
