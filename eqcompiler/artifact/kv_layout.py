"""The KV cache's head count and head size where a graph leaves them symbolic.

onnxruntime-genai's builder writes past inputs as [batch, kv_heads, past_sequence_length, 'kv_cache_dim']: a
prefill from an empty cache must still feed the real head size, which such a graph states only in its
attention nodes (and the folder's genai_config.json). Read, in this order: an eqc manifest's kv_cache, the
folder's genai_config.json, an HF config.json, the first GroupQueryAttention node (heads from its attributes,
head size from the width of the projection feeding it).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import onnx

HEADS, HEAD_SIZE = 1, 3  # axes of a past tensor [batch, kv_heads, sequence, head_size]


def _from_json(path: pathlib.Path, *keys: str) -> Any:
    try:
        value: Any = json.loads(path.read_text())
        for key in keys:
            value = value[key]
        return value
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _positive(*values: Any) -> tuple[int, int] | None:
    return tuple(values) if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values) else None


def _from_folder(folder: pathlib.Path) -> tuple[int, int] | None:
    kv = _from_json(folder / "manifest.json", "kv_cache") or {}
    found = _positive(kv.get("num_kv_heads"), kv.get("head_dim")) if isinstance(kv, dict) else None
    decoder = _from_json(folder / "genai_config.json", "model", "decoder") or {}
    if found is None and isinstance(decoder, dict):
        found = _positive(decoder.get("num_key_value_heads"), decoder.get("head_size"))
    config = _from_json(folder / "config.json") or {}
    if found is None and isinstance(config, dict):
        heads = config.get("num_attention_heads")
        size = config.get("head_dim") or (config.get("hidden_size") // heads if _positive(heads, config.get("hidden_size")) else None)
        found = _positive(config.get("num_key_value_heads", heads), size)
    return found


def _width(graph: onnx.GraphProto, name: str) -> int | None:
    """Last dimension of the tensor `name`, through Add (bias) back to a MatMul / MatMulNBits weight."""
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    node = producers.get(name)
    while node is not None and node.op_type == "Add":
        node = producers.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "MatMulNBits":
        return next((a.i for a in node.attribute if a.name == "N"), None)
    weight = producers.get(node.input[1]) if node.op_type == "MatMul" else None
    if weight is not None and weight.op_type == "DequantizeLinear":  # a quantized weight [K, N]
        node = weight
    if node.op_type in ("MatMul", "DequantizeLinear") and node.input[node.op_type == "MatMul"] in inits:
        dims = inits[node.input[node.op_type == "MatMul"]].dims
        return int(dims[-1]) if dims else None
    return None


def _from_attention(model: pathlib.Path | bytes) -> tuple[int, int] | None:
    graph = (onnx.load_model_from_string(model) if isinstance(model, bytes)
             else onnx.load(str(model), load_external_data=False)).graph
    node = next((n for n in graph.node if n.op_type == "GroupQueryAttention"), None)
    if node is None:
        return None
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
    width = _width(graph, node.input[0])
    if not _positive(heads, kv_heads) or width is None:
        return None
    packed = len(node.input) < 2 or not node.input[1]  # q, k and v in one input
    size, rest = divmod(width, heads + 2 * kv_heads if packed else heads)
    return (kv_heads, size) if not rest else None


def past_shape_hints(model: str | pathlib.Path | bytes, folder: pathlib.Path | None) -> tuple[int, int] | None:
    """(kv_heads, head_size) for a graph (a path, or serialized bytes whose files lie in `folder`) whose past
    inputs leave them symbolic, or None when nothing says."""
    found = _from_folder(pathlib.Path(folder)) if folder is not None else None
    return found or _from_attention(model if isinstance(model, bytes) else pathlib.Path(model))


PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")


def _declared_past_shape(model_path: pathlib.Path) -> tuple[int, int] | None:
    """(kv_heads, head_size) when the graph declares them on past_key_values.0.key ([batch, kv, past, head]):
    torch.onnx dynamo's export with a cache does, with no config.json beside it (read only when nothing else says:
    the graph proto is loaded without external data)."""
    import onnx

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # unreadable here: the caller's own load reports it
        return None
    for value in proto.graph.input:
        if value.name == "past_key_values.0.key":
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[1].HasField("dim_value") and dims[3].HasField("dim_value"):
                return int(dims[1].dim_value), int(dims[3].dim_value)
    return None


def foreign_kv_cache(model_path: pathlib.Path, input_names: list[str]) -> dict[str, Any] | None:
    """The manifest's kv_cache record for a causal LM eqc did not export (a builder or Optimum graph with
    past_key_values.N.key/value inputs), as `eqc export` writes it; None when its shape cannot be told."""
    layers = sorted(int(m.group(1)) for m in map(PAST_KEY.match, input_names) if m)
    hints = past_shape_hints(model_path, pathlib.Path(model_path).parent) if layers else None
    if layers and hints is None:
        hints = _declared_past_shape(model_path)
    if not layers or layers != list(range(len(layers))) or hints is None:
        return None
    return {"num_layers": len(layers), "num_kv_heads": hints[0], "head_dim": hints[1],
            "layout": ["batch", "num_kv_heads", "sequence", "head_dim"],
            "past_input": "past_key_values.{layer}.{key|value}", "present_output": "present.{layer}.{key|value}",
            "dtype": "float32", "quantized": None}
