"""Graph queries shared by the passes: where the linear layers are and what feeds them."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.layer_selection import EVERY_LAYER, LayerSelection


@dataclasses.dataclass
class LinearSite:
    """A MatMul/Gemm whose second operand is a constant weight: what eqc quantizes.

    `weight` is the stored initializer; `transposed` is True when it is stored [N, K] (Gemm with
    transB=1, or a Transpose of a tied embedding table) instead of MatMul's [K, N].
    """

    node: ir.Node
    activation: ir.Value
    weight: ir.Value
    transposed: bool
    name: str
    quantized: bool = False  # the weight already arrives through a DequantizeLinear

    @property
    def in_features(self) -> int:
        shape = self.weight.shape
        return int(shape[1] if self.transposed else shape[0])

    @property
    def out_features(self) -> int:
        shape = self.weight.shape
        return int(shape[0] if self.transposed else shape[1])


def node_order(graph: ir.Graph) -> dict[int, int]:
    """Position of every node by id(); graph.index() is O(n) per call on onnx-ir's linked list."""
    return {id(node): i for i, node in enumerate(graph)}


def is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def weight_dequantize_node(linear: ir.Node) -> ir.Node | None:
    """The DequantizeLinear behind a linear's weight input (through a tied lm_head's Transpose), else None."""
    src = linear.inputs[1].producer()
    if src is not None and src.op_type == "Transpose":
        src = src.inputs[0].producer()
    return src if src is not None and src.op_type == "DequantizeLinear" else None


def static_activation_quantize(dq: ir.Node | None) -> ir.Node | None:
    """The QuantizeLinear of a per-tensor int8/uint8 Q->DQ pair with constant, matching scale and zero
    point (what ORT fuses into its integer GEMMs), else None."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.attributes.get_int("block_size", 0):
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or len(q.inputs) < 3 or q.inputs[2] is None:
        return None
    s, zp = const_array(q.inputs[1]), const_array(q.inputs[2])
    if zp is None or zp.dtype not in (np.int8, np.uint8):
        return None
    ds, dzp = const_array(dq.inputs[1]), const_array(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if s is None or s.size != 1 or zp.size != 1 or ds is None or dzp is None:
        return None
    if float(ds.ravel()[0]) != float(s.ravel()[0]) or int(dzp.ravel()[0]) != int(zp.ravel()[0]):
        return None
    return q


def layer_name(node: ir.Node) -> str:
    """'/model/model/layers.0/self_attn/q_proj/MatMul' -> 'model.layers.0.self_attn.q_proj'."""
    name = node.name or ""
    parts = [p for p in name.split("/") if p]
    if parts and parts[-1].split("_")[0] in {"MatMul", "Gemm", "Gather"}:
        parts = parts[:-1]
    if len(parts) > 1 and parts[0] == "model":
        parts = parts[1:]  # the export wrapper's own prefix
    return ".".join(parts) or (node.name or "unnamed")


def _constant_or_dequantized(value: ir.Value) -> tuple[ir.Value, bool] | None:
    """(stored tensor, went through DequantizeLinear) for a constant 2-D weight source."""
    if is_constant(value) and value.shape is not None and len(value.shape) == 2:
        return value, False
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and is_constant(producer.inputs[0]):
        q = producer.inputs[0]
        if q.shape is not None and len(q.shape) == 2:
            return q, True
    return None


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool, bool] | None:
    """(stored weight, transposed, quantized) when `node`'s second input is a constant weight."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    b = node.inputs[1]
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        found = _constant_or_dequantized(b)
        return (found[0], bool(node.attributes.get_int("transB", 0)), found[1]) if found else None
    found = _constant_or_dequantized(b)
    if found is not None:
        return found[0], False, found[1]
    producer = b.producer()
    # A tied lm_head reads the embedding table through a Transpose.
    if producer is not None and producer.op_type == "Transpose":
        perm = producer.attributes.get_ints("perm", None)
        found = _constant_or_dequantized(producer.inputs[0])
        if found is not None and (perm is None or list(perm) == [1, 0]):
            return found[0], True, found[1]
    return None


def find_linear_sites(graph: ir.Graph, select: LayerSelection = EVERY_LAYER) -> list[LinearSite]:
    """Every MatMul/Gemm with a constant 2-D weight whose layer name `select` selects.

    Activation x activation MatMuls (attention scores, attention x values) are never sites: the
    additive mask and masked scores must stay float.
    """
    sites = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        found = _weight_of(node)
        if found is None:
            continue
        weight, transposed, quantized = found
        name = layer_name(node)
        if not select.selects(name, node):
            continue
        sites.append(LinearSite(node, node.inputs[0], weight, transposed, name, quantized))
    return sites


def sites_by_activation(graph: ir.Graph, select: LayerSelection = EVERY_LAYER) -> list[list[LinearSite]]:
    """Linear sites grouped by the activation they read (q/k/v share one input), in graph order."""
    groups: dict[int, list[LinearSite]] = {}
    for site in find_linear_sites(graph, select):
        groups.setdefault(id(site.activation), []).append(site)
    return list(groups.values())


def embedding_gathers(graph: ir.Graph) -> list[ir.Node]:
    """Gather nodes reading rows of a constant 2-D table (token embeddings)."""
    return [n for n in graph if n.op_type == "Gather" and is_constant(n.inputs[0])
            and n.inputs[0].shape is not None and len(n.inputs[0].shape) == 2
            and n.attributes.get_int("axis", 0) == 0]


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The constant `value` holds: itself, or what an Identity passes on (Optimum de-duplicates equal initializers
    and hands each user an Identity of the one kept, e.g. every all-ones norm scale of a random model), else None."""
    if is_constant(value):
        return value
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Identity" and is_constant(producer.inputs[0]):
        return producer.inputs[0]
    return None


def weight_array(value: ir.Value) -> np.ndarray:
    return constant_source(value).const_value.numpy()


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a fresh initializer with a unique name."""
    base, k = name, 1
    while name in graph.initializers:
        name, k = f"{base}_{k}", k + 1
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=name)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def substitute_output(graph: ir.Graph, old: ir.Value, new: ir.Node, before: ir.Node,
                      dtype: ir.DataType | None = None) -> None:
    """Insert `new` before `before` and make its output stand in for `old`: every use (graph outputs
    included), the name and the shape. dtype: the new output's type (default: `old`'s, which exported
    intermediates may leave unset). The caller removes the nodes that computed `old`."""
    graph.insert_before(before, new)
    value = new.outputs[0]
    if dtype is not None or old.dtype is not None:
        value.dtype = dtype if dtype is not None else old.dtype
    value.shape = old.shape
    old.replace_all_uses_with(value, replace_graph_outputs=True)
    value.name, old.name = old.name, None


def scalar_initializer(graph: ir.Graph, name: str, value: float | int, dtype: type = np.float32) -> ir.Value:
    return new_initializer(graph, name, np.array(value, dtype=dtype))


def int_constant(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return new_initializer(graph, name, np.array(values, dtype=np.int64))


def release_mapping(tensor: object) -> None:
    """Unmap a memory-mapped (external-data) weight; it re-maps if read again.

    Passes call it once they are done with a source weight, so a model larger than memory is never
    held mapped whole (touched pages of a mapping count towards the process's RSS).
    """
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # a view of the mapping is still alive somewhere: it is freed with it
            pass
