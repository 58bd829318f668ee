"""Lower eqc's W8A8-dynamic QDQ linear layers to one `ai.eqc::FusedInt8Gemm` node.

Matched (standard ONNX, as eqc emits it):

    a  = Abs(x);  m = ReduceMax(a, axes=[-1], keepdims=1)
    s  = Div(m, 127)        | Div(Max(m, eps), 127)        | Max(Div(m, 127), eps)
    q  = QuantizeLinear(x, s[, zp=0], axis=-1, block_size=K)      # int8
    dq = DequantizeLinear(q, s[, zp], axis=-1, block_size=K)
    w  = DequantizeLinear(Wq[K,N] int8, w_scale[N][, w_zp=0], axis=1)
    y  = MatMul(dq, w) [+ bias[N]]

Replacement: y = ai.eqc::FusedInt8Gemm(x, Wq^T [N,K] (new initializer), w_scale[, bias]) with
`absmax_floor` / `scale_floor` = eps for the two Max variants, so the op computes the very same
scale. The activation chain may be shared by several MatMuls (q/k/v): matched nodes are not
removed by the rewriter; whatever becomes dead is dropped by RemoveUnusedNodesPass afterwards.
Running the result needs the op library (eqcompiler.runtime.custom_ops).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from eqcompiler.compile.graph import const_array
from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.compile.patterns import weight_dequantize

DOMAIN = "ai.eqc"
OP_TYPE = "FusedInt8Gemm"
OP_VERSION = 1
FLOOR_VARIANTS = ("none", "before_div", "after_div")  # where Max(., eps) sits relative to Div(., 127)


def _is_zero_int8(value: ir.Value | None, size: int | None = None) -> bool:
    """An optional zero point: absent, or an int8 constant of zeros (with `size` elements if given)."""
    if value is None:
        return True
    arr = const_array(value)
    return (arr is not None and arr.dtype == np.int8 and not arr.any()
            and (size is None or arr.size in (1, size)))


def _axis_is_last(node: ir.Node, rank: int | None) -> bool:
    axis = node.attributes.get_int("axis", 1)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        return None if arr is None else [int(v) for v in np.ravel(arr)]
    axes = node.attributes.get_ints("axes", None)  # opset < 18 form
    return None if axes is None else list(axes)


def foldable_bias(y: ir.Value, n: int) -> ir.Value | None:
    """The [N] float constant of an Add that is `y`'s only consumer, if there is one."""
    uses = list(y.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or uses[0].node.domain not in ("", "ai.onnx"):
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    arr = const_array(other)
    if arr is None or arr.dtype != np.float32 or arr.ndim != 1 or arr.shape[0] != n:
        return None
    return None if y.is_graph_output() else other  # y itself is still needed


class FusedInt8GemmRule(RewriteRuleClassBase):
    """One pattern variant: `floor` picks the eps placement, `with_bias` whether an Add is folded."""

    def __init__(self, floor: str = "none", with_bias: bool = False) -> None:
        if floor not in FLOOR_VARIANTS:
            raise ValueError(f"floor must be one of {FLOOR_VARIANTS}")
        super().__init__(name=f"LowerFusedInt8Gemm[{floor}{',bias' if with_bias else ''}]", remove_nodes=False)
        self.floor = floor
        self.with_bias = with_bias
        self._b_cache: dict[int, ir.Value] = {}
        self._pending_name: str = ""

    def setup(self) -> None:
        self._b_cache = {}

    def pattern(self, op, x, c127, eps, wq, w_scale, bias):
        m = op.ReduceMax(op.Abs(x), _allow_other_inputs=True, _outputs=["absmax"])
        if self.floor == "before_div":
            s = op.Div(op.Max(m, eps), c127)
        elif self.floor == "after_div":
            s = op.Max(op.Div(m, c127), eps)
        else:
            s = op.Div(m, c127)
        q = op.QuantizeLinear(x, s, _allow_other_inputs=True, _outputs=["q"])
        dq = op.DequantizeLinear(q, s, _allow_other_inputs=True, _outputs=["dq"])
        w = weight_dequantize(op, wq, w_scale, transposed=False)  # binds w_dq
        y = op.MatMul(dq, w, _outputs=["y"])
        return op.Add(y, bias) if self.with_bias else y

    def check(self, context, x: ir.Value, c127: ir.Value, wq: ir.Value, w_scale: ir.Value, absmax: ir.Value,
              q: ir.Value, dq: ir.Value, w_dq: ir.Value, y: ir.Value, eps: ir.Value | None = None,
              bias: ir.Value | None = None, **_: Any) -> MatchResult:
        result = MatchResult()
        wq_arr, ws_arr = const_array(wq), const_array(w_scale)
        if wq_arr is None or wq_arr.dtype != np.int8 or wq_arr.ndim != 2:
            return result.fail("weight is not a 2-D int8 constant", wq)
        k, n = wq_arr.shape
        if ws_arr is None or ws_arr.dtype != np.float32 or ws_arr.shape != (n,):
            return result.fail(f"weight scale is not a float32 [{n}] constant (per output channel)", w_scale)
        why = (self._check_weight_dq(w_dq.producer(), n) or self._check_activation(x, k)
               or self._check_scale(absmax.producer(), c127, eps, x)
               or self._check_qdq(q.producer(), dq.producer(), k, x))
        if why:
            return result.fail(why)
        if self.with_bias:
            if bias is None or foldable_bias(y, n) is not bias:
                return result.fail("bias is not a float32 [N] constant added to the MatMul output only")
        elif foldable_bias(y, n) is not None:
            return result.fail("a bias Add follows; the bias variant of this rule folds it")
        self._pending_name = self._unique_name(context.graph_or_function, wq)
        return result

    @staticmethod
    def _check_weight_dq(node: ir.Node, n: int) -> str:
        if node.attributes.get_int("block_size", 0):
            return "weight DequantizeLinear is blocked, not per channel"
        if node.attributes.get_int("axis", 1) not in (1, -1):
            return "weight DequantizeLinear is not per output channel (axis=1)"
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        return "" if _is_zero_int8(zp, n) else "weight zero point is not int8 zeros (asymmetric weights)"

    @staticmethod
    def _check_activation(x: ir.Value, k: int) -> str:
        if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
            return f"activation is {x.dtype}, not float32"
        if x.shape is not None and isinstance(x.shape[-1], int) and x.shape[-1] != k:
            return f"activation's last dim {x.shape[-1]} != weight K {k}"
        return ""

    def _check_scale(self, reduce: ir.Node, c127: ir.Value, eps: ir.Value | None, x: ir.Value) -> str:
        rank = x.shape.rank() if x.shape is not None else None
        axes = _reduce_axes(reduce)
        if axes is None or len(axes) != 1 or not (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)):
            return "ReduceMax is not over the last axis only"
        if reduce.attributes.get_int("keepdims", 1) != 1:
            return "ReduceMax drops the reduced axis (keepdims=0)"
        c = const_array(c127)
        if c is None or c.size != 1 or c.dtype != np.float32 or float(c.ravel()[0]) != 127.0:
            return "scale divisor is not the float32 constant 127"
        if self.floor != "none":
            e = const_array(eps)
            if e is None or e.size != 1 or e.dtype != np.float32 or not float(e.ravel()[0]) >= 0.0:
                return "scale floor (Max operand) is not a non-negative float32 scalar constant"
        return ""

    @staticmethod
    def _check_qdq(qnode: ir.Node, dqnode: ir.Node, k: int, x: ir.Value) -> str:
        rank = x.shape.rank() if x.shape is not None else None
        qzp = qnode.inputs[2] if len(qnode.inputs) > 2 else None
        dqzp = dqnode.inputs[2] if len(dqnode.inputs) > 2 else None
        if not (_is_zero_int8(qzp) and _is_zero_int8(dqzp)):
            return "activation zero point is not an int8 zero (asymmetric activations)"
        if qzp is None and qnode.attributes.get_int("output_dtype", 0) != ir.DataType.INT8.value:
            return "QuantizeLinear without zero point does not set output_dtype=INT8"
        for node in (qnode, dqnode):
            if node.attributes.get_int("block_size", 0) != k or not _axis_is_last(node, rank):
                return f"{node.op_type} is not per token (axis=-1, block_size=K={k})"
        return ""

    @staticmethod
    def _unique_name(graph: ir.Graph | ir.Function, wq: ir.Value) -> str:
        base = f"{wq.name or 'weight'}_nk"
        taken = set(graph.initializers) if isinstance(graph, ir.Graph) else set()
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    def rewrite(self, op, x: ir.Value, wq: ir.Value, w_scale: ir.Value, eps: ir.Value | None = None,
                bias: ir.Value | None = None, **_: Any) -> ir.Value:
        b_nk = self._b_cache.get(id(wq))
        if b_nk is None:  # a weight shared by several MatMuls is transposed once
            arr = np.ascontiguousarray(const_array(wq).T)
            b_nk = op.initializer(ir.tensor(arr, name=self._pending_name), name=self._pending_name)
            self._b_cache[id(wq)] = b_nk
        attrs: dict[str, float] = {}
        if self.floor != "none":
            floor = float(const_array(eps).ravel()[0])
            attrs["absmax_floor" if self.floor == "before_div" else "scale_floor"] = floor
        inputs = [x, b_nk, w_scale] + ([bias] if bias is not None else [])
        return op.FusedInt8Gemm(*inputs, _domain=DOMAIN, _version=OP_VERSION, **attrs)


def rules() -> RewriteRuleSet:
    """All variants; bias variants first. commute=True also matches Max(eps, m) and Add(bias, y)."""
    variants = [FusedInt8GemmRule.rule(floor, bias) for bias in (True, False) for floor in FLOOR_VARIANTS]
    return RewriteRuleSet(variants, commute=True)


@dataclasses.dataclass
class LowerFusedInt8GemmOptions:
    pass


class LowerFusedInt8GemmPass(EqcPass):
    name = "lower_fused_int8_gemm"
    Options = LowerFusedInt8GemmOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = rules().apply_to_model(model)
        if count:
            model.opset_imports.setdefault(DOMAIN, OP_VERSION)
            common_passes.RemoveUnusedNodesPass()(model)
        self.report({"fused": count})
        return ir.passes.PassResult(model, modified=bool(count))
