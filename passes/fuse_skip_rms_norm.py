"""Fuse residual Add + RMSNorm into `com.microsoft::SkipSimplifiedLayerNormalization` (ort-cpu / ort-cuda).

Matched (a decoder layer's residual sum followed by its norm, as exported; identity Casts removed first):

    s   = Add(a, b)
    inv = Reciprocal(Sqrt(Add(ReduceMean(Pow(s, 2), axes=[-1], keepdims=1), eps)))   # or Div(1, Sqrt(..))
    y   = Mul(weight, Mul(s, inv))                                                    # either operand order

Replacement: y, _, _, s = SkipSimplifiedLayerNormalization(a, b, weight, epsilon=eps): one kernel instead
of seven, and the residual sum comes out of it for the next layer. A norm with no residual Add in front
(the first layer's) stays as it is: ORT's standalone SimplifiedLayerNormalization sits in the ONNX domain
without an ONNX schema, so a graph holding it fails onnx.checker.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet, pattern

from eqcompiler.compile.fusion import (MS_DOMAIN, const_ints, is_float32, name_fused_nodes, prepare_for_fusion, scalar,
                                      use_ms_domain)
from eqcompiler.compile.graph import const_array
from eqcompiler.compile.pass_base import EqcPass


class SkipRmsNormRule(RewriteRuleClassBase):
    def __init__(self, weight_first: bool) -> None:
        super().__init__(name=f"SkipRmsNorm[{'weight*x' if weight_first else 'x*weight'}]")
        self.weight_first = weight_first

    def pattern(self, op, a, b, two, axes, eps, one, weight):
        s = op.Add(a, b, _outputs=["s"])
        mean = op.ReduceMean(op.Pow(s, two), axes, _allow_other_attributes=True, _outputs=["mean"])
        root = op.Sqrt(op.Add(mean, eps))
        inv = pattern.OrValue([op.Reciprocal(root), op.Div(one, root)])
        normed = op.Mul(s, inv)
        return (op.Mul(weight, normed) if self.weight_first else op.Mul(normed, weight)), s

    def check(self, context, a, b, two, axes, eps, weight, s, mean, one=None, **_: Any) -> MatchResult:
        result = MatchResult()
        if not (is_float32(a) and is_float32(b)):
            return result.fail("residual operands are not float32 (or their types are unknown)", [a, b])
        if scalar(two) != 2.0:
            return result.fail("Pow exponent is not the constant 2", two)
        if const_ints(axes) not in ([-1],) and not (s.shape is not None and const_ints(axes) == [s.shape.rank() - 1]):
            return result.fail("ReduceMean is not over the last axis only", axes)
        if mean.producer().attributes.get_int("keepdims", 1) != 1:
            return result.fail("ReduceMean drops the axis (keepdims=0)", mean)
        if scalar(eps) is None or not scalar(eps) >= 0.0:
            return result.fail("epsilon is not a non-negative scalar constant", eps)
        if one is not None and scalar(one) != 1.0:
            return result.fail("Div numerator is not the constant 1", one)
        w = const_array(weight)
        if w is None or w.ndim != 1 or w.dtype.name != "float32":
            return result.fail("norm weight is not a 1-D float32 constant", weight)
        hidden = s.shape[-1] if s.shape is not None else None
        if isinstance(hidden, int) and hidden != w.shape[0]:
            return result.fail(f"norm weight has {w.shape[0]} elements, hidden size is {hidden}", weight)
        return result

    def rewrite(self, op, a, b, eps, weight, **_: Any):
        y, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            a, b, weight, epsilon=scalar(eps), _domain=MS_DOMAIN, _outputs=4)
        return y, total


def rules() -> RewriteRuleSet:
    return RewriteRuleSet([SkipRmsNormRule.rule(True), SkipRmsNormRule.rule(False)])


@dataclasses.dataclass
class FuseSkipRmsNormOptions:
    pass


class FuseSkipRmsNormPass(EqcPass):
    name = "fuse_skip_rms_norm"
    Options = FuseSkipRmsNormOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        prepare_for_fusion(model)
        count = rules().apply_to_model(model)
        if count:
            use_ms_domain(model)
            common_passes.RemoveUnusedNodesPass()(model)
            name_fused_nodes(model.graph, "fused_norm", {"SkipSimplifiedLayerNormalization"})
        self.report({"fused": count})
        return ir.passes.PassResult(model, modified=bool(count))
