"""Layer-streamed calibration: run the graph one decoder layer at a time, never holding every weight.

A whole-graph ONNX Runtime session holds every weight (a 3B fp32 model: 12 GB). Here the graph is
cut into stages in topological order, one per decoder layer, and each stage runs as its own small
session over all calibration windows before the next is opened:

- Stage assignment (`plan_stages`), generic over exporters: a node's *layer key* is the largest
  layer index found in the names of the initializers it reads (the first integer path component
  between dots or slashes: `model.layers.7.mlp.up_proj.weight_t`, `encoder.layer.7.output.dense.weight`,
  `transformer.h.7.`, models/synthetic.py's `model/layers.7/mlp/up_proj.weight_t`).
  A forward pass gives every node the lower bound lo = max(own key, lo of its producers); a backward
  pass puts a keyed node at lo and sinks a node without a key (Constant, Shape, softmax, residual
  Add, rotary cos/sin, mask, ...) to the earliest stage among its consumers (at lo when it has none).
  Every edge then runs from a stage to the same or a later one, so each stage only needs tensors of
  graph inputs and earlier stages, whatever the node names or their order in the file.
- Each stage is a ModelProto of its nodes (in original order, hence topological), the initializers
  they read (external-data references copied as they are: ORT is pointed at the artifact folder and
  reads only those ranges; nothing is written anywhere), inputs = what it reads from graph inputs and
  earlier stages, outputs = what later stages read plus the watched tensors (linear inputs, KV).
- Boundary tensors (hidden state, mask, cos/sin: windows x seq x hidden) are kept per window in
  memory and dropped after the last stage that reads them; each stage's session is released before
  the next opens, so the peak is one layer's weights plus the boundaries.

Decode steps run inside each stage: window w's prefill, then its steps, with the stage's own present
KV fed back as its past (so present.i must come from the stage that reads past_key_values.i, which
the stage rule guarantees for every exporter eqc knows; otherwise a clear error).
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from eqcompiler.errors import EqcError

# The first integer path component (between dots or slashes) of an initializer name is its layer index.
LAYER_INDEX = re.compile(r"(?:^|[./])(\d+)[./]")
# Stream automatically when the weights exceed this fraction of the memory available now.
AUTO_FRACTION = 0.25

Observe = Callable[[str, np.ndarray, int, int], None]  # (tensor, value, window index, run index)


@dataclasses.dataclass
class Stage:
    key: int  # the stage's layer index (-1: before the first layer)
    nodes: list[onnx.NodeProto]
    inputs: list[str]  # read from graph inputs or earlier stages
    initializers: list[str]
    defined: set[str]


def layer_key(name: str) -> int | None:
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _subgraph_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scope."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    refs: set[str] = set()
    for node in graph.node:
        refs.update(n for n in node_inputs(node) if n and n not in local)
        local.update(node.output)
    return refs


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope names its If/Loop/Scan bodies read."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names += sorted(_subgraph_refs(g) - set(names))
    return names


def plan_stages(graph: onnx.GraphProto) -> list[Stage]:
    """Cut the (topologically ordered) graph into per-layer stages; see the module docstring."""
    nodes = list(graph.node)
    inits = {t.name for t in graph.initializer}
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    reads = [node_inputs(n) for n in nodes]
    keys: list[int | None] = []
    for names in reads:
        found = [k for k in (layer_key(n) for n in names if n in inits) if k is not None]
        keys.append(max(found) if found else None)
    lo = [-1] * len(nodes)
    for i, names in enumerate(reads):
        bound = [lo[producer[n]] for n in names if n in producer]
        if any(producer[n] >= i for n in names if n in producer):
            raise EqcError(f"node '{nodes[i].name or nodes[i].op_type}' reads a tensor produced later: the graph is "
                           "not topologically sorted, cannot stream it")
        lo[i] = max([keys[i] if keys[i] is not None else -1, *bound])
    consumers: dict[str, list[int]] = {}
    for i, names in enumerate(reads):
        for n in names:
            consumers.setdefault(n, []).append(i)
    stage = list(lo)
    for i in range(len(nodes) - 1, -1, -1):
        if keys[i] is None:
            later = [stage[c] for out in nodes[i].output for c in consumers.get(out, [])]
            stage[i] = max(lo[i], min(later)) if later else lo[i]
    stages: list[Stage] = []
    for key in sorted(set(stage)):
        members = [i for i in range(len(nodes)) if stage[i] == key]
        defined = {o for i in members for o in nodes[i].output if o}
        used: dict[str, None] = {}
        for i in members:
            for n in reads[i]:
                used.setdefault(n, None)
        stages.append(Stage(key=key, nodes=[nodes[i] for i in members],
                            inputs=[n for n in used if n not in defined and n not in inits],
                            initializers=[n for n in used if n in inits], defined=defined))
    return stages


def weights_bytes(model_path: pathlib.Path) -> int:
    """Bytes of the model's weights: graph file plus the external data files it references.

    An unreadable file counts as its own size: the caller's loader reports what is wrong with it.
    """
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends
        return model_path.stat().st_size if model_path.is_file() else 0
    files = {next((e.value for e in t.external_data if e.key == "location"), "")
             for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    return model_path.stat().st_size + sum((model_path.parent / f).stat().st_size for f in files
                                           if f and (model_path.parent / f).is_file())


def available_memory() -> int:
    """Memory available to new allocations without swapping (bytes; MemAvailable on Linux), from psutil."""
    import psutil

    return int(psutil.virtual_memory().available)


def auto_stream(model_path: pathlib.Path) -> tuple[bool, str]:
    """Whether to stream (weights above AUTO_FRACTION of available memory) and a sentence saying why."""
    size, avail = weights_bytes(model_path), available_memory()
    big = size > AUTO_FRACTION * avail
    verb = "exceed" if big else "are within"
    return big, (f"weights {size / 1e9:.2f} GB {verb} {AUTO_FRACTION:.0%} of available memory {avail / 1e9:.1f} GB: "
                 + ("streaming layer by layer" if big else "one whole-graph session"))


class _InputInfo:
    """What runtime.causal_feed reads from a session input (name, shape, type), from the graph proto."""

    _TYPES = {onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.FLOAT16: "tensor(float16)",
              onnx.TensorProto.INT64: "tensor(int64)", onnx.TensorProto.INT32: "tensor(int32)"}

    def __init__(self, vi: onnx.ValueInfoProto) -> None:
        t = vi.type.tensor_type
        self.name = vi.name
        self.type = self._TYPES.get(t.elem_type, "tensor(float)")
        self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


class _GraphInputs:
    def __init__(self, graph: onnx.GraphProto) -> None:
        inits = {t.name for t in graph.initializer}
        self._inputs = [_InputInfo(vi) for vi in graph.input if vi.name not in inits]

    def get_inputs(self) -> list[_InputInfo]:
        return self._inputs


class StreamedRunner:
    """Runs `runs` (per window: graph-input feeds of its prefill and decode steps) stage by stage."""

    def __init__(self, model_path: pathlib.Path, watch: Sequence[str], threads: int | None = None) -> None:
        self.model_path = model_path
        self.proto = onnx.load(str(model_path), load_external_data=False)
        self.graph = self.proto.graph
        self.stages = plan_stages(self.graph)
        self.watch = list(watch)
        self.threads = threads
        self.graph_inputs = _GraphInputs(self.graph)
        self._inits = {t.name: t for t in self.graph.initializer}
        everything = set().union(*(s.defined for s in self.stages)) | {i.name for i in self.graph.input}
        missing = [n for n in self.watch if n not in everything]
        if missing:
            raise EqcError(f"'{model_path}' has no tensor '{missing[0]}' to observe")

    def _stage_model(self, stage: Stage, outputs: list[str], feeds: dict[str, np.ndarray]) -> bytes:
        """A ModelProto for one stage; its inputs are typed from the arrays that will feed them."""
        inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(feeds[n].dtype), None)
                  for n in stage.inputs]
        graph = onnx.helper.make_graph(stage.nodes, f"stage_{stage.key}", inputs,
                                       [onnx.helper.make_empty_tensor_value_info(n) for n in outputs],
                                       initializer=[self._inits[n] for n in stage.initializers])
        model = onnx.helper.make_model(graph, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        model.functions.extend(self.proto.functions)
        return model.SerializeToString()

    def run(self, runs: list[list[dict[str, np.ndarray]]], observe: Observe, kv_carry: bool = False,
            progress: Callable[[int, int], None] | None = None) -> None:
        """runs[w][r]: graph-input feed of window w's run r (0: prefill; later: decode steps whose
        past_key_values.* come from the same stage's present.* of run r-1 when `kv_carry`)."""
        from eqcompiler.runtime.session import make_session

        later_reads: dict[str, int] = {}  # tensor -> last stage position that reads it
        for pos, stage in enumerate(self.stages):
            for n in stage.inputs:
                later_reads[n] = pos
        store: dict[str, list[list[np.ndarray | None]]] = {}
        for n in {n for s in self.stages for n in s.inputs if n in runs[0][0]}:
            store[n] = [[feed.get(n) for feed in window] for window in runs]
        watched = set(self.watch)
        for n in watched & store.keys():  # a watched graph input: observed straight from the feeds
            for w, window in enumerate(runs):
                for r, feed in enumerate(window):
                    if feed.get(n) is not None:
                        observe(n, feed[n], w, r)
        for pos, stage in enumerate(self.stages):
            carry = [n for n in stage.inputs if kv_carry and n.startswith("past_key_values.")]
            presents = {n: n.replace("past_key_values.", "present.", 1) for n in carry}
            for n, p in presents.items():
                if p not in stage.defined:
                    raise EqcError(f"cannot stream decode steps: '{p}' is not computed in the stage that reads '{n}'")
            outputs = [n for n in sorted(stage.defined)
                       if n in watched or later_reads.get(n, -1) > pos or n in presents.values()]
            missing = [n for n in stage.inputs if n not in store]
            if missing:
                raise EqcError(f"stage {stage.key} reads '{missing[0]}', which no graph input or earlier stage provides")
            if not outputs:
                continue
            example = {n: store[n][0][0] for n in stage.inputs}  # run 0 (prefill) always has every input
            session = make_session(self._stage_model(stage, outputs, example), threads=self.threads,
                                   external_data_dir=self.model_path.parent)
            for n in outputs:
                if later_reads.get(n, -1) > pos:
                    store[n] = [[None] * len(window) for window in runs]
            for w, window in enumerate(runs):
                last: dict[str, np.ndarray] = {}
                for r in range(len(window)):
                    feed = {n: (last[presents[n]] if r and n in presents else store[n][w][r]) for n in stage.inputs}
                    values = dict(zip(outputs, session.run(outputs, feed)))
                    for n, value in values.items():
                        if n in watched:
                            observe(n, value, w, r)
                        if n in store:
                            store[n][w][r] = value
                    last = {p: values[p] for p in presents.values()}
            del session
            for n in [n for n in store if later_reads.get(n, -1) <= pos]:
                del store[n]  # no later stage reads it
            if progress:
                progress(pos + 1, len(self.stages))


def window_runs(ids: np.ndarray, starts: Iterable[int], seq_len: int, decode_steps: int, causal: bool,
                graph_inputs: _GraphInputs, encoder_feed: Callable[[np.ndarray], dict[str, np.ndarray]]
                ) -> list[list[dict[str, np.ndarray]]]:
    """Graph-input feeds of every run of every window (decode steps leave their past to the runner)."""
    from eqcompiler.runtime.session import causal_feed

    out = []
    for start in starts:
        window = ids[start:start + seq_len][None, :]
        if not causal:
            out.append([encoder_feed(window)])
            continue
        runs = [causal_feed(graph_inputs, window)]  # type: ignore[arg-type]
        for step in range(decode_steps):
            token = ids[start + seq_len + step:start + seq_len + step + 1][None, :]
            feed = causal_feed(graph_inputs, token, past={}, past_len=seq_len + step)  # type: ignore[arg-type]
            runs.append(feed)
        out.append(runs)
    return out
