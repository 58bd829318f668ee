"""Lower per-channel int8 weight-only QDQ linear layers to `com.microsoft::MatMulNBits` (bits=8).

Matched (quantize_weights with block_size=0; run last for ort-cpu, so it takes the layers the
integer lowerings left, e.g. all of w8, or the tied lm_head of w8a8-dynamic):

    w = DequantizeLinear(Wq int8 [K,N], scale [N], zp=0, axis=1)        -> MatMul(x, w)
    w = Transpose(DequantizeLinear(T int8 [N,K], scale [N], zp=0, axis=0)) -> MatMul(x, w)  (tied lm_head)

ONNX Runtime's CPU provider does not fold or fuse a weight DequantizeLinear, so the QDQ graph
dequantizes every weight on every run (the tied 49152x576 lm_head alone is 28M values per token).
MatMulNBits reads the 8-bit weight directly. Per-channel scales are exactly blocked scales repeated
over every block of K, so the numerics are those of the QDQ graph (accuracy_level 0: float32
compute). Signed q is stored as q + 128 with MatMulNBits' default zero point 128
(passes/lower_matmul_nbits.to_matmul_nbits does the packing). For the tied table, MatMulNBits'
B layout [N, blocks, block] *is* the table's row layout, so the embedding Gather is redirected to
read rows of it (with zero point 128), and the table is still stored once.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from eqcompiler.compile.graph import find_linear_sites, int_constant, is_constant, new_initializer, substitute_output
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass
from eqcompiler.passes.lower_matmul_nbits import to_matmul_nbits

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class LowerWeightOnlyInt8Options(LayerSelection):
    accuracy_level: int = 0  # 0: float32 compute, the QDQ graph's numerics


def _block_for(k: int) -> int:
    """The largest power-of-two block (16..128) dividing K, so no block needs padding."""
    return next((b for b in (128, 64, 32, 16) if k % b == 0), 128)


def weight_only_dq(site) -> ir.Node | None:
    """The weight's per-channel int8 zero-zp DequantizeLinear, else None.

    The activation may itself be Q->DQ (a layer no integer lowering took, e.g. the tied lm_head of a
    per-token dynamic recipe): MatMulNBits then reads the dequantized activation, same numerics.
    """
    src = site.node.inputs[1].producer()
    if src is not None and src.op_type == "Transpose":
        src = src.inputs[0].producer()
    if src is None or src.op_type != "DequantizeLinear" or src.attributes.get_int("block_size", 0):
        return None
    q = src.inputs[0]
    if not is_constant(q) or q.const_value.dtype != ir.DataType.INT8 or not is_constant(src.inputs[1]):
        return None
    scale = src.inputs[1].const_value.numpy()
    zp = src.inputs[2].const_value.numpy() if len(src.inputs) > 2 and src.inputs[2] is not None else None
    if scale.ndim != 1 or (zp is not None and np.any(zp)):
        return None
    if src.attributes.get_int("axis", 1) % 2 != (0 if site.transposed else 1):
        return None
    return src


class LowerWeightOnlyInt8Pass(EqcPass):
    name = "lower_weight_only_int8"
    Options = LowerWeightOnlyInt8Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered: list[str] = []
        packed_for: dict[int, tuple[ir.Value, ir.Value, int]] = {}
        for site in find_linear_sites(graph, self.options):
            if site.node.op_type != "MatMul":
                continue
            dq = weight_only_dq(site)
            if dq is None:
                continue
            wq = dq.inputs[0]
            if id(wq) not in packed_for:
                q = wq.const_value.numpy()
                q_kn = q.T if site.transposed else q
                k, n = q_kn.shape
                block = _block_for(k)
                n_blocks = -(-k // block)
                scale = np.tile(dq.inputs[1].const_value.numpy()[None, :], (n_blocks, 1))
                packed, scales, _ = to_matmul_nbits(q_kn, scale, None, 8, True, block)
                base = (wq.name or "weight").removesuffix("_quantized")
                packed_for[id(wq)] = (new_initializer(graph, f"{base}_nbits", packed),
                                      new_initializer(graph, f"{base}_nbits_scales", scales), block)
                if site.transposed:
                    self._redirect_gathers(graph, wq, packed_for[id(wq)][0], k)
            b, s, block = packed_for[id(wq)]
            k = site.in_features
            attrs = {"K": k, "N": site.out_features, "bits": 8, "block_size": block,
                     "accuracy_level": self.options.accuracy_level}
            node = ir.node("MatMulNBits", [site.node.inputs[0], b, s], attrs, domain=MS_DOMAIN,
                           name=f"{site.node.name}/MatMulNBits")
            substitute_output(graph, site.node.outputs[0], node, before=site.node, dtype=ir.DataType.FLOAT)
            graph.remove(site.node, safe=True)
            lowered.append(site.name)
        if lowered:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)  # also drops the int8 originals now read by nothing
        self.report({"lowered": len(lowered), "op": f"{MS_DOMAIN}::MatMulNBits(bits=8)"})
        return ir.passes.PassResult(model, modified=bool(lowered))

    @staticmethod
    def _redirect_gathers(graph: ir.Graph, wq: ir.Value, packed: ir.Value, k: int) -> None:
        """Embedding rows: gather from the packed [N, blocks, block] uint8 table (viewed [N, K]) with zp 128."""
        rows_view = None
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
            if rows_view is None:
                shape = int_constant(graph, f"{packed.name}_rows_shape", [-1, k])
                reshape = ir.node("Reshape", [packed, shape], name=f"{packed.name}/rows_view")
                graph.insert_before(gather, reshape)
                rows_view = reshape.outputs[0]
                rows_view.name = f"{packed.name}_rows"
                rows_view.dtype = ir.DataType.UINT8
            n = wq.shape[0]
            zp128 = new_initializer(graph, f"{packed.name}_row_zero_point", np.full(int(n), 128, np.uint8))
            gather.replace_input_with(0, rows_view)
            zp_gather.replace_input_with(0, zp128)
