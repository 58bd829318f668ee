"""The manifest's shape, checked once where an artifact is opened (artifact.folder.resolve_artifact).

Every command reads manifest fields (the task, the KV-cache layout, the passes that made the graph, ...); a
manifest edited by hand or damaged in transit would otherwise fail wherever a field is first used, as an
internal error. The schema names only what eqc reads; other keys are left alone (a newer eqc may add some).

A spec is a Python type (bool is not an int here), POSITIVE (an int >= 1), ANY, a tuple of alternative specs,
a one-element list (a list of that spec) or a dict (an object whose listed keys, when present, have those specs;
a key wrapped in Required must be present).
"""
from __future__ import annotations

from typing import Any

from eqcompiler.errors import EqcError

ANY = object()


class Required(str):
    """A dict-spec key that must be present."""


POSITIVE = object()
NULL = type(None)
MISSING = type("Missing", (), {"__repr__": lambda self: "missing"})()

IO_SPEC = {Required("name"): str, "dtype": (str, NULL), "shape": ([(str, int, NULL)], NULL)}
KV_SPEC = {Required("num_layers"): POSITIVE, Required("num_kv_heads"): POSITIVE, Required("head_dim"): POSITIVE,
           "dtype": str, "layout": [str], Required("past_input"): str, Required("present_output"): str,
           "quantized": ({"bits": POSITIVE}, NULL), "bytes_per_token": (int, float)}
QUANTIZATION_SPEC = {Required("recipe"): str, Required("passes"): [{Required("pass"): str, "options": (dict, NULL)}],
                     Required("report"): dict, Required("warnings"): [str], "calibration": (dict, NULL),
                     "parent_fingerprint": str}
MANIFEST_SPEC = {
    "format": str, "version": int, "task": str, "family": (str, NULL), "model_file": str, "opset": int,
    "target": str, "cpu": str, "inputs": [IO_SPEC], "outputs": [IO_SPEC], "kv_cache": (KV_SPEC, NULL),
    "quantization": (QUANTIZATION_SPEC, NULL), "runtime_requirements": ({"provider": str, "custom_op_library": str,
                                                                          "domain": str}, NULL),
    "tokenizer": ({"bos_token_id": (int, NULL), "eos_token_id": (int, [int], NULL), "pad_token_id": (int, NULL)}, NULL),
    "source": (dict, NULL), "parity": (dict, NULL),
}


def _describe(spec: Any) -> str:
    if spec is ANY:
        return "any value"
    if spec is POSITIVE:
        return "a positive integer"
    if spec is NULL:
        return "null"
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, list):
        return "a list"
    if isinstance(spec, dict):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list",
            bool: "true or false"}.get(spec, spec.__name__)


def _problem(value: Any, spec: Any, where: str) -> tuple[str, Any, Any] | None:
    """(where, value, spec) of the first mismatch, or None."""
    if spec is ANY:
        return None
    if isinstance(spec, tuple):
        found = [_problem(value, s, where) for s in spec]
        if any(f is None for f in found):
            return None
        deeper = [f for f, s in zip(found, spec) if f[0] != where]  # right kind, wrong inside: say where
        return deeper[0] if deeper else (where, value, spec)
    if spec is POSITIVE:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else (where, value, spec)
    if isinstance(spec, list):
        if not isinstance(value, list):
            return where, value, spec
        for i, item in enumerate(value):
            found = _problem(item, spec[0], f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return where, value, spec
        for key, sub in spec.items():
            at = f"{where}.{key}" if where else str(key)
            if key in value:
                found = _problem(value[key], sub, at)
                if found:
                    return found
            elif isinstance(key, Required):
                return at, MISSING, sub
        return None
    if spec is int and isinstance(value, bool) or not isinstance(value, spec):
        return where, value, spec
    return None


def check_manifest(manifest: Any, path: str) -> None:
    """Refuse (EqcError, exit 2) a manifest whose fields are not what eqc writes, naming the first one."""
    found = _problem(manifest, MANIFEST_SPEC, "")
    if found is None:
        return
    where, value, spec = found
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise EqcError(f"manifest '{path}': {'field ' + repr(where) if where else 'the manifest'} is {shown}, "
                   f"not {_describe(spec)}; re-export or recompile that artifact")
