"""Weight quantization (round-to-nearest): int8 per channel or int4/int8 blocked, as QDQ.

Every MatMul/Gemm with a constant weight gets DequantizeLinear(Wq, scale, zp) on its weight input.
Token-embedding tables are quantized per row too; a table tied to the lm_head is stored once, as
int8, and read by both the Gather (gather rows, then dequantize them) and the lm_head.
After GPTQ/AWQ (the w4 recipes' int8 step for what they leave) every layer may already be quantized (an
MLP has no embedding table): nothing is left to do. A graph with no layer to quantize at all is refused,
saying why (no MatMul/Gemm, weights that are not constants, or filters that select none).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.lowering.cpu_features import REDUCED_MARK, int8_saturates_on
from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import (node_order, LinearSite, embedding_gathers, find_linear_sites, int_constant,
                              release_mapping, weight_array)
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.compile.qdq import (QuantizedWeight, emit_dequantize, emit_quantized_initializers, quantize_channelwise,
                                   quantize_site_weight)


@dataclasses.dataclass
class QuantizeWeightsOptions(LayerSelection):
    bits: int = 8
    symmetric: bool = True
    block_size: int = 0  # 0: one scale per output channel; else blocks along the input features
    embeddings: bool = True  # also quantize token-embedding tables (per row, int8)
    embedding_bits: int = 8
    # Tables with fewer rows stay float: they are a few KB, and each row (BERT's token-type row, a
    # segment embedding) is added to every token, so its rounding error is a bias on the whole
    # sequence (all-MiniLM-L6-v2: the 2-row token-type table in int8 alone costs 1.2e-4 of cosine).
    embedding_min_rows: int = 64
    # 7-bit int8 codes, for ONNX Runtime's CPU int8 kernels on x86 without VNNI (their int16 pair
    # sums saturate with full-range weights); costs one bit of weight precision everywhere else.
    # "auto": only when compiling on such a CPU for an ORT CPU target (portable, ort-cpu) and the
    # recipe quantizes activations with static scales (what ORT fuses into its int8 GEMMs).
    reduce_range: bool | str = False

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise EqcError(f"quantize_weights: bits must be 4 or 8, got {self.bits}")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise EqcError(f"quantize_weights: block_size must be 0 or a power of two >= 16, got {self.block_size}")
        if self.embedding_min_rows < 0:
            raise EqcError(f"quantize_weights: embedding_min_rows must be >= 0, got {self.embedding_min_rows}")
        if self.embedding_bits not in (4, 8):
            raise EqcError(f"quantize_weights: embedding_bits must be 4 or 8, got {self.embedding_bits}")
        if self.reduce_range not in (True, False, "auto"):
            raise EqcError(f"quantize_weights: reduce_range must be true, false or \"auto\", got {self.reduce_range!r}")
        if self.reduce_range is True and not (self.bits == 8 and self.symmetric):
            raise EqcError("quantize_weights: reduce_range applies to symmetric int8 weights (bits 8, symmetric true)")


class QuantizeWeightsPass(EqcPass):
    name = "quantize_weights"
    Options = QuantizeWeightsOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = dataclasses.replace(self.options, reduce_range=self._reduce_range_on())
        selected = find_linear_sites(graph, opts)
        sites = [s for s in selected if not s.quantized]
        gathers = embedding_gathers(graph) if opts.embeddings else []
        # A table is quantized when one of its Gathers (or the linear layer tied to it) is selected.
        tied = {id(s.weight) for s in sites}
        chosen = {id(g.inputs[0]) for g in gathers if opts.selects(_gather_name(g))}
        small = [g for g in gathers if id(g.inputs[0]) not in tied and g.inputs[0].shape[0] < opts.embedding_min_rows]
        wanted = chosen | tied
        gathers = [g for g in gathers if id(g.inputs[0]) in wanted and g not in small]
        tables = {id(g.inputs[0]) for g in gathers}
        order = node_order(graph)
        by_weight: dict[int, list[LinearSite]] = {}
        for site in sites:
            by_weight.setdefault(id(site.weight), []).append(site)
        bytes_before = bytes_after = 0
        layers: dict[str, str] = {}
        for group in by_weight.values():
            weight = group[0].weight
            if id(weight) in tables:
                continue  # handled with its Gather below, so the table is stored once
            qw = quantize_site_weight(_checked_weight(weight), group[0].transposed, opts.bits, opts.symmetric, opts.block_size,
                                      opts.reduce_range)
            _release(weight)
            first = min(group, key=lambda s: order[id(s.node)])
            dq = emit_dequantize(graph, qw, weight.name, before=first.node)
            for site in group:
                layers[site.name] = _describe(qw, opts.reduce_range)
            # Every reader takes the dequantized weight, the linear layers and any other (onnxruntime-genai's builder
            # ties its embedding as Gather(Transpose(lm_head weight))): the float initializer goes away. The
            # pipeline's topological sort places the DequantizeLinear before the earliest of them.
            weight.replace_all_uses_with(dq)
            bytes_before += weight.const_value.nbytes
            bytes_after += _stored_bytes(qw)
            graph.initializers.pop(weight.name)
        for table, users in _group_gathers(gathers).items():
            b0, b1 = self._quantize_table(graph, users, [s for s in sites if id(s.weight) == table], layers)
            bytes_before += b0
            bytes_after += b1
        if not layers and not selected:
            raise EqcError(f"quantize_weights matched no layer: {_why_no_layer(graph, opts)}")
        # (selected but none left: an earlier pass, GPTQ or AWQ, quantized every layer; the report says so)
        self.report({"layers": layers, "weight_bytes_before": int(bytes_before), "weight_bytes_after": int(bytes_after),
                     "reduce_range": opts.reduce_range,
                     "float_tables": sorted({f"{_gather_name(g)} ({g.inputs[0].shape[0]} rows < embedding_min_rows)"
                                             for g in small})})
        return ir.passes.PassResult(model, modified=True)

    _reduce_range_resolved: bool | None = None  # resolved once per pass (the "auto" warning is said once)

    def _reduce_range_on(self) -> bool:
        if self._reduce_range_resolved is None:
            self._reduce_range_resolved = self._resolve_reduce_range()
        return self._reduce_range_resolved

    def _resolve_reduce_range(self) -> bool:
        """reduce_range "auto": on when ORT's int8 CPU kernels on the target CPU class (context.cpu, `--cpu`) would
        run the output and saturate, i.e. static activation scales (ORT fuses those QDQ pairs into its int8 GEMMs, and
        ort-cpu lowers them to the same kernels) for an ORT CPU target. Per-token chains stay in float
        compute in ORT (or go to eqc's exact FusedInt8Gemm), so they keep 8-bit weights."""
        opts = self.options
        if opts.reduce_range != "auto":
            return bool(opts.reduce_range)
        target = self.context.target
        recipe = self.context.recipe_options
        static = "quantize_activations" in recipe
        # encode_int8_as_uint8 (when auto/always) re-encodes portable artifacts for ORT's exact uint8 kernels
        encode = recipe.get("encode_int8_as_uint8")
        encoded = encode is not None and encode.get("when", "auto") != "never" and target == "portable"
        int8_kernels = static and target in ("portable", "ort-cpu") and not encoded
        on = opts.bits == 8 and opts.symmetric and int8_kernels and int8_saturates_on(self.context.cpu)
        if on:
            self.context.warn(
                f"int8 weights kept in {REDUCED_MARK} (reduce_range auto, --cpu avx2): ONNX Runtime's int8 kernels "
                "saturate on full-range weights on CPUs without VNNI; --no-reduce-range keeps 8-bit weights (GPU, "
                "TensorRT, VNNI CPUs)")
        return on

    def _quantize_table(self, graph: ir.Graph, gathers: list[ir.Node], tied_sites: list[LinearSite],
                        layers: dict[str, str]) -> tuple[int, int]:
        """Per-row int8 table; Gather reads int8 rows and their scales, then dequantizes them."""
        table = gathers[0].inputs[0]
        w = _checked_weight(table)
        # A table tied to the lm_head feeds a MatMul too: give it the linear layers' weight range.
        reduce = bool(tied_sites) and self._reduce_range_on() and self.options.embedding_bits == 8
        qw = quantize_channelwise(w, axis=0, bits=self.options.embedding_bits, symmetric=True, reduce_range=reduce)
        order = node_order(graph)
        first = min(gathers + [s.node for s in tied_sites], key=lambda n: order[id(n)])
        # The tied lm_head (Transpose(table) -> MatMul) dequantizes the whole table per run;
        # gathers only dequantize the rows they read.
        if tied_sites:
            dq = emit_dequantize(graph, qw, table.name, before=first)
            q_val, s_val, z_val = dq.producer().inputs
            for site in tied_sites:
                transpose = site.node.inputs[1].producer()
                transpose.replace_input_with(0, dq)
                layers[site.name] = _describe(qw, reduce) + " (tied to embedding)"
        else:
            q_val, s_val, z_val = emit_quantized_initializers(graph, qw, table.name)
        for gather in gathers:
            ids = gather.inputs[1]
            axes = int_constant(graph, f"{table.name}_row_axes", [-1])
            rows = ir.node("Gather", [q_val, ids], {"axis": 0}, name=f"{gather.name}/rows")
            row_s = ir.node("Gather", [s_val, ids], {"axis": 0}, name=f"{gather.name}/row_scale")
            row_z = ir.node("Gather", [z_val, ids], {"axis": 0}, name=f"{gather.name}/row_zero_point")
            s3 = ir.node("Unsqueeze", [row_s.outputs[0], axes], name=f"{gather.name}/row_scale_unsqueeze")
            z3 = ir.node("Unsqueeze", [row_z.outputs[0], axes], name=f"{gather.name}/row_zero_point_unsqueeze")
            dq_rows = ir.node("DequantizeLinear", [rows.outputs[0], s3.outputs[0], z3.outputs[0]],
                              {"axis": -1, "block_size": int(w.shape[1])}, name=f"{gather.name}/DequantizeLinear")
            for node in (rows, row_s, row_z, s3, z3, dq_rows):
                graph.insert_before(gather, node)
            gather.outputs[0].replace_all_uses_with(dq_rows.outputs[0], replace_graph_outputs=True)
            dq_rows.outputs[0].name = gather.outputs[0].name
            gather.outputs[0].name = None
            graph.remove(gather, safe=True)
            layers[_gather_name(gather)] = _describe(qw, reduce) + " (embedding rows)"
        nbytes = table.const_value.nbytes
        del w
        _release(table)
        graph.initializers.pop(table.name)
        return nbytes, _stored_bytes(qw)


def _why_no_layer(graph: ir.Graph, opts: QuantizeWeightsOptions) -> str:
    """Why no MatMul/Gemm is a layer to quantize: none at all, filters that select none, or weights that are
    computed rather than constant (the first few, with what produces them)."""
    linear = [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]
    if not linear:
        return "the graph has no MatMul or Gemm node"
    if opts.filters and find_linear_sites(graph):
        return f"no MatMul/Gemm with a constant weight matches include={opts.include!r} exclude={opts.exclude!r}"
    found = []
    for node in linear[:3]:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        producer = weight.producer() if weight is not None else None
        origin = f"computed by {producer.op_type}" if producer is not None else "a graph input"
        found.append(f"{node.op_type} '{node.name}' reads '{weight.name if weight else ''}' ({origin})")
    return (f"none of the graph's {len(linear)} MatMul/Gemm node(s) has a constant 2-D weight (an initializer, optionally "
            f"through one Transpose or DequantizeLinear): {'; '.join(found)}")


def _checked_weight(value: ir.Value) -> np.ndarray:
    """The weight as a float array; refuse (naming the initializer) non-float or non-finite weights."""
    w = weight_array(value)
    if not np.issubdtype(w.dtype, np.floating):
        raise EqcError(f"quantize_weights: weight '{value.name}' is {w.dtype}, not floating point; "
                       "exclude that layer from the recipe")
    bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    if bad:
        raise EqcError(f"quantize_weights: weight '{value.name}' has {bad} NaN/Inf values; refusing to quantize it")
    return w


def _release(value: ir.Value) -> None:
    """Drop a memory-mapped source weight once quantized, so big models never hold all weights mapped."""
    release_mapping(value.const_value)


def _group_gathers(gathers: list[ir.Node]) -> dict[int, list[ir.Node]]:
    groups: dict[int, list[ir.Node]] = {}
    for g in gathers:
        groups.setdefault(id(g.inputs[0]), []).append(g)
    return groups


def _gather_name(node: ir.Node) -> str:
    from eqcompiler.compile.graph import layer_name

    return layer_name(node)


def _describe(qw: QuantizedWeight, reduced: bool = False) -> str:
    kind = "sym" if qw.signed else "asym"
    return f"int{qw.bits} {kind} " + (f"g{qw.block_size}" if qw.block_size else "per-channel") + (
        f" in {REDUCED_MARK}" if reduced else "")


def _stored_bytes(qw: QuantizedWeight) -> int:
    return qw.q.size * qw.bits // 8 + qw.scale.nbytes + qw.zero_point.size * qw.bits // 8
