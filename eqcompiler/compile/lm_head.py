"""Which linear layer is the lm_head, from the graph's structure rather than its node names.

eqc's export names it `lm_head`, Optimum `/lm_head/MatMul`, torch.onnx's dynamo exporter `node_linear_210`
and onnxruntime-genai's builder `/lm_head/MatMul` too: a name regex misses some of them (issue 20: dynamo's
lm_head input was quantized per token, +0.6% ppl). Structurally, the lm_head is the MatMul/Gemm whose output
reaches a graph output through layout ops only (Reshape, Cast, ...), and that output is the vocabulary:

- its weight is also read by a token-embedding Gather (a tied lm_head, eqc export and dynamo), or
- its output count equals the row count of a token-embedding table (an untied copy, Optimum), or
- the graph output it reaches is named `logits`.

A plain MLP's last Gemm (no embedding table, output not named logits) is not an lm_head.
"""
from __future__ import annotations

import onnx_ir as ir

# Ops that move or retype values without mixing them: the lm_head's output may pass through these to `logits`.
_PASS_THROUGH = {"Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Transpose", "Flatten"}
_WALK_LIMIT = 8  # layout ops between the lm_head and the logits output (dynamo: none; a Cast at most so far)


def _reaches_graph_output(value: ir.Value) -> ir.Value | None:
    """The graph output `value` reaches through pass-through ops only (first found), else None."""
    for _ in range(_WALK_LIMIT):
        if value.is_graph_output():
            return value
        uses = [u.node for u in value.uses() if u.node.op_type != "Shape"]
        if len(uses) != 1 or uses[0].op_type not in _PASS_THROUGH or uses[0].inputs[0] is not value:
            return None
        value = uses[0].outputs[0]
    return None


def _weight_source(node: ir.Node) -> ir.Value | None:
    """The stored table behind the weight operand (through a Transpose and/or DequantizeLinear), else None."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    value = node.inputs[1]
    for _ in range(2):
        producer = value.producer()
        if producer is None or producer.op_type not in ("Transpose", "DequantizeLinear"):
            break
        value = producer.inputs[0]
    return value if value.const_value is not None and value.producer() is None else None


def _embedding_rows(graph: ir.Graph) -> set[int]:
    """Row counts of the constant 2-D tables a Gather reads along axis 0 (token embeddings)."""
    rows = set()
    for node in graph:
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        if table is not None and table.const_value is not None and table.shape is not None and len(table.shape) == 2 \
                and node.attributes.get_int("axis", 0) == 0 and isinstance(table.shape[0], int):
            rows.add(int(table.shape[0]))
    return rows


def _out_features(node: ir.Node) -> int | None:
    """The output width the node's (possibly transposed) weight gives, when its shape is known."""
    value = node.inputs[1]
    shape = value.shape
    if shape is None or len(shape) != 2:
        return None
    transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
    width = shape[0] if transposed else shape[1]
    return int(width) if isinstance(width, int) else None


def is_lm_head(node: ir.Node) -> bool:
    """True when `node` (a MatMul/Gemm with a constant weight) is the model's lm_head (see the module docstring)."""
    if node.op_type not in ("MatMul", "Gemm") or not node.outputs:
        return False
    out = _reaches_graph_output(node.outputs[0])
    if out is None:
        return False
    if out.name == "logits":
        return True
    table = _weight_source(node)
    if table is not None and any(u.node.op_type == "Gather" and u.idx == 0 for u in table.uses()):
        return True  # tied: the embedding Gather reads the same table
    width = _out_features(node)
    return width is not None and node.graph is not None and width in _embedding_rows(node.graph)
