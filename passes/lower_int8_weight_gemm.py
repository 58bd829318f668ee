"""Lower per-channel int8 weight-only QDQ linear layers to eqc's `ai.eqc::Int8WeightGemm` (CPU).

Matched (the same layers as lower_weight_only_int8: quantize_weights with block_size=0, run after
the integer lowerings so it takes what they left, e.g. every layer of w8, or the tied lm_head of
w8a8-dynamic):

    w = DequantizeLinear(Wq int8 [K,N], scale [N], zp=0, axis=1)          -> MatMul(x, w) [+ bias]
    w = Transpose(DequantizeLinear(T int8 [N,K], scale [N], zp=0, axis=0)) -> MatMul(x, w) [+ bias]

Why: ONNX Runtime's CPU provider dequantizes a weight DequantizeLinear on every run, and for the
tied 49152x576 lm_head that alone (73 ms per SmolLM2 decode step on the 2-core CI machine) costs
more than the whole fp32 step; MatMulNBits bits=8 (lower_weight_only_int8) was slower still. The op
reads the int8 weight directly and multiplies in float: y = (x . float(Wq[n,:])) * scale[n] (+ bias),
the QDQ graph's value up to float summation order, with no activation quantization. By default
(activation_bits=16) the op first rounds each activation row to int16 (absmax/32767) and multiplies exactly in
integers: 258x finer than the int8 per-token input that costs the lm_head +0.6% ppl, and 1.6x faster at a
SmolLM2 decode step's lm_head (2.10 -> 1.32 ms, AVX-512 VNNI, 2 threads); activation_bits=0 keeps float
math, and so does a layer whose input comes out of a DequantizeLinear (measured, see _already_quantized). The tied
table is read in place ([N,K] is the op's layout), so the embedding Gathers keep sharing it; an
untied [K,N] weight is replaced by its transpose. Needs the eqc op library at run time (CPU kernel
only: the CUDA provider runs the weight-only QDQ graph as is).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.graph import find_linear_sites, weight_dequantize_node
from eqcompiler.compile.layer_selection import EVERY_LAYER, LayerSelection
from eqcompiler.compile.patterns import LinearSiteRule, RuleRecord, lower_with_rules, per_channel_int8
from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.errors import EqcError
from eqcompiler.passes.lower_fused_int8_gemm import DOMAIN, OP_VERSION, foldable_bias

OP_TYPE = "Int8WeightGemm"


@dataclasses.dataclass
class LowerInt8WeightGemmOptions(LayerSelection):
    activation_bits: int = 16  # 16: int16 activation rows, exact integer products; 0: float math

    def validate(self) -> None:
        if self.activation_bits not in (0, 16):
            raise EqcError(f"lower_int8_weight_gemm: activation_bits must be 0 (float math) or 16, "
                           f"got {self.activation_bits}")


class Int8WeightGemmRule(LinearSiteRule):
    """MatMul(x, [Transpose] per-channel int8 DequantizeLinear) [+ bias] -> Int8WeightGemm.

    Four variants: `transposed` (a tied [N, K] table, read in place) and `with_bias` (a float [N] Add
    folded into the op). Int8 weights shared by several MatMuls are transposed once (`nk_for`)."""

    def __init__(self, transposed: bool = False, with_bias: bool = False, select: LayerSelection = EVERY_LAYER,
                 record: RuleRecord | None = None, nk_for: dict[int, ir.Value] | None = None,
                 activation_bits: int = 16) -> None:
        super().__init__(f"LowerInt8WeightGemm[{'tied' if transposed else 'kn'}{',bias' if with_bias else ''}]",
                         transposed=transposed, select=select, with_bias=with_bias, record=record)
        self.nk_for = nk_for if nk_for is not None else {}
        self.activation_bits = activation_bits

    def check_site(self, x: ir.Value, w_scale: ir.Value, w_dq: ir.Value, y: ir.Value, bias: ir.Value | None = None,
                   **_: Any) -> str:
        why = per_channel_int8(w_dq.producer(), self.transposed)
        if why:
            return why
        if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
            return f"activation is {x.dtype}, not float32"
        if w_scale.const_value.dtype != ir.DataType.FLOAT:
            return "weight scale is not float32"
        n = w_scale.const_value.shape[0]
        folded = foldable_bias(y, n)
        if self.with_bias and (bias is None or folded is not bias):
            return "bias is not a float32 [N] constant added to the MatMul output only"
        if not self.with_bias and folded is not None:
            return "a bias Add follows; the bias variant of this rule folds it"
        return ""

    def rewrite(self, op, x: ir.Value, wq: ir.Value, w_scale: ir.Value, y: ir.Value, bias: ir.Value | None = None,
                **_: Any):
        matmul = self.matched(y)
        b_nk = self.nk_for.get(id(wq))
        if b_nk is None:
            if self.transposed:  # tied table: already [N, K]
                b_nk = wq
            else:
                base = (wq.name or "weight").removesuffix("_quantized")
                b_nk = self.initializer(op, f"{base}_nk", np.ascontiguousarray(wq.const_value.numpy().T))
            self.nk_for[id(wq)] = b_nk
        inputs = [x, b_nk, w_scale] + ([bias] if bias is not None else [])
        bits = self.activation_bits if not _already_quantized(x) else 0
        attrs = {"activation_bits": bits} if bits else {}
        out = op.Int8WeightGemm(*inputs, _domain=DOMAIN, _version=OP_VERSION, _name=f"{matmul.name}/{OP_TYPE}", **attrs)
        out.dtype = ir.DataType.FLOAT
        return out


def _already_quantized(x: ir.Value) -> bool:
    """An input that is the output of a DequantizeLinear (w8a8-smooth's per-token down_proj inputs) keeps float
    math: rounding its int8-grid values again to int16 cost SmolLM2 w8a8-smooth +0.11% ppl (29.871 against 29.839
    with float math on those 30 layers), while the float lm_head input loses nothing (29.83925 against 29.83927)."""
    producer = x.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def rules(select: LayerSelection = EVERY_LAYER, record: RuleRecord | None = None,
          activation_bits: int = 16) -> list[Int8WeightGemmRule]:
    """Every variant, sharing one record and one transposed-weight cache."""
    record = record if record is not None else RuleRecord()
    nk_for: dict[int, ir.Value] = {}
    return [Int8WeightGemmRule(transposed, bias, select, record, nk_for, activation_bits)
            for bias in (True, False) for transposed in (False, True)]


class LowerInt8WeightGemmPass(EqcPass):
    name = "lower_int8_weight_gemm"
    Options = LowerInt8WeightGemmOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        bits = self.options.activation_bits
        record = RuleRecord()
        # prune: also drops the [K, N] originals now read by nothing
        lowered = lower_with_rules(model, rules(self.options, record, bits), (DOMAIN, OP_VERSION), prune=True)
        skipped = self._left_qdq(model.graph, record.rejected)
        if skipped:  # stays correct (QDQ), but slow: say so instead of leaving it silent
            name, why = next(iter(skipped.items()))
            self.context.warn(f"{self.name}: {len(skipped)} int8 weight-only layer(s) stay QDQ (dequantized every run), "
                              f"e.g. {name}: {why}")
        self.report({"lowered": len(lowered), "op": f"{DOMAIN}::{OP_TYPE}", "activation_bits": bits, "skipped": skipped})
        return ir.passes.PassResult(model, modified=bool(lowered))

    def _left_qdq(self, graph: ir.Graph, rejected: dict[int, str]) -> dict[str, str]:
        """Selected int8 weight-only layers still QDQ, with why: the rule's refusal, or a Gemm the rules do not match."""
        left: dict[str, str] = {}
        for site in find_linear_sites(graph, self.options):
            dq = weight_dequantize_node(site.node)
            if dq is not None and not per_channel_int8(dq, site.transposed):
                left[site.name] = rejected.get(id(site.node), f"{site.node.op_type}, not MatMul")
        return left
