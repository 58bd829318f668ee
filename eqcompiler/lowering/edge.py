"""Edge runtimes (`eqc compile --target ort-mobile | web`): what the compiled graph needs from the runtime,
the refusal of graphs it cannot run, and the ORT-format model a minimal ONNX Runtime build loads.

Both edge runtimes are ONNX Runtime's CPU kernels built for another place: ort-mobile is a minimal (ORT
format only) build for a phone, usually reduced to the operators the model uses; web is onnxruntime-web's
WASM backend (the CPU provider compiled to WebAssembly, contrib ops included). Neither can load eqc's op
library, so `ai.eqc` ops, ops in a domain ORT does not know and ops at an opset version no CPU kernel
covers are refused at compile time, before anything is written. What is runnable is decided from this
onnxruntime's own kernel registry (`get_all_opkernel_def`), the same CPU provider those builds compile.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import pathlib
from typing import Any

import onnx
import onnx_ir as ir

from eqcompiler.errors import EqcError

EDGE_TARGETS = {
    "ort-mobile": "a minimal ONNX Runtime build (ORT format, CPU provider)",
    "web": "onnxruntime-web's WASM backend",
}
ORT_MODEL_FILE = "model.ort"
# onnxruntime.tools.convert_onnx_models_to_ort names the reduced-build operator list after the model.
OPS_CONFIG_FILE = "model.required_operators.config"
DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops ONNX Runtime resolves while loading the graph, without a kernel.
NO_KERNEL_OPS = {("", "Constant")}


@functools.lru_cache(maxsize=1)
def _cpu_kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    """{(domain, op): [(since_from, since_to)]} of onnxruntime's CPU kernels."""
    from onnxruntime.capi import _pybind_state as C

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            domain = "" if k.domain == "ai.onnx" else k.domain
            kernels.setdefault((domain, k.op_name), []).append(tuple(k.version_range))
    return kernels


def graph_ops(model: ir.Model) -> dict[str, dict[str, Any]]:
    """{domain: {"opset": version, "ops": sorted op types}} of every node, subgraphs included."""
    found: dict[str, set[str]] = {}
    for node in model.graph.all_nodes():
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        found.setdefault(domain, set()).add(node.op_type)
    opsets = {("" if d in DEFAULT_DOMAINS else d): v for d, v in model.opset_imports.items()}
    return {("ai.onnx" if d == "" else d): {"opset": opsets.get(d), "ops": sorted(ops)} for d, ops in sorted(found.items())}


def _schema(op: str, domain: str, opset: int | None) -> Any:
    if opset is None:
        return None
    try:
        return onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _since_version(op: str, domain: str, opset: int | None) -> int | None:
    schema = _schema(op, domain, opset)
    return None if schema is None else schema.since_version


def _is_function(op: str, domain: str, opset: int | None) -> bool:
    """An ONNX op defined as a function of other ops (CastLike, GroupNormalization, ...): ORT inlines it."""
    schema = _schema(op, domain, opset) if domain == "" else None
    return schema is not None and (schema.has_function or schema.has_context_dependent_function)


def unrunnable_ops(model: ir.Model) -> list[str]:
    """'domain::Op' (or 'Op' in the ONNX domain, with its opset) for every op no CPU kernel of this onnxruntime
    runs at the graph's opset; sorted."""
    kernels = _cpu_kernels()
    bad = []
    for domain, entry in graph_ops(model).items():
        key_domain = "" if domain == "ai.onnx" else domain
        for op in entry["ops"]:
            if (key_domain, op) in NO_KERNEL_OPS:
                continue
            ranges = kernels.get((key_domain, op))
            since = _since_version(op, key_domain, entry["opset"]) if key_domain in ("", "com.microsoft") else None
            if ranges and (since is None or any(lo <= since <= hi for lo, hi in ranges)):
                continue
            if _is_function(op, key_domain, entry["opset"]):
                continue
            bad.append(f"{op} (opset {entry['opset']})" if key_domain == "" else f"{domain}::{op}")
    return sorted(bad)


def refuse_unrunnable(model: ir.Model, target: str) -> None:
    """EqcError (exit 2) naming every op `target`'s runtime cannot run; called before the artifact is written."""
    bad = unrunnable_ops(model)
    if bad:
        raise EqcError(f"--target {target}: {EDGE_TARGETS[target]} cannot run {len(bad)} op type"
                       f"{'s' * (len(bad) > 1)} of the compiled graph: {', '.join(bad)}; compile for --target ort-cpu "
                       "(eqc's op library) or portable instead")


def write_ort_format(folder: pathlib.Path) -> dict[str, Any]:
    """Convert folder/model.onnx to folder/model.ort and write the reduced-build operator list beside it with
    onnxruntime's own tool (onnxruntime.tools.convert_onnx_models_to_ort), optimized for ARM and fixed at
    conversion (ORT format's 'Fixed' style: the minimal build needs no optimizer); returns what the manifest
    records. The ops listed are those of the optimized graph, i.e. what the minimal build must include."""
    import onnxruntime as ort
    from onnxruntime.tools import convert_onnx_models_to_ort as conv
    from onnxruntime.tools.ort_format_model import utils as ort_utils  # noqa: F401  (fails early if absent)

    folder = pathlib.Path(folder)
    log = io.StringIO()
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its INFO line names the staging path
    previous = ort.get_default_logger_severity() if hasattr(ort, "get_default_logger_severity") else 2
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(log):
            conv.convert_onnx_models_to_ort(folder / "model.onnx", output_dir=folder,
                                            optimization_styles=[conv.OptimizationStyle.Fixed], target_platform="arm")
    except Exception as exc:  # ORT could not create a session for the graph
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise EqcError(f"--target ort-mobile: onnxruntime could not convert the graph to ORT format: {first}") from None
    finally:
        ort.set_default_logger_severity(previous)
    if not (folder / ORT_MODEL_FILE).is_file() or not (folder / OPS_CONFIG_FILE).is_file():
        raise EqcError(f"--target ort-mobile: onnxruntime's converter wrote no {ORT_MODEL_FILE} / {OPS_CONFIG_FILE} "
                       f"({log.getvalue().strip().splitlines()[-1:]})")
    config = folder / OPS_CONFIG_FILE
    # The tool's header comment names the path it converted (the staging folder): name the file instead, so
    # the same inputs give the same bytes.
    config.write_text("".join(f"# - {ORT_MODEL_FILE}\n" if line.startswith("# - ") else line
                              for line in config.read_text().splitlines(keepends=True)))
    return {"ort_format": {"model": ORT_MODEL_FILE, "operator_config": OPS_CONFIG_FILE,
                           "ops": read_ops_config(config), "converted_with_onnxruntime": ort.__version__,
                           "optimization": "level all, fixed at conversion (ORT format 'Fixed' style), for ARM"}}


def read_ops_config(path: pathlib.Path) -> dict[str, dict[str, list[str]]]:
    """{domain: {opset: [ops]}} from a reduced-build config ('domain;opset;Op1,Op2' lines, '#' comments)."""
    ops: dict[str, dict[str, list[str]]] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = line.split(";", 2)
        ops.setdefault(domain, {})[opset] = sorted(n.split("{")[0].strip() for n in names.split(",") if n.strip())
    return ops


# A page fetches each external-data file into one ArrayBuffer and hands it to onnxruntime-web by the exact
# `location` string the graph names; browsers cap one buffer (Chromium: 2 GiB on some builds), and a file no
# larger than this loads everywhere. Larger weights are split over model.onnx.data, model.onnx.data.1, ...
WEB_MAX_FILE_BYTES = (2 << 30) - (64 << 20)
WEB_MAX_GRAPH_BYTES = WEB_MAX_FILE_BYTES


def lay_out_for_web(folder: pathlib.Path, max_bytes: int | None = None) -> dict[str, Any]:
    """Split folder/model.onnx's external data into files of at most `max_bytes` (whole tensors, in graph order;
    a tensor larger than that gets a file of its own) and return what the manifest records: each file and its
    size, in the order the page passes them to onnxruntime-web as `externalData`."""
    from eqcompiler.artifact import folder as art_mod

    max_bytes = WEB_MAX_FILE_BYTES if max_bytes is None else max_bytes
    folder = pathlib.Path(folder)
    model_path = folder / art_mod.MODEL_FILE
    proto = onnx.load(str(model_path), load_external_data=False)
    source = folder / art_mod.DATA_FILE
    if source.is_file() and source.stat().st_size > max_bytes:
        _split_external_data(proto, folder, source, max_bytes)
        onnx.save(proto, str(model_path))
    files = {art_mod.MODEL_FILE: model_path.stat().st_size}
    for location in art_mod.external_data_locations(proto):
        files[location] = (folder / location).stat().st_size
    if files[art_mod.MODEL_FILE] > WEB_MAX_GRAPH_BYTES:  # ir.save keeps the weights outside; only a huge graph
        raise EqcError(f"--target web: the graph file is {files[art_mod.MODEL_FILE]} bytes, over the "
                       f"{WEB_MAX_GRAPH_BYTES} a page can fetch in one buffer")
    return {"files": files, "external_data": [loc for loc in files if loc != art_mod.MODEL_FILE]}


def _split_external_data(proto: onnx.ModelProto, folder: pathlib.Path, source: pathlib.Path, max_bytes: int) -> None:
    tensors = [t for t in onnx.external_data_helper._get_all_tensors(proto)
               if t.data_location == onnx.TensorProto.EXTERNAL]
    out, index, written = None, 0, 0
    with open(source, "rb") as src:
        try:
            for tensor in tensors:
                info = {e.key: e.value for e in tensor.external_data}
                length = int(info.get("length", 0))
                if out is None or (written and written + (-written % 4096) + length > max_bytes):
                    if out is not None:
                        out.close()
                        index += 1
                    name = source.name + (f".{index}" if index else "")
                    out, written = open(folder / (name + ".part"), "wb"), 0
                src.seek(int(info.get("offset", 0)))
                data = src.read(length)
                pad = -written % 4096  # aligned offsets, as onnx and ir write them
                out.write(b"\0" * pad)
                written += pad
                del tensor.external_data[:]
                for key, value in (("location", name), ("offset", str(written)), ("length", str(len(data)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                out.write(data)
                written += len(data)
        finally:
            if out is not None:
                out.close()
    for part in folder.glob(source.name + "*.part"):
        part.replace(part.with_suffix(""))
