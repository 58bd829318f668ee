"""Online int8 activations with an EMA-tracked scale carried through the decode loop (LLMEasyQuant's
"online" mode with its running scale, Algorithm 1).

For every activation X [B, ...] feeding linear layers, each decode step quantizes X per tensor (one
scale per batch row) with a running absmax m that the graph carries from step to step as cache state:

    a_t = max |X_t| over the step's tokens            (per batch row)
    m_t = a_t                                         on the first step (prefill: no state yet)
    m_t = decay * m_{t-1} + (1 - decay) * a_t         afterwards
    s_t = max(m_t / 127, eps);  X -> DequantizeLinear(QuantizeLinear(X, s_t, axis=0), s_t, axis=0)

Values above 127 * s_t saturate: the EMA trades the step's own outliers for a scale that does not
jump with every token. The state is a graph input `past_key_values.act_ema.{n}` [batch, 1, P, 1] (P = 0
at prefill, 1 afterwards) and output `present.act_ema.{n}` [batch, 1, 1, 1], so the KV-cache loop
(eqcompiler.runtime.decode.CacheRunner: `eqc eval --chunk`, generation) carries it like the
cache itself: present.* feeds past_key_values.* of the next step. A caller that runs the graph without
the cache loop (each window as a prefill) gets per-row dynamic per-tensor scales, m_t = a_t.

Documented as such: this is state in the caller's decode loop, not a fixed property of the graph, and
the same tokens give different scales under different histories. Per-token scales
(quantize_activations_dynamic) are exact per row and need no state; the EMA variant exists for
runtimes that want one scale per step (per-tensor int8 kernels) without a calibration pass.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.io_names import STATE_PAST, STATE_PRESENT
from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import int_constant, node_order, scalar_initializer, sites_by_activation
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass



@dataclasses.dataclass
class QuantizeActivationsEmaOptions(LayerSelection):
    decay: float = 0.9  # weight of the running absmax; 0 = each step's own absmax
    eps: float = 1e-8

    def validate(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise EqcError(f"quantize_activations_ema: decay must be in [0, 1), got {self.decay}")
        if self.eps < 0:
            raise EqcError(f"quantize_activations_ema: eps must be >= 0, got {self.eps}")


def ema_reference(steps: list[np.ndarray], decay: float, eps: float = 1e-8) -> list[tuple[np.ndarray, np.ndarray]]:
    """numpy statement of the pass: for each step's X [B, S, K], (dequantized X, running absmax m [B])."""
    out, m = [], None
    for x in steps:
        a = np.abs(x).max(axis=(1, 2))
        m = a if m is None else (decay * m + (1 - decay) * a).astype(np.float32)
        s = np.maximum(m / np.float32(127.0), np.float32(eps)).astype(np.float32)[:, None, None]
        out.append(((np.clip(np.rint(x / s), -128, 127) * s).astype(np.float32), m.astype(np.float32)))
    return out


def _batch_dim(graph: ir.Graph, x: ir.Value) -> int | str:
    """The batch dimension's name (or size), from the activation or else the graph's input_ids."""
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    for value in (x, ids):
        if value is not None and value.shape is not None and len(value.shape) >= 1:
            dim = value.shape[0]
            return dim if isinstance(dim, int) else str(dim)
    return "batch"


class QuantizeActivationsEmaPass(EqcPass):
    name = "quantize_activations_ema"
    Options = QuantizeActivationsEmaOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        order = node_order(graph)
        done: dict[str, str] = {}
        taken = {v.name for v in graph.inputs}
        index = 0
        for group in sites_by_activation(graph, opts):
            x = group[0].activation
            if x.shape is not None and len(x.shape) < 2:
                raise EqcError(f"quantize_activations_ema: '{x.name}' has no batch axis (shape {x.shape}); exclude its layers")
            while f"{STATE_PAST}{index}" in taken:
                index += 1
            first = min((s.node for s in group), key=lambda n: order[id(n)])
            dq = self._emit(graph, x, index, first)
            for site in group:
                site.node.replace_input_with(0, dq)
            done[x.name or group[0].name] = f"{STATE_PAST}{index}"
            index += 1
        if not done:
            raise EqcError("quantize_activations_ema matched no linear layer input"
                           + (f" (include={opts.include!r} exclude={opts.exclude!r})" if opts.filters else ""))
        self.report({"tensors": len(done), "state": done, "decay": opts.decay,
                     "granularity": "per-tensor int8 per batch row, EMA-tracked absmax carried as past/present state"})
        return ir.passes.PassResult(model, modified=True)

    def _emit(self, graph: ir.Graph, x: ir.Value, index: int, before: ir.Node) -> ir.Value:
        opts = self.options
        base = x.name or f"activation{index}"
        batch = _batch_dim(graph, x)
        past = ir.Value(name=f"{STATE_PAST}{index}", shape=ir.Shape([batch, 1, f"act_ema_len_{index}", 1]),
                        type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(past)
        rows = int_constant(graph, f"{base}_ema_rows", [0, -1])  # [B, everything else]: any rank
        state_shape = int_constant(graph, f"{base}_ema_state_shape", [-1, 1, 1, 1])
        reduce_axis = int_constant(graph, f"{base}_ema_reduce_axis", [1])
        steps_axis = int_constant(graph, f"{base}_ema_steps_axis", [2])
        flat = int_constant(graph, f"{base}_ema_flat", [-1])
        decay = scalar_initializer(graph, f"{base}_ema_decay", opts.decay)
        fresh = scalar_initializer(graph, f"{base}_ema_fresh", 1.0 - opts.decay)
        q127 = scalar_initializer(graph, f"{base}_ema_qmax", 127.0)
        absx = ir.node("Abs", [x], name=f"{base}/ema/Abs")
        by_row = ir.node("Reshape", [absx.outputs[0], rows], name=f"{base}/ema/Rows")
        amax = ir.node("ReduceMax", [by_row.outputs[0], reduce_axis], {"keepdims": 1}, name=f"{base}/ema/StepAbsmax")
        amax4 = ir.node("Reshape", [amax.outputs[0], state_shape], name=f"{base}/ema/StepAbsmax4d")  # [B,1,1,1]
        # m_t = (decay * sum(past) + (1 - decay) * a_t) / (decay * P + 1 - decay): a_t when P = 0, the EMA when P = 1.
        w_past = ir.node("Mul", [past, decay], name=f"{base}/ema/WeightedPast")
        w_cur = ir.node("Mul", [amax4.outputs[0], fresh], name=f"{base}/ema/WeightedStep")
        both = ir.node("Concat", [w_past.outputs[0], w_cur.outputs[0]], {"axis": 2}, name=f"{base}/ema/Terms")
        num = ir.node("ReduceSum", [both.outputs[0], steps_axis], {"keepdims": 1}, name=f"{base}/ema/Numerator")
        shape = ir.node("Shape", [past], {"start": 2, "end": 3}, name=f"{base}/ema/PastLength")
        length = ir.node("Cast", [shape.outputs[0]], {"to": ir.DataType.FLOAT.value}, name=f"{base}/ema/PastLengthF")
        den0 = ir.node("Mul", [length.outputs[0], decay], name=f"{base}/ema/DenPast")
        den = ir.node("Add", [den0.outputs[0], fresh], name=f"{base}/ema/Denominator")
        m = ir.node("Div", [num.outputs[0], den.outputs[0]], name=f"{base}/ema/RunningAbsmax")  # [B,1,1,1]
        s = ir.node("Div", [m.outputs[0], q127], name=f"{base}/ema/Scale4d")
        s1 = ir.node("Reshape", [s.outputs[0], flat], name=f"{base}/ema/Scale")  # [B]
        nodes = [absx, by_row, amax, amax4, w_past, w_cur, both, num, shape, length, den0, den, m, s, s1]
        scale = s1.outputs[0]
        if opts.eps:
            floor_value = scalar_initializer(graph, f"{base}_ema_scale_floor", opts.eps)
            floor = ir.node("Max", [scale, floor_value], name=f"{base}/ema/ScaleFloor")
            nodes.append(floor)
            scale = floor.outputs[0]
        q = ir.node("QuantizeLinear", [x, scale], {"axis": 0, "output_dtype": ir.DataType.INT8.value},
                    name=f"{base}/ema/QuantizeLinear")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale], {"axis": 0}, name=f"{base}/ema/DequantizeLinear")
        nodes += [q, dq]
        for node in nodes:
            graph.insert_before(before, node)
        present = m.outputs[0]
        present.name, present.dtype = f"{STATE_PRESENT}{index}", ir.DataType.FLOAT
        present.shape = ir.Shape([batch, 1, 1, 1])
        graph.outputs.append(present)
        scale.name, scale.dtype = f"{base}_ema_scale", ir.DataType.FLOAT
        q.outputs[0].name, q.outputs[0].dtype = f"{base}_ema_quantized", ir.DataType.INT8
        dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = f"{base}_ema_dequantized", ir.DataType.FLOAT, x.shape
        return dq.outputs[0]
