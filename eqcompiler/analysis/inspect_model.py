"""`eqc inspect`: what a compiled artifact contains, read from the graph itself (not the manifest).

Op counts; every linear layer with its weight bits and granularity (per-channel, block size,
per-tensor), its activation quantization (none / static per-tensor int8|uint8 / per-token dynamic),
whether it was lowered to an ORT kernel; the KV-cache format (manifest); stored bytes by precision.
"""
from __future__ import annotations

import collections
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.artifact import folder as art_mod
from eqcompiler.compile.graph import const_array, find_linear_sites, layer_name

BITS = {ir.DataType.INT8: 8, ir.DataType.UINT8: 8, ir.DataType.INT4: 4, ir.DataType.UINT4: 4,
        ir.DataType.FLOAT: 32, ir.DataType.FLOAT16: 16, ir.DataType.BFLOAT16: 16, ir.DataType.INT64: 64,
        ir.DataType.INT32: 32, ir.DataType.FLOAT8E4M3FN: 8}
LOWERED = {("com.microsoft", "MatMulIntegerToFloat"), ("com.microsoft", "MatMulNBits"), ("ai.eqc", "FusedInt8Gemm"),
           ("ai.eqc", "Int8WeightGemm"),
           ("com.microsoft", "DynamicQuantizeMatMul"), ("", "MatMulInteger"), ("", "QLinearMatMul")}


def _activation_kind(value: ir.Value) -> str:
    """How a linear layer's input is quantized: none, static-per-tensor-<type>, dynamic-per-token-int8[-centred]."""
    dq = value.producer()
    if dq is not None and dq.op_type == "Add":  # emit_per_token's centred chain: DQ(Q(x - c)) + c
        inner = [_activation_kind(v) for v in dq.inputs if v is not None and v.producer() is not None
                 and v.producer().op_type == "DequantizeLinear"]
        return "dynamic-per-token-int8-centred" if inner == ["dynamic-per-token-int8"] else "none"
    if dq is None or dq.op_type != "DequantizeLinear":
        return "none"
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return "none"
    scale = const_array(q.inputs[1])
    if scale is None:  # computed in the graph from the tensor itself
        return "dynamic-per-token-int8" if q.attributes.get_int("block_size", 0) else "dynamic-per-tensor"
    zp = const_array(q.inputs[2]) if len(q.inputs) > 2 else None
    dtype = "uint8" if zp is not None and zp.dtype == np.uint8 else "int8"
    return f"static-per-tensor-{dtype}" if scale.size == 1 else f"static-per-channel-{dtype}"


def _weight_format(site: Any) -> dict[str, Any]:
    if not site.quantized:
        return {"bits": BITS.get(site.weight.dtype, None), "granularity": "float"}
    src = site.node.inputs[1].producer()
    if src.op_type == "Transpose":
        src = src.inputs[0].producer()
    bits = BITS.get(src.inputs[0].dtype)
    block = src.attributes.get_int("block_size", 0)
    scale = const_array(src.inputs[1])
    if block:
        gran = f"block {block}"
    elif scale is not None and scale.size > 1:
        gran = "per-channel"
    else:
        gran = "per-tensor"
    zp = const_array(src.inputs[2]) if len(src.inputs) > 2 else None
    return {"bits": bits, "granularity": gran, "symmetric": zp is None or not np.any(zp.astype(np.int64))}


def _lowered_layer(node: ir.Node) -> dict[str, Any]:
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    info: dict[str, Any] = {"name": layer_name(node), "op": op, "lowered": True}
    if node.op_type == "MatMulNBits":
        info.update(bits=node.attributes.get_int("bits", 4), granularity=f"block {node.attributes.get_int('block_size', 0)}",
                    activation="none")
    elif node.op_type == "FusedInt8Gemm":
        info.update(bits=8, granularity="per-channel", activation="dynamic-per-token-int8")
    elif node.op_type == "Int8WeightGemm":
        info.update(bits=8, granularity="per-channel", activation="none")
    elif node.op_type == "MatMulIntegerToFloat":
        b_scale = const_array(node.inputs[3])
        a_zp = const_array(node.inputs[4]) if len(node.inputs) > 4 else None
        kind = "uint8" if a_zp is not None and a_zp.dtype == np.uint8 else "int8"
        info.update(bits=8, granularity="per-channel" if b_scale is not None and b_scale.size > 1 else "per-tensor",
                    activation=f"static-per-tensor-{kind}")
    else:
        info.update(bits=8, granularity="unknown", activation="dynamic-per-tensor")
    return info


def _size_by_precision(graph: ir.Graph) -> dict[str, int]:
    sizes: dict[str, int] = collections.Counter()
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        numel = int(np.prod(tensor.shape.numpy())) if tensor.shape is not None else 0
        sizes[tensor.dtype.name.lower()] += numel * tensor.dtype.bitwidth // 8
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


FUSED_OPS = ("com.microsoft::GroupQueryAttention", "com.microsoft::RotaryEmbedding",
             "com.microsoft::SkipSimplifiedLayerNormalization")
ACCURACY_LEVELS = {0: "float compute (level 0: the QDQ graph's numbers)", 1: "float32 compute",
                   2: "float16 compute", 3: "bfloat16 compute",
                   4: "int8 compute: activations quantized per block, integer dot products (AVX2 / AVX-512 VNNI; "
                      "ORT computes in float where the CPU has neither)"}


def _runtime_graph(graph: ir.Graph, ops: collections.Counter) -> dict[str, Any]:
    """What the ort-cpu lowering fused and packed, and how its MatMulNBits compute."""
    levels = collections.Counter(n.attributes.get_int("accuracy_level", 0) for n in graph
                                 if n.op_type == "MatMulNBits" and n.domain == "com.microsoft")
    packed = sum(1 for n in graph if (n.name or "").startswith("packed_projection_") and n.op_type != "Split")
    return {"fused": {op.split("::")[1]: ops[op] for op in FUSED_OPS if ops.get(op)},
            "unfused_attention": ops.get("Softmax", 0), "packed_gemms": packed,
            "matmulnbits_accuracy_levels": {int(k): v for k, v in sorted(levels.items())}}


def inspect(model: str | pathlib.Path) -> dict[str, Any]:
    art = art_mod.resolve_artifact(model)
    ir_model = art_mod.load_ir(art_mod.model_file(art))
    graph = ir_model.graph
    ops = collections.Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph)
    layers = []
    for site in find_linear_sites(graph):
        layers.append({"name": site.name, "op": site.node.op_type, "lowered": False, **_weight_format(site),
                       "activation": _activation_kind(site.activation),
                       "shape": [site.in_features, site.out_features]})
    layers += [_lowered_layer(n) for n in graph if (n.domain, n.op_type) in LOWERED]
    summary = collections.Counter(
        f"{'w' + str(l['bits']) if l['granularity'] != 'float' else 'float'} {l['granularity']} / act {l['activation']}"
        + (f" ({l['op']})" if l["lowered"] else "") for l in layers)
    quantized = [l for l in layers if l["granularity"] != "float"]
    kv = art.manifest.get("kv_cache") or {}
    return {
        "model": str(model),
        "recipe": (art.manifest.get("quantization") or {}).get("recipe", "none"),
        "target": art.manifest.get("target", "portable"),
        "nodes": sum(ops.values()),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "linear_layers": len(layers),
        "quantized_matmuls": len(quantized),
        "activation_quantization": dict(collections.Counter(l["activation"] for l in layers)),
        "layer_summary": dict(summary),
        "layers": layers,
        "kv_cache": {"dtype": kv.get("dtype"), "quantized": bool(kv.get("quantized")),
                     "bits": (kv.get("quantized") or {}).get("bits"), "bytes_per_token": kv.get("bytes_per_token"),
                     "scheme": (kv.get("quantized") or {}).get("scheme"), "attention": kv.get("attention")} if kv else None,
        "runtime_graph": _runtime_graph(graph, ops),
        "size_by_precision": _size_by_precision(graph),
        "size_bytes": art_mod.size_bytes(art_mod.model_file(art)),
        "edge": _edge(art),
    }


def _edge(art: Any) -> dict[str, Any] | None:
    """What an edge target (ort-mobile, web) added, from the manifest: the folded weights, the ORT-format files."""
    needs = art.manifest.get("runtime_requirements") or {}
    folded = ((art.manifest.get("quantization") or {}).get("report") or {}).get("lower_weights_for_web")
    if not folded and "ort_format" not in needs:
        return None
    ort_format = needs.get("ort_format") or {}
    return {"folded_weights": (folded or {}).get("lowered"),
            "float_weight_bytes_after_load": (folded or {}).get("float_weight_bytes_after_load"),
            "web_files": (needs.get("web_files") or {}).get("external_data"),
            "ort_model": ort_format.get("model"),
            "operator_config": ort_format.get("operator_config"),
            "ort_op_types": sum(len(ops) for by_opset in (ort_format.get("ops") or {}).values() for ops in by_opset.values())}


def lines(result: dict[str, Any]) -> list[str]:
    out = [f"{result['model']}: recipe {result['recipe']}, target {result['target']}, {result['nodes']} nodes, "
           f"{result['size_bytes'] / 1e6:.1f} MB"]
    kind = result.get("kind")
    if kind:
        mapped = ", ".join(f"{n} as {r}" for n, r in kind["input_map"].items())
        out.append(f"kind: {kind['kind']} ({kind['source']}: {kind['why']})" + (f"; inputs read {mapped}" if mapped else ""))
    out.append("ops: " + ", ".join(f"{k} {v}" for k, v in list(result["op_counts"].items())[:12])
               + (" ..." if len(result["op_counts"]) > 12 else ""))
    out.append(f"linear layers: {result['linear_layers']} ({result['quantized_matmuls']} quantized)")
    for kind, count in result["layer_summary"].items():
        out.append(f"  {count:4d} x {kind}")
    kv = result["kv_cache"]
    if kv:
        out.append(f"KV cache: {kv['dtype']}" + (f" ({kv['bits']}-bit quantized)" if kv["quantized"] else "")
                   + (f", {kv['bytes_per_token']} B/token" if kv.get("bytes_per_token") else ""))
        if kv.get("attention"):  # a quantized cache lowered for ort-cpu: which attention reads it, and why
            out.append(f"KV-cache attention: {kv['attention']['path']} ({kv['attention']['why']})")
    rt = result["runtime_graph"]
    if rt["fused"] or rt["packed_gemms"]:
        out.append("fused for ONNX Runtime: " + ", ".join(f"{v} {k}" for k, v in rt["fused"].items())
                   + (f"; {rt['packed_gemms']} packed projection GEMMs (q/k/v, gate/up)" if rt["packed_gemms"] else "")
                   + (f"; {rt['unfused_attention']} attention block(s) unfused" if rt["unfused_attention"] else ""))
    for level, count in rt["matmulnbits_accuracy_levels"].items():
        out.append(f"MatMulNBits accuracy_level {level} ({count} nodes): {ACCURACY_LEVELS.get(level, 'unknown level')}")
    edge = result.get("edge")
    if edge and edge["folded_weights"] is not None:
        out.append(f"web: {edge['folded_weights']} quantized weights folded to float32 when the session is created "
                   f"({(edge['float_weight_bytes_after_load'] or 0) / 1e6:.1f} MB in memory after loading); data files "
                   + ", ".join(edge["web_files"] or []))
    if edge and edge["ort_model"]:
        out.append(f"ort-mobile: {edge['ort_model']} + {edge['operator_config']} ({edge['ort_op_types']} op types "
                   "for a reduced build)")
    out.append("stored bytes by precision: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in result["size_by_precision"].items()))
    return out
