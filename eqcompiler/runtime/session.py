"""ONNX Runtime sessions and feeds for eqc artifacts."""
from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import onnxruntime as ort

from eqcompiler.errors import EqcError

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


ORT_CONFIG_ENV = "EQC_ORT_CONFIG"


def ort_config_entries() -> dict[str, str]:
    """Session config entries for every session eqc opens, from EQC_ORT_CONFIG="key=value;key=value"
    (`eqc eval --ort-config` sets it), e.g. session.qdq_matmulnbits_accuracy_level=0."""
    entries = {}
    for item in filter(None, (x.strip() for x in os.environ.get(ORT_CONFIG_ENV, "").split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EqcError(f"{ORT_CONFIG_ENV}: '{item}' is not KEY=VALUE")
        entries[key.strip()] = value.strip()
    return entries


def make_session(model: str | pathlib.Path | bytes, threads: int | None = None,
                 external_data_dir: pathlib.Path | None = None) -> ort.InferenceSession:
    """A CPU session; registers eqc's custom op library when the graph uses the ai.eqc domain.

    `model` is a path, or serialized bytes whose external data lives in `external_data_dir`.
    """
    opts = ort.SessionOptions()
    if external_data_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    opts.log_severity_level = 3
    for key, value in ort_config_entries().items():
        opts.add_session_config_entry(key, value)
    if threads is None:
        threads = int(os.environ.get("EQC_THREADS", "0"))
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        from eqcompiler.runtime import custom_ops

        if not isinstance(model, bytes) and custom_ops.uses_eqc_domain(str(model)):
            custom_ops.register(opts)
    except ImportError:
        pass
    source = model if isinstance(model, bytes) else str(model)
    try:
        # MatMulAddFusion rebuilds an int8 activation QuantizeLinear with a uint8 zero point on some
        # static-shape graphs and then refuses the graph it made (found by tools/fuzz_recipes.py).
        session = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=["MatMulAddFusion"])
    except Exception as exc:  # ORT raises its own exception types with multi-line messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = external_data_dir if isinstance(model, bytes) else model
        raise EqcError(f"ONNX Runtime cannot load '{where}': {first}") from None
    # where empty_past looks up a KV head size the graph leaves symbolic (the graph and the folder beside it)
    session.eqc_model_source = (model, external_data_dir if isinstance(model, bytes) else pathlib.Path(model).parent)
    from eqcompiler.artifact.model_kind import active_input_map

    mapping = active_input_map()
    return session if mapping is None else MappedSession(session, mapping)


class _Renamed:
    """A NodeArg under its role's name (shape and type unchanged)."""

    def __init__(self, arg: Any, name: str) -> None:
        self.name, self.shape, self.type = name, arg.shape, arg.type


class MappedSession:
    """A session on a graph eqc did not export (artifact/model_kind.py): it shows the graph's inputs under their
    roles (input_ids, attention_mask, ...), renames the feeds eqc builds to the graph's names, and drops a role
    feed the graph does not take (a BERT exported without token_type_ids)."""

    def __init__(self, session: ort.InferenceSession, mapping: dict[str, str]) -> None:
        self._session = session
        self._graph_inputs = {i.name for i in session.get_inputs()}
        # Only names this graph has: a reference model beside a mapped one (eval --embed-ref) keeps its own names.
        self._to_graph = {role: name for name, role in mapping.items() if name in self._graph_inputs}

    def __getattr__(self, attr: str) -> Any:  # everything else: the session's own
        return getattr(self._session, attr)

    def get_inputs(self) -> list[Any]:
        roles = {name: role for role, name in self._to_graph.items()}
        return [_Renamed(i, roles.get(i.name, i.name)) for i in self._session.get_inputs()]

    def graph_feed(self, feed: dict[str, Any]) -> dict[str, Any]:
        renamed = {self._to_graph.get(k, k): v for k, v in feed.items()}
        return {k: v for k, v in renamed.items() if k in self._graph_inputs}

    def run(self, output_names: Any, feed: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return self._session.run(output_names, self.graph_feed(feed), *args, **kwargs)

    def io_binding(self) -> "_MappedBinding":  # the KV-cache loop (runtime/decode.py) binds inputs by role
        return _MappedBinding(self._session.io_binding(), self._to_graph, self._graph_inputs)

    def run_with_iobinding(self, binding: Any, *args: Any) -> Any:
        return self._session.run_with_iobinding(getattr(binding, "binding", binding), *args)


class _MappedBinding:
    """An IOBinding that binds a role's input under the graph's name (and skips a role the graph does not take)."""

    def __init__(self, binding: Any, to_graph: dict[str, str], graph_inputs: set[str]) -> None:
        self.binding, self._to_graph, self._graph_inputs = binding, to_graph, graph_inputs

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.binding, attr)

    def _bind(self, method: str, name: str, value: Any) -> None:
        name = self._to_graph.get(name, name)
        if name in self._graph_inputs:
            getattr(self.binding, method)(name, value)

    def bind_cpu_input(self, name: str, value: Any) -> None:
        self._bind("bind_cpu_input", name, value)

    def bind_ortvalue_input(self, name: str, value: Any) -> None:
        self._bind("bind_ortvalue_input", name, value)


def empty_past(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors for every past input, so the graph runs as prefill."""
    from eqcompiler.artifact.kv_layout import HEAD_SIZE, HEADS, past_shape_hints

    feed = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            dims = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(inp.shape)]
            if len(dims) == 4 and not all(isinstance(dims[i], int) for i in (HEADS, HEAD_SIZE)):
                if not hasattr(session, "eqc_past_hints"):  # once per session: eval prefills every window
                    source = getattr(session, "eqc_model_source", None)
                    session.eqc_past_hints = past_shape_hints(*source) if source else None
                hints = session.eqc_past_hints
                if hints:  # a graph that leaves them symbolic (onnxruntime-genai's builder: 'kv_cache_dim')
                    dims[HEADS] = dims[HEADS] if isinstance(dims[HEADS], int) else hints[0]
                    dims[HEAD_SIZE] = dims[HEAD_SIZE] if isinstance(dims[HEAD_SIZE], int) else hints[1]
            if any(not isinstance(d, int) for d in dims):
                raise EqcError(f"past input '{inp.name}' has unknown dims {inp.shape} and nothing beside the model "
                               "states them (an eqc manifest, genai_config.json or config.json)")
            feed[inp.name] = np.zeros(dims, dtype=_ORT_TYPES.get(inp.type, np.float32))
    return feed


def causal_feed(session: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
                past_len: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a causal step: ids [B, S], full attention mask, positions after the past."""
    batch, seq = ids.shape
    names = {i.name for i in session.get_inputs()}
    feed: dict[str, Any] = {"input_ids": ids.astype(np.int64)}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
    feed.update(past if past is not None else empty_past(session, batch))
    return feed
