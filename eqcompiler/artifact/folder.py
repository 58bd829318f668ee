"""An eqc artifact: a folder with model.onnx (+ external data), manifest.json and the tokenizer.

Every command that writes a model writes a whole artifact, so `eqc eval DIR` needs no other flag.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from typing import Any

import onnx
import onnx_ir as ir

from eqcompiler.errors import EqcError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "eqc-artifact"
MANIFEST_VERSION = 1
# Files copied from one artifact into the next (tokenizer and config travel with the model).
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")


@dataclasses.dataclass
class Artifact:
    folder: pathlib.Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> pathlib.Path:
        return self.folder / MODEL_FILE

    @property
    def task(self) -> str:
        return self.manifest.get("task", "causal-lm")

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
        raise EqcError(f"'{p}' is a folder without {MODEL_FILE}: not an eqc artifact")
    manifest: dict[str, Any] = {}
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file() and model_path.name == MODEL_FILE:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EqcError(f"manifest '{manifest_path}' is not valid JSON: {exc}") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise EqcError(f"'{manifest_path}' is not an eqc manifest")
    art = Artifact(folder=folder, manifest=manifest)
    if model_path.name != MODEL_FILE:
        art = Artifact(folder=folder, manifest={"model_file": model_path.name})
    return art


def model_file(art: Artifact) -> pathlib.Path:
    return art.folder / art.manifest.get("model_file", MODEL_FILE)


def _check_external_data(proto: onnx.ModelProto, folder: pathlib.Path) -> None:
    """Refuse external-data locations outside the model folder before anything reads them."""
    root = folder.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if pathlib.PurePath(location).is_absolute() or root not in target.parents:
            raise EqcError(f"tensor '{tensor.name}' points at external data '{location}' outside the model folder; refused")
        if not target.is_file():
            raise EqcError(f"external data file '{location}' for tensor '{tensor.name}' is missing")


def load_ir(path: str | pathlib.Path) -> ir.Model:
    """Load an ONNX model into onnx-ir with clear errors; external data stays memory-mapped."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = model_file(resolve_artifact(p))
    if not p.is_file():
        raise EqcError(f"model file '{p}' does not exist")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise EqcError(f"'{p}' is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise EqcError(f"'{p}' is not an ONNX model (empty or truncated file)")
    if not any(op.domain in ("", "ai.onnx") for op in proto.opset_import):
        raise EqcError(f"'{p}' declares no default ONNX opset")
    opset = default_opset(proto)
    if opset > onnx.defs.onnx_opset_version():
        raise EqcError(f"'{p}' declares default opset {opset}, newer than this onnx supports "
                       f"({onnx.defs.onnx_opset_version()})")
    _check_external_data(proto, p.parent)
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


def copy_carried_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copy tokenizer/config files (not the model or manifest) from one artifact to the next."""
    for item in src.iterdir():
        if item.is_file() and item.suffix in CARRIED_SUFFIXES and item.name != MANIFEST_FILE:
            shutil.copy2(item, dst / item.name)


def model_fingerprint(path: str | pathlib.Path) -> str:
    """A hash of the graph and weights that tells one model from another (stats refuse a stranger)."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = model_file(resolve_artifact(p))
    digest = hashlib.sha256()
    digest.update(p.read_bytes())
    data = p.parent / DATA_FILE
    if data.is_file():
        with open(data, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def size_bytes(folder_or_model: pathlib.Path) -> int:
    """Bytes of the model graph plus its external data."""
    p = pathlib.Path(folder_or_model)
    model_path = model_file(resolve_artifact(p)) if p.is_dir() else p
    total = model_path.stat().st_size
    data = model_path.parent / DATA_FILE
    if data.is_file():
        total += data.stat().st_size
    return total


def write_manifest(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model_file": MODEL_FILE, **manifest}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
