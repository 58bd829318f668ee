"""Lower per-channel int8 weight-only QDQ linear layers to `com.microsoft::MatMulNBits` (bits=8).

Matched (quantize_weights with block_size=0; for ort-cpu, scheduled by lowering/targets.py for weight-only
recipes: all of w8, the tied int8 table of w4-* and mixed; w8a8-* leave their lm_head to Int8WeightGemm):

    w = DequantizeLinear(Wq int8 [K,N], scale [N], zp=0, axis=1)        -> MatMul(x, w)
    w = Transpose(DequantizeLinear(T int8 [N,K], scale [N], zp=0, axis=0)) -> MatMul(x, w)  (tied lm_head)

ONNX Runtime's CPU provider does not fold or fuse a weight DequantizeLinear, so the QDQ graph
dequantizes every weight on every run (the tied 49152x576 lm_head alone is 28M values per token).
MatMulNBits reads the 8-bit weight directly. Per-channel scales are exactly blocked scales repeated
over every block of K, so at accuracy_level 0 (float32 compute) the numerics are those of the QDQ graph;
ort-cpu uses level 4 (activations quantized to int8 per block, integer dot products: faster, not exact). Signed q is stored as q + 128 with MatMulNBits' default zero point 128
(passes/lower_matmul_nbits.to_matmul_nbits does the packing). For the tied table, MatMulNBits'
B layout [N, blocks, block] *is* the table's row layout, so the embedding Gather is redirected to
read rows of it (with zero point 128), and the table is still stored once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.compile.layer_selection import EVERY_LAYER, LayerSelection
from eqcompiler.compile.patterns import LinearSiteRule, RuleRecord, lower_with_rules, per_channel_int8
from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.passes.lower_matmul_nbits import to_matmul_nbits

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class LowerWeightOnlyInt8Options(LayerSelection):
    accuracy_level: int = 0  # 0: float32 compute, the QDQ graph's numerics


def _block_for(k: int) -> int:
    """The largest power-of-two block (16..128) dividing K, so no block needs padding."""
    return next((b for b in (128, 64, 32, 16) if k % b == 0), 128)


class WeightOnlyInt8Rule(LinearSiteRule):
    """MatMul(x, [Transpose] per-channel int8 zero-zp DequantizeLinear) -> MatMulNBits bits=8.

    The activation may itself be Q->DQ (a layer no integer lowering took, e.g. the tied lm_head of a
    per-token dynamic recipe): MatMulNBits then reads the dequantized activation, same numerics.
    A weight read by several MatMuls is packed once (`packed_for`, shared by the variants)."""

    def __init__(self, transposed: bool = False, accuracy_level: int = 0, select: LayerSelection = EVERY_LAYER,
                 record: RuleRecord | None = None, packed_for: dict[int, tuple[ir.Value, ir.Value, int]] | None = None):
        super().__init__(f"LowerWeightOnlyInt8[{'tied' if transposed else 'kn'}]", transposed=transposed,
                         select=select, record=record)
        self.accuracy_level = accuracy_level
        self.packed_for = packed_for if packed_for is not None else {}

    def check_site(self, w_dq: ir.Value, **_: Any) -> str:
        return per_channel_int8(w_dq.producer(), self.transposed)

    def rewrite(self, op, x: ir.Value, wq: ir.Value, w_scale: ir.Value, y: ir.Value, **_: Any):
        matmul = self.matched(y)
        q = wq.const_value.numpy()
        k, n = q.shape[::-1] if self.transposed else q.shape
        if id(wq) not in self.packed_for:
            block = _block_for(k)
            n_blocks = -(-k // block)
            scale = np.tile(w_scale.const_value.numpy()[None, :], (n_blocks, 1))
            packed, scales, _ = to_matmul_nbits(q.T if self.transposed else q, scale, None, 8, True, block)
            base = (wq.name or "weight").removesuffix("_quantized")
            self.packed_for[id(wq)] = (self.initializer(op, f"{base}_nbits", packed),
                                       self.initializer(op, f"{base}_nbits_scales", scales), block)
            if self.transposed:
                self._redirect_gathers(op, wq, self.packed_for[id(wq)][0], k)
        b, s, block = self.packed_for[id(wq)]
        out = op.MatMulNBits(x, b, s, K=k, N=n, bits=8, block_size=block, accuracy_level=self.accuracy_level,
                             _domain=MS_DOMAIN, _version=1, _name=f"{matmul.name}/MatMulNBits")
        out.dtype = ir.DataType.FLOAT
        return out

    def _redirect_gathers(self, op, wq: ir.Value, packed: ir.Value, k: int) -> None:
        """Embedding rows from the packed [N, blocks, block] uint8 table, with zero point 128: Gather reads whole
        rows of it and only the gathered rows are reshaped to [..., K] (a padded last block cut off), so ORT keeps
        one copy of the table (a Reshape of the table itself is folded into a second copy at session start:
        28 MB more on SmolLM2)."""
        for use in list(wq.uses()):
            gather = use.node
            if gather.op_type != "Gather" or use.idx != 0 or gather.attributes.get_int("axis", 0) != 0:
                continue
            dq = next((u.node for u in gather.outputs[0].uses() if u.node.op_type == "DequantizeLinear"), None)
            if dq is None or len(dq.inputs) < 3 or dq.inputs[2] is None:
                continue
            zp_src = dq.inputs[2].producer()  # Unsqueeze(Gather(zp table, ids))
            zp_gather = zp_src.inputs[0].producer() if zp_src is not None and zp_src.op_type == "Unsqueeze" else None
            if zp_gather is None or zp_gather.op_type != "Gather":
                continue
            zp128 = self.initializer(op, f"{packed.name}_row_zero_point", np.full(int(wq.shape[0]), 128, np.uint8))
            zp_gather.replace_input_with(0, zp128)
            gather.replace_input_with(0, packed)
            gather.outputs[0].shape = None  # [..., blocks, block] now
            dq.replace_input_with(0, self._rows(op, gather, packed, k))
            for value in (gather.outputs[0], zp_gather.outputs[0], zp_src.outputs[0]):  # rows and zero points: uint8 now
                if value.dtype is not None:
                    value.dtype = ir.DataType.UINT8

    def _rows(self, op, gather: ir.Node, packed: ir.Value, k: int) -> ir.Value:
        """Gathered [..., blocks, block] rows as [..., K]: Reshape to [ids shape, blocks * block], then Slice."""
        _, blocks, block = packed.const_value.shape
        width = self.initializer(op, f"{packed.name}_row_width", np.array([blocks * block], np.int64))
        ids_shape = ir.node("Shape", [gather.inputs[1]], name=f"{gather.name}/ids_shape")
        target = ir.node("Concat", [ids_shape.outputs[0], width], attributes={"axis": 0}, name=f"{gather.name}/rows_shape")
        nodes = [ids_shape, target, ir.node("Reshape", [gather.outputs[0], target.outputs[0]], name=f"{gather.name}/rows")]
        if blocks * block != k:  # the last block was padded: keep the first K values of each row
            ends = self.initializer(op, f"{packed.name}_row_end", np.array([k], np.int64))
            starts = self.initializer(op, f"{packed.name}_row_start", np.array([0], np.int64))
            axes = self.initializer(op, f"{packed.name}_row_axis", np.array([-1], np.int64))
            nodes.append(ir.node("Slice", [nodes[-1].outputs[0], starts, ends, axes], name=f"{gather.name}/rows_cut"))
        anchor = gather
        for node in nodes:
            node.outputs[0].name = f"{node.name}_output_0"  # named from the node: the same bytes however compiled
            self._graph.insert_after(anchor, node)
            anchor = node
        rows = nodes[-1].outputs[0]
        rows.name, rows.dtype = f"{gather.outputs[0].name}_rows", ir.DataType.UINT8
        return rows


def rules(accuracy_level: int = 0, select: LayerSelection = EVERY_LAYER,
          record: RuleRecord | None = None) -> list[WeightOnlyInt8Rule]:
    record = record if record is not None else RuleRecord()
    packed_for: dict[int, tuple[ir.Value, ir.Value, int]] = {}
    return [WeightOnlyInt8Rule(transposed, accuracy_level, select, record, packed_for) for transposed in (False, True)]


class LowerWeightOnlyInt8Pass(EqcPass):
    name = "lower_weight_only_int8"
    Options = LowerWeightOnlyInt8Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        record = RuleRecord()
        # prune: also drops the int8 originals now read by nothing
        lowered = lower_with_rules(model, rules(self.options.accuracy_level, self.options, record), (MS_DOMAIN, 1),
                                   prune=True)
        self.report({"lowered": len(lowered), "op": f"{MS_DOMAIN}::MatMulNBits(bits=8)"})
        return ir.passes.PassResult(model, modified=bool(lowered))
