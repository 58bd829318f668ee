"""Per-token dynamic int8 activations: each row of a linear input gets its own scale at run time.

For every activation X [..., K] feeding linear layers (one chain shared by q/k/v, gate/up), emits the
standard-ONNX pattern that passes/lower_fused_int8_gemm.py matches and ORT CPU runs:

    a = Abs(x); m = ReduceMax(a, axes=[-1], keepdims=1)
    s = Max(Div(m, 127), eps)          # eps keeps an all-zero row (padding) from dividing by 0
    q = QuantizeLinear(x, s, axis=-1, block_size=K, output_dtype=INT8)   # no zero point: ORT
    dq = DequantizeLinear(q, s, axis=-1, block_size=K)                   # rejects a scalar zp here
    MatMul(dq, W)

With `symmetric: false` each token is quantized around its own centre instead (see emit_per_token).
No calibration is needed. The attention-score MatMuls and the lm_head input can be left float with
`exclude` (a regex on layer names).

This pass is stateless: per-token scales are exact per row. The EMA-tracked per-tensor scale carried
across decode steps (LLMEasyQuant's Algorithm 1) is its own pass, passes/quantize_activations_ema.py,
which threads the running scale through the KV-cache loop as past/present state.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import int_constant, node_order, scalar_initializer, sites_by_activation
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass


@dataclasses.dataclass
class QuantizeActivationsDynamicOptions(LayerSelection):
    eps: float = 1e-8  # floor on the per-token scale; 0 disables the Max node
    symmetric: bool = True  # False: int8 around each token's centre (see emit_per_token)

    def validate(self) -> None:
        if self.eps < 0:
            raise EqcError(f"quantize_activations_dynamic: eps must be >= 0, got {self.eps}")


def per_token_reference(x: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: (int8 q, scale [..., 1]) exactly as the emitted nodes compute them."""
    x = np.asarray(x, dtype=np.float32)
    s = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127.0)
    if eps:
        s = np.maximum(s, np.float32(eps))
    q = np.clip(np.rint(x / s), -128, 127).astype(np.int8)
    return q, s.astype(np.float32)


class QuantizeActivationsDynamicPass(EqcPass):
    name = "quantize_activations_dynamic"
    Options = QuantizeActivationsDynamicOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        order = node_order(graph)
        groups = sites_by_activation(graph, opts)
        done: dict[str, list[str]] = {}
        for group in groups:
            x = group[0].activation
            k = group[0].in_features
            if any(s.in_features != k for s in group):
                raise EqcError(f"linear layers reading '{x.name}' disagree on input features")
            first = min((s.node for s in group), key=lambda n: order[id(n)])
            dq = emit_per_token(graph, x, k, first, opts.eps, opts.symmetric)
            for site in group:
                site.node.replace_input_with(0, dq)
            done[x.name or group[0].name] = [s.name for s in group]
        if not done:
            raise EqcError("quantize_activations_dynamic matched no linear layer input")
        self.report({"tensors": len(done), "layers": done, "granularity": "per-token int8 " + ("symmetric" if opts.symmetric else "around each token's centre"),
                     "ema_scale": "not here: per-token scales are stateless (EMA scales: quantize_activations_ema)"})
        return ir.passes.PassResult(model, modified=True)


def emit_per_token(graph: ir.Graph, x: ir.Value, k: int, before: ir.Node, eps: float = 1e-8,
                   symmetric: bool = True) -> ir.Value:
    """Insert the per-token int8 Q/DQ chain for x [..., K] before `before`; returns the value the
    linear layers read.

    symmetric: scale = absmax/127 around 0. Otherwise each token is quantized around its own centre
    c = (max + min)/2 with scale (max - min)/254, and c is added back after DequantizeLinear: one-sided
    rows (GELU outputs, whose negative part is tiny) get twice the resolution. Written as int8 around
    a centre rather than uint8 with a per-token zero point because ONNX Runtime's CPU optimizer fuses
    a DQ with a tensor zero point into MatMulIntegerToFloat, which then rejects it at run time. The Add
    between DQ and MatMul is not a TensorRT int8 GEMM input: targets other than portable stay symmetric.
    """
    base = x.name or "activation"
    axes = int_constant(graph, f"{base}_token_axes", [-1])
    nodes = []
    centre = None
    if symmetric:
        q127 = scalar_initializer(graph, f"{base}_qmax", 127.0)
        a = ir.node("Abs", [x], name=f"{base}/Abs")
        m = ir.node("ReduceMax", [a.outputs[0], axes], {"keepdims": 1}, name=f"{base}/ReduceMax")
        s = ir.node("Div", [m.outputs[0], q127], name=f"{base}/TokenScale")
        nodes += [a, m, s]
        source = x
    else:
        half = scalar_initializer(graph, f"{base}_half", 0.5)
        q254 = scalar_initializer(graph, f"{base}_qrange", 254.0)
        hi = ir.node("ReduceMax", [x, axes], {"keepdims": 1}, name=f"{base}/ReduceMax")
        lo = ir.node("ReduceMin", [x, axes], {"keepdims": 1}, name=f"{base}/ReduceMin")
        both = ir.node("Add", [hi.outputs[0], lo.outputs[0]], name=f"{base}/RangeSum")
        mid = ir.node("Mul", [both.outputs[0], half], name=f"{base}/TokenCentre")
        width = ir.node("Sub", [hi.outputs[0], lo.outputs[0]], name=f"{base}/RangeWidth")
        s = ir.node("Div", [width.outputs[0], q254], name=f"{base}/TokenScale")
        shifted = ir.node("Sub", [x, mid.outputs[0]], name=f"{base}/Centred")
        nodes += [hi, lo, both, mid, width, s, shifted]
        centre, source = mid.outputs[0], shifted.outputs[0]
    scale = s.outputs[0]
    if eps:
        floor_value = scalar_initializer(graph, f"{base}_scale_floor", eps)
        floor = ir.node("Max", [scale, floor_value], name=f"{base}/ScaleFloor")
        nodes.append(floor)
        scale = floor.outputs[0]
    q = ir.node("QuantizeLinear", [source, scale],
                {"axis": -1, "block_size": k, "output_dtype": ir.DataType.INT8.value}, name=f"{base}/QuantizeLinear")
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale], {"axis": -1, "block_size": k},
                 name=f"{base}/DequantizeLinear")
    nodes += [q, dq]
    out = dq.outputs[0]
    if centre is not None:
        restore = ir.node("Add", [out, centre], name=f"{base}/Uncentred")
        nodes.append(restore)
        centre.name = f"{base}_token_centre"
        out = restore.outputs[0]
        out.name = f"{base}_uncentred"
        out.dtype = ir.DataType.FLOAT
        out.shape = x.shape
    for node in nodes:
        graph.insert_before(before, node)
    scale.name = f"{base}_token_scale"
    scale.dtype = ir.DataType.FLOAT
    q.outputs[0].name = f"{base}_quantized"
    q.outputs[0].dtype = ir.DataType.INT8
    dq.outputs[0].name = f"{base}_dequantized"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = x.shape
    return out
