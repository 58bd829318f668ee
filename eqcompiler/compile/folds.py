"""Where a per-input-channel scale can be folded exactly, shared by smooth_quant and awq.

Both passes rescale a linear layer's input x by 1/s and its weight rows by s (the product is unchanged),
and need a producer of x that absorbs 1/s with no extra node: a norm's per-channel scale (and bias), or,
for a gated MLP's down projection (x = act(gate) * up), the up projection's output columns. Only the
finding lives here; each pass applies its own fold.
"""
from __future__ import annotations

import onnx_ir as ir

from eqcompiler.compile.graph import LinearSite, constant_source, is_constant


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a


def const_vector(value: ir.Value | None, k: int) -> bool:
    """A constant [k] vector, also behind an Identity (the folds give the node a private copy either way)."""
    src = constant_source(value)
    return src is not None and src.shape is not None and tuple(src.shape) == (k,)


def other_uses(x: ir.Value, linear_nodes: set[int]) -> list[tuple[ir.Node, int]]:
    """Uses of x other than the linears' activation input and Shape (what compensation rewires)."""
    return [(u.node, u.idx) for u in x.uses()
            if u.node.op_type != "Shape" and not (id(u.node) in linear_nodes and u.idx == 0)]


# ONNX Runtime's fused norms (graphs onnxruntime-genai's builder or the ORT fusions wrote): (op, domain) -> input
# index of the per-channel scale (gamma) and of the bias (beta) or None. Output 0 is the normalized value times
# gamma; the others (mean, inverse std, the residual sum input + skip) do not depend on gamma, so they stay exact.
FUSED_NORMS = {
    ("SimplifiedLayerNormalization", ""): (1, None),
    ("SimplifiedLayerNormalization", "com.microsoft"): (1, None),
    ("SkipSimplifiedLayerNormalization", "com.microsoft"): (2, None),
    ("SkipLayerNormalization", "com.microsoft"): (2, 3),
}


def norm_fold(x: ir.Value, k: int) -> tuple[ir.Node, ir.Value, ir.Value | None] | None:
    """(node, scale, bias) when x is a norm output whose per-channel scale can absorb 1/s."""
    p = x.producer()
    if p is None:
        return None
    if p.op_type == "LayerNormalization" and p.attributes.get_int("axis", -1) in (-1,) and len(p.outputs) >= 1:
        scale = p.inputs[1]
        bias = p.inputs[2] if len(p.inputs) > 2 else None
        if const_vector(scale, k) and (bias is None or const_vector(bias, k)) and all(
                o is p.outputs[0] or not o.uses() for o in p.outputs):
            return p, scale, bias
        return None
    fused = FUSED_NORMS.get((p.op_type, p.domain or ""))
    if fused is not None and x is p.outputs[0] and p.attributes.get_int("axis", -1) == -1:
        scale_at, bias_at = fused
        scale = p.inputs[scale_at] if len(p.inputs) > scale_at else None
        bias = p.inputs[bias_at] if bias_at is not None and len(p.inputs) > bias_at else None
        if const_vector(scale, k) and (bias is None or const_vector(bias, k)):
            return p, scale, bias
        return None
    if p.op_type == "Mul":
        for cand in p.inputs:
            if const_vector(cand, k):
                other = other_input(p, cand)
                if other is not None and not is_constant(other):
                    return p, cand, None
    return None


def linear_producer(value: ir.Value, sites_by_node: dict[int, LinearSite], with_bias: bool = True
                    ) -> tuple[LinearSite, ir.Value | None] | None:
    """(linear site, bias) producing `value` directly or (`with_bias`) through Add(., const bias) only."""
    p = value.producer()
    bias = None
    if p is not None and p.op_type == "Add":
        if not with_bias:
            return None
        for cand in p.inputs:
            other = other_input(p, cand)
            if is_constant(cand) and other is not None and other.producer() is not None:
                bias, value = cand, other
                p = other.producer()
                if len([u for u in value.uses()]) != 1 or value.is_graph_output():
                    return None
                break
        else:
            return None
    if p is None or id(p) not in sites_by_node:
        return None
    site = sites_by_node[id(p)]
    if site.node.op_type != "MatMul":
        return None
    return site, bias


def gated_up_projection(x: ir.Value, k: int, sites_by_node: dict[int, LinearSite], with_bias: bool = True
                        ) -> tuple[LinearSite, ir.Value | None] | None:
    """down_proj input Mul(act(gate), up): the up linear (among `sites_by_node`) whose only consumer is that
    Mul, with its bias when `with_bias` (a fold into its output columns must then divide the bias too)."""
    p = x.producer()
    if p is None or p.op_type != "Mul" or len(p.inputs) != 2:
        return None
    for cand in p.inputs:
        found = linear_producer(cand, sites_by_node, with_bias)
        if found is None:
            continue
        site, _ = found
        if site.out_features != k or len(list(cand.uses())) != 1 or cand.is_graph_output():
            continue
        if p.inputs[0] is p.inputs[1]:
            return None
        return found
    return None
