"""Pattern pieces the lowering rules share (onnxscript rewriter), instead of one hand-walk per pass.

A lowering is a set of `RewriteRuleClassBase` rules: `pattern` (built from the pieces below), `check`
(returns a MatchResult whose `reason` says why a candidate is left alone) and `rewrite` (the replacement).
`LinearSiteRule` is the common base of the weight-QDQ linear lowerings: it matches

    y = MatMul(x, DequantizeLinear(wq, w_scale[, w_zp]))                 (transposed=False)
    y = MatMul(x, Transpose(DequantizeLinear(wq, w_scale[, w_zp])))      (transposed=True: a tied lm_head)

and checks what every such lowering needs (the layer is selected, the weight is a constant 2-D tensor, the
Transpose swaps the two axes), then asks the subclass (`check_site`). `apply_rules` runs the rules over the
graph touching nothing they did not match (see there).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import MatchResult, RewriteRule, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.pattern import Var

from eqcompiler.compile.graph import const_array, is_constant, layer_name
from eqcompiler.compile.layer_selection import EVERY_LAYER, LayerSelection


# ---- pattern pieces ------------------------------------------------------------------------------

def weight_dequantize(op: Any, wq: Any, w_scale: Any, transposed: bool) -> Any:
    """DequantizeLinear(wq, w_scale[, w_zp]) [-> Transpose]: a linear's quantized weight operand.

    Binds `w_dq` (the DequantizeLinear output) and, when transposed, `w_t` (the Transpose output)."""
    w = op.DequantizeLinear(wq, w_scale, _allow_other_inputs=True, _outputs=["w_dq"])
    return op.Transpose(w, _outputs=["w_t"]) if transposed else w


def quantize_dequantize(op: Any, x: Any) -> Any:
    """DequantizeLinear(QuantizeLinear(x, a_scale, a_zp), ...): an activation's static Q->DQ pair.

    Binds `a_scale`, `a_zp`, `q` (the QuantizeLinear output) and `a_dq`; that the DQ reads the same
    constant scale and zero point is the rule's check (compile.graph.static_activation_quantize)."""
    q = op.QuantizeLinear(x, Var("a_scale"), Var("a_zp"), _outputs=["q"])
    return op.DequantizeLinear(q, _allow_other_inputs=True, _outputs=["a_dq"])


# ---- checks shared by the rules ------------------------------------------------------------------

def optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def per_channel_int8(dq: ir.Node, transposed: bool, zero_zp: bool = True) -> str:
    """'' when `dq` is a per-output-channel int8 DequantizeLinear (with zero or no zero point unless
    `zero_zp` is False), else why not. The output channel is axis 1 of a [K, N] weight, axis 0 of a
    transposed [N, K] table."""
    if dq.attributes.get_int("block_size", 0):
        return "weight DequantizeLinear is blocked, not per channel"
    wq, scale_value = dq.inputs[0], dq.inputs[1]
    if wq.const_value is None or wq.const_value.dtype != ir.DataType.INT8:
        return "weight is not an int8 constant"
    scale = const_array(scale_value) if is_constant(scale_value) else None
    if scale is None or scale.ndim != 1:
        return "weight scale is not a 1-D constant (one per output channel)"
    zp_value = optional_input(dq, 2)
    zp = const_array(zp_value) if zp_value is not None else None
    if zp_value is not None and zp is None:
        return "weight zero point is not a constant"
    if zero_zp and zp is not None and np.any(zp):
        return "weight zero point is not zero (asymmetric weights)"
    if dq.attributes.get_int("axis", 1) % 2 != (0 if transposed else 1):
        return "weight DequantizeLinear is not along the output channel"
    return ""


# ---- the linear-site rule base -------------------------------------------------------------------

@dataclasses.dataclass
class RuleRecord:
    """What a pass's rules did, shared by its variants: lowered layer names in the order they were
    rewritten (graph order), the matched nodes to remove once dead, and check's refusals by MatMul."""

    lowered: list[str] = dataclasses.field(default_factory=list)
    replaced: list[ir.Node] = dataclasses.field(default_factory=list)
    rejected: dict[int, str] = dataclasses.field(default_factory=dict)


class LinearSiteRule(RewriteRuleClassBase):
    """Base of the rules that lower `MatMul(x, weight_dequantize(...))`; subclasses set `check_site`/`rewrite`.

    `select` is the pass's include/exclude; `record` collects what the rule did (see RuleRecord)."""

    def __init__(self, name: str, transposed: bool = False, select: LayerSelection = EVERY_LAYER,
                 with_bias: bool = False, record: RuleRecord | None = None) -> None:
        super().__init__(name=name, remove_nodes=False)
        self.transposed = transposed
        self.select = select
        self.with_bias = with_bias
        self.record = record if record is not None else RuleRecord()
        self._graph: ir.Graph | None = None
        self._pending: list[ir.Node] = []
        self._reserved: set[str] = set()

    def activation(self, op: Any, x: Any) -> Any:
        """The MatMul's first operand; a subclass matches more (e.g. a Q->DQ pair) here."""
        return x

    def pattern(self, op, x, wq, w_scale, bias):
        y = op.MatMul(self.activation(op, x), weight_dequantize(op, wq, w_scale, self.transposed), _outputs=["y"])
        return op.Add(y, bias) if self.with_bias else y

    def check(self, context, x: ir.Value, wq: ir.Value, w_scale: ir.Value, w_dq: ir.Value, y: ir.Value,
              **bindings: Any) -> MatchResult:
        result = MatchResult()
        matmul = y.producer()
        name = layer_name(matmul)
        why = self._check_common(name, wq, bindings.get("w_t"), matmul) or self.check_site(
            x=x, wq=wq, w_scale=w_scale, w_dq=w_dq, y=y, **bindings)
        if why:
            self.record.rejected[id(matmul)] = why
            return result.fail(why, matmul)
        self._graph = context.graph_or_function
        self._pending = list(context.nodes)  # rewrite follows a successful check at once
        return result

    def _check_common(self, name: str, wq: ir.Value, w_t: ir.Value | None, node: ir.Node | None = None) -> str:
        if not self.select.selects(name, node):
            return f"layer '{name}' is left out by include/exclude"
        if not is_constant(wq) or wq.shape is None or len(wq.shape) != 2:
            return "weight is not a constant 2-D tensor"
        if w_t is not None:
            perm = w_t.producer().attributes.get_ints("perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return f"weight Transpose perm {list(perm)} is not [1, 0]"
        return ""

    def check_site(self, **bindings: Any) -> str:
        """'' when the subclass can lower this match, else why not (the MatchResult's reason)."""
        return ""

    def matched(self, y: ir.Value) -> ir.Node:
        """Record a rewrite: the layer name, and the matched nodes (removed once dead). Returns the MatMul."""
        matmul = y.producer()
        self.record.lowered.append(layer_name(matmul))
        self.record.replaced.extend(self._pending)
        return matmul

    def initializer(self, op: Any, name: str, array: np.ndarray) -> ir.Value:
        """A new initializer with a name no other initializer has (compile.graph.new_initializer's rule)."""
        taken = set(self._graph.initializers) if isinstance(self._graph, ir.Graph) else set()
        base, k = name, 1
        while name in taken or name in self._reserved:
            name, k = f"{base}_{k}", k + 1
        self._reserved.add(name)
        return op.initializer(ir.tensor(array, name=name), name=name)

    def as_rule(self) -> RewriteRule:
        """This instance as a rule (RewriteRuleClassBase.rule() would build a fresh one, losing `record`)."""
        return RewriteRule(self.pattern, self.rewrite, self.check, name=self.name, remove_nodes=self.remove_nodes,
                           graph_pre_visitor=self.setup, graph_post_visitor=self.cleanup)


def apply_rules(model: ir.Model, rules: Sequence[LinearSiteRule]) -> int:
    """Apply `rules` (variants sharing one RuleRecord) to the main graph; returns the rewrite count.

    The loop of RewriteRuleSet.apply_to_model without its model-wide side effects (constant propagation
    into every Constant's value_info, a NameFixPass, removing every dead node, rule-name metadata on the
    new nodes): a lowering touches only what it matched, so its output is what the hand-written version
    wrote. Matched nodes are removed once dead (a DequantizeLinear shared by q/k/v dies with the last)."""
    graph = model.graph
    variants = RewriteRuleSet([r.as_rule() for r in rules], commute=True).rules  # commuted copies included
    for rule in rules:
        rule.setup()
    count = 0
    for node in graph:
        for rule in variants:
            delta = rule.try_rewrite(model, graph, node)
            if delta is None:
                continue
            for value in delta.new_initializers:
                graph.register_initializer(value)
            ir.convenience.replace_nodes_and_values(graph, node, [], delta.new_nodes, delta.match.outputs,
                                                    delta.new_outputs)
            count += 1
            break
    for rule in rules:
        rule.cleanup()
    replaced = {id(n): n for rule in rules for n in rule.record.replaced}
    for dead in reversed([n for n in graph if id(n) in replaced]):  # consumers before what feeds them
        if all(not v.uses() and not v.is_graph_output() for v in dead.outputs):
            graph.remove(dead, safe=True)
    return count


def lower_with_rules(model: ir.Model, rules: Sequence[LinearSiteRule], domain: tuple[str, int],
                     prune: bool = False) -> list[str]:
    """A lowering pass's body: apply `rules` (sharing one RuleRecord), import the new op's (domain, version)
    when a layer was lowered, and with `prune` drop what is now read by nothing (the original weights).
    Returns the lowered layers' names."""
    apply_rules(model, rules)
    lowered = rules[0].record.lowered if rules else []
    if lowered:
        model.opset_imports.setdefault(*domain)
        if prune:
            RemoveUnusedNodesPass()(model)
    return lowered
