"""What kind of model a graph is, for every command: from the eqc manifest, from `--kind`, or detected from the
graph's inputs and outputs (a bare .onnx, or a folder without an eqc manifest).

Kinds:
- causal-lm: a causal LM with a KV cache (past_key_values.* inputs / present.* outputs);
- causal-lm-nocache: input_ids in, logits out, no cache;
- encoder: input_ids + attention_mask [+ token_type_ids] in, hidden states [batch, seq, hidden] out;
- generic: anything else (float or integer tensors that are not text); calibrated from `--data inputs.npz`.

Optimum's merged decoder (decoder_model_merged.onnx: a `use_cache_branch` input choosing between the decoder
without and with past in an If node, whose weights the passes do not see) is refused in one line, whatever the kind.

Text models whose inputs are not named the conventional way take `--input-map GRAPH_NAME=ROLE,...`
(e.g. ids=input_ids,am=attention_mask). The CLI states the choice once per process with `choose()`: it lives in
the environment (EQC_KIND, EQC_INPUT_MAP) so worker processes (bench, distributed calibration) see it too, and
runtime.session.make_session renames the conventional feeds eqc builds to the graph's own names.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

from eqcompiler.errors import EqcError
from eqcompiler.io_names import PAST, PRESENT

KINDS = ("causal-lm", "causal-lm-nocache", "encoder", "generic")
TEXT_KINDS = ("causal-lm", "causal-lm-nocache", "encoder")
ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
KIND_ENV, INPUT_MAP_ENV = "EQC_KIND", "EQC_INPUT_MAP"
_INTEGER = ("int64", "int32")
MERGED_BRANCH = "use_cache_branch"  # the boolean input of Optimum's merged decoder


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy name: float32, int64, ...
    dims: tuple[Any, ...] | None  # int, a symbolic name (str) or None per axis; None: rank unknown


@dataclasses.dataclass(frozen=True)
class ModelKind:
    kind: str
    why: str
    source: str  # manifest | --kind | detected
    input_map: dict[str, str]  # graph input name -> role (only names that differ from their role)


def _tensor(vi: Any) -> Tensor:
    import numpy as np
    import onnx

    t = vi.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name if t.elem_type else "unknown"
    except (KeyError, TypeError):
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim) \
        if t.HasField("shape") else None
    return Tensor(vi.name, dtype, dims)


@functools.lru_cache(maxsize=16)
def _graph_io(path: str, mtime_ns: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    import onnx  # here, not at the top: the CLI imports this module for KINDS

    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and friends
        raise EqcError(f"'{path}' is not a readable ONNX model ({type(exc).__name__})") from None
    inits = {i.name for i in graph.initializer}
    return (tuple(_tensor(v) for v in graph.input if v.name not in inits), tuple(_tensor(v) for v in graph.output))


def graph_io(model_path: pathlib.Path) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(inputs, outputs) of the graph, initializers that are also listed as inputs left out."""
    p = pathlib.Path(model_path)
    return _graph_io(str(p), p.stat().st_mtime_ns)


def parse_input_map(text: str | None, inputs: tuple[Tensor, ...]) -> dict[str, str]:
    """`ids=input_ids,am=attention_mask` -> {graph name: role}, every name and role checked (one line, exit 2)."""
    if not text:
        return {}
    names = [t.name for t in inputs]
    mapping: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, role = (s.strip() for s in item.partition("="))
        if not sep or not name or not role:
            raise EqcError(f"--input-map: '{item}' is not GRAPH_INPUT=ROLE (e.g. ids=input_ids)")
        if name not in names:
            raise EqcError(f"--input-map names '{name}', which is not an input of the graph (its inputs: "
                           f"{', '.join(names)})")
        if role not in ROLES:
            raise EqcError(f"--input-map: unknown role '{role}' for '{name}' (roles: {', '.join(ROLES)})")
        if role in mapping.values() or name in mapping:
            raise EqcError(f"--input-map maps '{name}' or role '{role}' twice")
        mapping[name] = role
    clash = [r for n, r in mapping.items() if r in names and r not in mapping]
    if clash:
        raise EqcError(f"--input-map: the graph already has an input named '{clash[0]}'; map that one instead")
    return {n: r for n, r in mapping.items() if n != r}


def detect(inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...], input_map: dict[str, str] | None = None
           ) -> tuple[str, str]:
    """(kind, why) from the graph's inputs and outputs, read through `input_map`."""
    roles = {(input_map or {}).get(t.name, t.name): t for t in inputs}
    past = [n for n in roles if n.startswith(PAST)]
    present = [t.name for t in outputs if t.name.startswith(PRESENT)]
    if past or present:
        return "causal-lm", f"{len(past)} {PAST}* input(s) and {len(present)} {PRESENT}* output(s): a KV cache"
    ids = roles.get("input_ids")
    if ids is None or ids.dtype not in _INTEGER:
        found = ", ".join(f"{t.name} ({t.dtype}{list(t.dims) if t.dims is not None else ''})" for t in inputs)
        return "generic", (f"no integer input_ids input (inputs: {found})" + ("" if input_map else
                           "; a text model with other input names takes --input-map NAME=input_ids,..."))
    first = outputs[0] if outputs else None
    if any(t.name == "logits" for t in outputs):
        return "causal-lm-nocache", "input_ids in, 'logits' out, no past_key_values.* inputs"
    if "attention_mask" in roles and first is not None and first.dtype.startswith("float") \
            and (first.dims is None or len(first.dims) == 3):
        extra = " + token_type_ids" if "token_type_ids" in roles else ""
        return "encoder", f"input_ids + attention_mask{extra} in, hidden states '{first.name}' [batch, seq, hidden] out"
    return "generic", ("input_ids in, but neither 'logits' out (causal LM) nor attention_mask in with hidden states "
                       "[batch, seq, hidden] out (encoder); state it with --kind")


def choose(model_path: pathlib.Path, manifest: dict[str, Any], kind: str | None = None,
           input_map: str | None = None) -> ModelKind:
    """The kind of the model at `model_path` (its eqc `manifest` may be empty), with `--kind` and `--input-map`
    checked against the graph; records the choice for this process and its workers (see module docstring)."""
    eqc = manifest.get("format") == "eqc-artifact"
    if eqc and not input_map and kind is None:  # eqc wrote it and says what it is: the graph need not be read
        _set_choice("", manifest)
        kind_ = manifest.get("task", "causal-lm")
        return ModelKind(kind_, "the eqc manifest's task", "manifest", dict(manifest.get("input_map") or {}))
    inputs, outputs = graph_io(model_path)
    _refuse_merged_decoder(model_path, inputs)
    mapping = parse_input_map(input_map, inputs) if input_map else dict(manifest.get("input_map") or {})
    if eqc:  # (an eqc manifest without a task predates encoders: a causal LM, as Artifact.task says)
        stated, source, why = manifest.get("task", "causal-lm"), "manifest", "the eqc manifest's task"
    elif kind is not None:
        stated, source, why = kind, "--kind", "stated with --kind"
    else:
        stated, why = detect(inputs, outputs, mapping)
        source = "detected"
    if stated not in KINDS:
        raise EqcError(f"unknown model kind '{stated}' (kinds: {', '.join(KINDS)})")
    if kind is not None and kind != stated:
        raise EqcError(f"--kind {kind} contradicts '{model_path.parent}': its manifest says {stated}")
    _check_roles(stated, inputs, mapping)
    _set_choice(stated if source == "--kind" else "", manifest, mapping)
    return ModelKind(stated, why, source, mapping)


def _refuse_merged_decoder(model_path: pathlib.Path, inputs: tuple[Tensor, ...]) -> None:
    if any(t.name == MERGED_BRANCH for t in inputs):
        raise EqcError(f"'{model_path.name}' is Optimum's merged decoder (a {MERGED_BRANCH} input selects the decoder "
                       "without or with past inside an If node): eqc quantizes one decoder graph with its KV cache; "
                       "export it unmerged (optimum-onnx 0.1 writes one model.onnx with past_key_values.*; older "
                       "Optimum: --no-post-process)")


def _set_choice(kind: str, manifest: dict[str, Any], mapping: dict[str, str] | None = None) -> None:
    os.environ[KIND_ENV] = kind
    # A foreign graph (or an artifact compiled from one: its manifest keeps input_map) is fed through the map.
    if "input_map" in manifest or manifest.get("format") != "eqc-artifact":
        os.environ[INPUT_MAP_ENV] = ",".join(f"{n}={r}" for n, r in (mapping or manifest.get("input_map") or {}).items())
    else:
        os.environ.pop(INPUT_MAP_ENV, None)


def _check_roles(kind: str, inputs: tuple[Tensor, ...], mapping: dict[str, str]) -> None:
    """A text kind needs the inputs eqc feeds it; say which is missing and how to map it."""
    if kind not in TEXT_KINDS:
        return
    roles = {mapping.get(t.name, t.name) for t in inputs}
    need = ["input_ids"] + (["attention_mask"] if kind == "encoder" else [])
    missing = [r for r in need if r not in roles]
    if missing:
        raise EqcError(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} model needs input(s) {', '.join(missing)}; the graph's inputs are "
                       f"{', '.join(t.name for t in inputs)}: name them with --input-map NAME={missing[0]},...")
    unfed = [t.name for t in inputs if mapping.get(t.name, t.name) not in ROLES and not t.name.startswith(PAST)]
    if unfed:
        raise EqcError(f"eqc feeds a {kind} model {', '.join(ROLES)} and {PAST}*; the graph also takes "
                       f"{', '.join(unfed)}: map it with --input-map NAME=ROLE or use --kind generic with --data")


def stated_kind() -> str | None:
    """The kind `--kind` stated for this process (None: detect)."""
    return os.environ.get(KIND_ENV) or None


def active_input_map() -> dict[str, str] | None:
    """{graph name: role} when this process feeds a graph not exported by eqc (None: feed names as they are)."""
    text = os.environ.get(INPUT_MAP_ENV)
    if text is None:
        return None
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def kind_of(model_path: pathlib.Path) -> str:
    """A model without an eqc manifest: the kind --kind stated, else the detected one."""
    stated = stated_kind()
    if stated:
        return stated
    inputs, outputs = graph_io(model_path)
    return detect(inputs, outputs, active_input_map())[0]
