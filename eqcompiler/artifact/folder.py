"""An eqc artifact: a folder with model.onnx (+ external data), manifest.json and the tokenizer.

Every command that writes a model writes a whole artifact, so `eqc eval DIR` needs no other flag.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import pathlib
import stat
from typing import Any, Iterable

import onnx
import onnx_ir as ir

from eqcompiler.artifact.manifest_schema import check_manifest
from eqcompiler.errors import EqcError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "eqc-artifact"
MANIFEST_VERSION = 1
# Files copied from one artifact into the next (tokenizer and config travel with the model): an explicit
# list of names, never anything else that lies beside the model (notes.txt, a stray dump, ...).
CARRIED_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)
CARRIED_MAX_BYTES = 64 << 20  # per carried file (a SmolLM2 tokenizer.json is 2.1 MB)


@dataclasses.dataclass
class Artifact:
    folder: pathlib.Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> pathlib.Path:
        return self.folder / MODEL_FILE

    @property
    def task(self) -> str:
        """The model kind (artifact/model_kind.py): the eqc manifest's task, else --kind or the detected kind."""
        if self.manifest.get("format") == MANIFEST_FORMAT:
            return self.manifest.get("task", "causal-lm")
        from eqcompiler.artifact.model_kind import kind_of

        return kind_of(model_file(self))

    @property
    def kv_cache(self) -> dict[str, Any] | None:
        return self.manifest.get("kv_cache")


def resolve_artifact(path: str | pathlib.Path) -> Artifact:
    """Accept an artifact folder or the model.onnx inside one (a bare .onnx file gets an empty manifest)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise EqcError(f"'{p}' does not exist")
    folder, model_path = (p, p / MODEL_FILE) if p.is_dir() else (p.parent, p)
    if not model_path.is_file():
        graphs = sorted(f.name for f in p.glob("*.onnx"))  # Optimum writes decoder_model_merged.onnx, ...
        holds = f" (it holds {', '.join(graphs[:4])}: pass the .onnx file itself)" if graphs else ""
        raise EqcError(f"'{p}' is a folder without {MODEL_FILE}: not an eqc artifact{holds}")
    manifest: dict[str, Any] = {}
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file() and model_path.name == MODEL_FILE:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EqcError(f"manifest '{manifest_path}' is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise EqcError(f"'{manifest_path}' is not an eqc manifest")
        check_manifest(manifest, str(manifest_path))
    art = Artifact(folder=folder, manifest=manifest)
    if model_path.name != MODEL_FILE:
        art = Artifact(folder=folder, manifest={"model_file": model_path.name})
    return art


def model_file(art: Artifact) -> pathlib.Path:
    return art.folder / art.manifest.get("model_file", MODEL_FILE)


def confined(folder: pathlib.Path, name: str, what: str) -> pathlib.Path:
    """The file `name` (as a model, recipe or statistics file names it) inside `folder`, resolved.

    The one place eqc turns a name found in a file into a path: an absolute name, a name that climbs out
    with '..', or one whose symbolic links lead outside the folder is refused (EqcError, exit 2).
    """
    root = pathlib.Path(folder).resolve()
    target = (root / name).resolve()
    if not name or pathlib.PurePath(name).is_absolute() or root not in target.parents:
        raise EqcError(f"{what} '{name}' outside the model folder; refused")
    return target


def external_data_locations(proto: onnx.ModelProto) -> dict[str, str]:
    """{location: first tensor naming it} of every external-data file the graph references, sorted."""
    found: dict[str, str] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        found.setdefault(location, tensor.name)
    return dict(sorted(found.items()))


def external_data_files(proto: onnx.ModelProto, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """{location: resolved path} of the graph's external-data files, each confined to `folder` and present."""
    files = {}
    for location, tensor in external_data_locations(proto).items():
        target = confined(folder, location, f"tensor '{tensor}' points at external data")
        if not target.is_file():
            raise EqcError(f"external data file '{location}' for tensor '{tensor}' is missing")
        files[location] = target
    return files


def _check_external_data(proto: onnx.ModelProto, folder: pathlib.Path) -> None:
    """Refuse external-data locations outside the model folder before anything reads them."""
    external_data_files(proto, folder)


def _graph_proto(p: pathlib.Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise EqcError(f"'{p}' is not a readable ONNX model ({type(exc).__name__})") from None


def schema_less_ops(nodes: Iterable[Any]) -> set[str]:
    """ORT contrib ops written in the ONNX domain without an ONNX schema (SimplifiedLayerNormalization in graphs
    onnxruntime-genai's builder writes), among `nodes` (NodeProtos or onnx-ir nodes): the checker cannot know
    them, so their wiring is checked, not their schema."""
    return {n.op_type for n in nodes if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)}


def check_graph(proto: onnx.ModelProto, what: str, unchecked_ops: set[str] | None = None) -> None:
    """onnx.checker on the graph of `proto` (loaded without its external data) and every initializer's byte count
    against its shape: a damaged or hand-edited graph is refused here, in one line, instead of failing inside a
    pass. External tensors are checked as graph inputs of their type and shape (the checker cannot see
    their data without reading it)."""
    _check_initializer_sizes(proto, what)
    if default_opset(proto) < CHECKED_FROM_OPSET:
        return  # older graphs are converted first (its errors name the op); the converted graph is checked on output
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    if not _sort_nodes(copy.graph):
        return  # a cycle: the compile refuses it naming a node on it (compile/pipeline._refuse_cycles)
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        kept = [t for t in copy.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        copy.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
        del copy.graph.initializer[:]
        copy.graph.initializer.extend(kept)
    for value in [*copy.graph.input, *copy.graph.output]:  # ONNX Runtime loads graph I/O of unknown rank: so do we
        if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.SetInParent()
    unchecked = schema_less_ops(copy.graph.node) if unchecked_ops is None else unchecked_ops
    if unchecked:
        for node in copy.graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in unchecked:
                node.domain = "eqc.unchecked"
        copy.opset_import.append(onnx.helper.make_opsetid("eqc.unchecked", 1))
    try:
        onnx.checker.check_model(copy)
    except (onnx.checker.ValidationError, ValueError, TypeError) as exc:
        raise EqcError(f"{what} fails onnx.checker: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None


# The opset eqc compiles at (compile/pipeline.MIN_OPSET): graphs declaring it or newer are checked as read.
CHECKED_FROM_OPSET = 21


def _sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put the nodes in topological order (ONNX asks for it; exporters do not always keep it, and eqc sorts the
    graph it writes); False when they form a cycle."""
    made = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    waiting = [sum(1 for name in node.input if name in made) for node in graph.node]
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name in made:
                readers.setdefault(made[name], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]  # a heap: the written order where it is valid
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in readers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(graph.node):
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for target, i in zip(nodes, order):
        target.CopyFrom(graph.node[i])
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _check_initializer_sizes(proto: onnx.ModelProto, what: str) -> None:
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.STRING:
            if t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL:
                raise EqcError(f"{what}: string initializer '{t.name}' is stored as raw bytes (strings are stored "
                               "as string_data)")
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise EqcError(f"{what}: initializer '{t.name}' has unknown element type {t.data_type}") from None
        if any(d < 0 for d in t.dims):
            raise EqcError(f"{what}: initializer '{t.name}' has a negative dimension {list(t.dims)}")
        count = math.prod(t.dims)
        want = -(-count // 2) if t.data_type in _FOUR_BIT else count * itemsize  # 4-bit types: two per byte
        if t.data_location == onnx.TensorProto.EXTERNAL:
            length = {e.key: e.value for e in t.external_data}.get("length")
            have = int(length) if length is not None and length.isdigit() else None
        elif t.HasField("raw_data"):
            have = len(t.raw_data)
        else:
            continue  # typed fields (float_data, ...): the checker and the loader count those
        if have is not None and have != want:
            raise EqcError(f"{what}: initializer '{t.name}' holds {have} bytes, its shape {list(t.dims)} and type "
                           f"need {want}")


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def load_ir(path: str | pathlib.Path) -> ir.Model:
    """Load an ONNX model into onnx-ir with clear errors; external data stays memory-mapped."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = model_file(resolve_artifact(p))
    if not p.is_file():
        raise EqcError(f"model file '{p}' does not exist")
    proto = _graph_proto(p)
    if not proto.graph.node and not proto.graph.output:
        raise EqcError(f"'{p}' is not an ONNX model (empty or truncated file)")
    if not any(op.domain in ("", "ai.onnx") for op in proto.opset_import):
        raise EqcError(f"'{p}' declares no default ONNX opset")
    opset = default_opset(proto)
    if opset > onnx.defs.onnx_opset_version():
        raise EqcError(f"'{p}' declares default opset {opset}, newer than this onnx supports "
                       f"({onnx.defs.onnx_opset_version()})")
    _check_external_data(proto, p.parent)
    check_graph(proto, f"'{p}'")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise EqcError(f"'{p}' could not be read as ONNX: {exc}") from None
    # Resolve external tensors relative to the model's folder.
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(p.parent)
    return model


def save_ir(model: ir.Model, folder: pathlib.Path) -> pathlib.Path:
    """Save into `folder` (a staged temp folder), weights as external data beside the graph."""
    path = folder / MODEL_FILE
    try:
        ir.save(model, path, external_data=DATA_FILE)
    except OSError as exc:
        # numpy's tofile reports a short write (ENOSPC, EFBIG) as a bare OSError without errno.
        reason = exc.strerror or f"disk full or file too large? ({exc})"
        raise EqcError(f"cannot write the model into '{folder.parent}': {reason}") from None
    return path


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's default-domain opset version (0 when it declares none)."""
    return max((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), default=0)


def carried_files(src: pathlib.Path) -> list[str]:
    """The carried files present in `src` (names from CARRIED_FILES), after refusing any that is a symbolic
    link, not a regular file, or larger than CARRIED_MAX_BYTES (EqcError, exit 2)."""
    present = []
    for name in CARRIED_FILES:
        path = pathlib.Path(src) / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        _check_carried(path, info)
        present.append(name)
    return present


def _check_carried(path: pathlib.Path, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise EqcError(f"'{path}' is a symbolic link; eqc carries tokenizer and config files only as regular files "
                       "inside the model folder (replace the link by the file)")
    if not stat.S_ISREG(info.st_mode):
        raise EqcError(f"'{path}' is not a regular file")
    if info.st_size > CARRIED_MAX_BYTES:
        raise EqcError(f"'{path}' is {info.st_size} bytes, over the {CARRIED_MAX_BYTES >> 20} MiB limit for a "
                       "tokenizer or config file")


MODEL_CONFIG_FILES = ("config.json", "generation_config.json")


def carry_tokenizer(tokenizer: pathlib.Path, dst: pathlib.Path) -> None:
    """Give an artifact compiled from a bare .onnx the tokenizer its statistics were made with (`--tokenizer`):
    a folder's tokenizer files (not its model config, which describes another graph), or a tokenizer.json with the
    one-line tokenizer_config.json transformers needs to load it."""
    if tokenizer.is_dir():
        copy_carried_files(tokenizer, dst, skip=MODEL_CONFIG_FILES)
        return
    if not tokenizer.exists():
        raise EqcError(f"the tokenizer the statistics were made with ('{tokenizer}') no longer exists; recalibrate "
                       "with --tokenizer")
    info = tokenizer.lstat()
    _check_carried(tokenizer, info)
    (dst / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (dst / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}\n')


def tokenizer_digest(tokenizer: pathlib.Path) -> str:
    """sha256 over a tokenizer's files (a folder's carried tokenizer files by name, or one tokenizer.json): what
    statistics record beside the tokenizer's path, so a path read back from a statistics file is used only while
    it still holds what calibration read (a statistics file cannot make eqc read, or carry, any other file)."""
    tokenizer = pathlib.Path(tokenizer)
    digest = hashlib.sha256()
    if tokenizer.is_dir():
        for name in (n for n in carried_files(tokenizer) if n not in MODEL_CONFIG_FILES):
            digest.update(name.encode() + b"\0" + hashlib.sha256((tokenizer / name).read_bytes()).digest())
        return digest.hexdigest()
    try:
        info = tokenizer.lstat()
    except FileNotFoundError:
        raise EqcError(f"tokenizer '{tokenizer}' does not exist") from None
    _check_carried(tokenizer, info)
    digest.update(tokenizer.read_bytes())
    return digest.hexdigest()


def copy_carried_files(src: pathlib.Path, dst: pathlib.Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the tokenizer/config files (CARRIED_FILES only) from one artifact to the next.

    Each is opened without following a symbolic link (O_NOFOLLOW) and checked again on the open
    descriptor, so a file swapped for a link after carried_files() looked at it is refused too.
    """
    for name in (n for n in carried_files(src) if n not in skip):
        path = pathlib.Path(src) / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise EqcError(f"cannot read '{path}': {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            _check_carried(path, info)
            data = fh.read(CARRIED_MAX_BYTES + 1)
        if len(data) > CARRIED_MAX_BYTES:
            raise EqcError(f"'{path}' grew over the {CARRIED_MAX_BYTES >> 20} MiB limit while being copied")
        (pathlib.Path(dst) / name).write_bytes(data)
        os.utime(pathlib.Path(dst) / name, ns=(info.st_atime_ns, info.st_mtime_ns))


def model_fingerprint(path: str | pathlib.Path) -> str:
    """A hash of the graph and of every external-data file it references (by the location the graph
    names, read through the confinement check): statistics refuse a stranger whatever its data file is called.

    For the usual artifact (one file, model.onnx.data) this is sha256(graph bytes + data bytes), as before;
    with several files each is preceded by its location and size, so bytes cannot move between files.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        p = model_file(resolve_artifact(p))
    if not p.is_file():
        raise EqcError(f"model file '{p}' does not exist")
    graph = p.read_bytes()
    digest = hashlib.sha256(graph)
    try:
        proto = onnx.load_from_string(graph)
    except Exception as exc:
        raise EqcError(f"'{p}' is not a readable ONNX model ({type(exc).__name__})") from None
    files = external_data_files(proto, p.parent)
    for location, target in files.items():
        if len(files) > 1:
            digest.update(f"\0{location}\0{target.stat().st_size}\0".encode())
        with open(target, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def size_bytes(folder_or_model: pathlib.Path) -> int:
    """Bytes of the model graph plus the external-data files it references."""
    p = pathlib.Path(folder_or_model)
    model_path = model_file(resolve_artifact(p)) if p.is_dir() else p
    files = external_data_files(_graph_proto(model_path), model_path.parent)
    return model_path.stat().st_size + sum(f.stat().st_size for f in files.values())


def write_manifest(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model_file": MODEL_FILE, **manifest}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def max_positions(folder: pathlib.Path) -> int | None:
    """The longest sequence the model was built for, from its config.json (max_position_embeddings, or
    n_positions for GPT-2); None when the folder has no readable config that says."""
    if "config.json" not in carried_files(folder):  # refuses a linked or oversized config.json
        return None
    try:
        config = json.loads((pathlib.Path(folder) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
