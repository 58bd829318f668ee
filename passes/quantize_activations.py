"""Static activation quantization: a QuantizeLinear/DequantizeLinear pair on each linear input.

Only the activation inputs of linear layers (MatMul/Gemm with a constant weight) get QDQ; the
attention-score MatMuls, the additive mask and softmax stay float. Scales are frozen from the
calibration statistics (per tensor). One pair serves all linear consumers of a tensor (q/k/v share
the normalised hidden state), which is also how TensorRT wants shared inputs quantized.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.graph import new_initializer, node_order, sites_by_activation
from eqcompiler.pass_base import EqcPass
from eqcompiler.qdq import activation_scale

# Range selection (see eqcompiler/range_methods.py): minmax uses the observed range; percentile,
# entropy (TensorRT KL) and mse clip outliers using the calibration histogram (`--observers hist`).
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass
class QuantizeActivationsOptions:
    bits: int = 8
    symmetric: bool = True  # int8 with zero point 0 (TensorRT); False: uint8 asymmetric
    method: str = "minmax"
    percentile: float = 99.99  # method "percentile": share of |x| kept inside the range
    include: str | None = None
    exclude: str | None = None

    def validate(self) -> None:
        if self.bits != 8:
            raise EqcError(f"quantize_activations: only 8-bit activations are supported, got {self.bits}")
        if self.method not in METHODS:
            raise EqcError(f"quantize_activations: unknown method '{self.method}' (known: {', '.join(METHODS)})")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise EqcError(f"quantize_activations: percentile must be in (0, 100], got {self.percentile}")


def activation_range(stats: object, name: str, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The (lo, hi) range a method picks for one tensor's statistics."""
    from eqcompiler import range_methods

    t = stats.get(name)  # type: ignore[attr-defined]
    if method == "minmax":
        return t.min, t.max
    if method not in METHODS:
        raise EqcError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
    if "hist" not in t.extra or "hist_max" not in t.extra:
        raise EqcError(f"quantize_activations method '{method}' needs the 'hist' calibration observer "
                       f"(no histogram for '{name}'); rerun `eqc calibrate --observers minmax,hist`")
    hist, hist_max = t.extra["hist"], float(t.extra["hist_max"])
    if method == "percentile":
        threshold = range_methods.percentile_threshold(hist, hist_max, percentile)
    elif method == "entropy":
        threshold = range_methods.entropy_threshold(hist, hist_max)
    else:
        threshold = range_methods.mse_threshold(hist, hist_max)
    return range_methods.clipped_range(t.min, t.max, threshold)


class QuantizeActivationsPass(EqcPass):
    name = "quantize_activations"
    Options = QuantizeActivationsOptions
    requires_stats = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        order = node_order(graph)
        groups = sites_by_activation(graph, opts.include, opts.exclude)
        ranges: dict[str, list[float]] = {}
        for group in groups:
            x = group[0].activation
            if x.name is None:
                raise EqcError("an activation feeding a linear layer has no name; cannot look up its statistics")
            lo, hi = activation_range(self.context.stats, x.name, opts.method, opts.percentile)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise EqcError(f"statistics for '{x.name}' are not finite (min={lo}, max={hi})")
            scale, zp = activation_scale(lo, hi, opts.bits, opts.symmetric)
            dq = self._insert_qdq(graph, x, scale, zp, before=min((s.node for s in group), key=lambda n: order[id(n)]))
            for site in group:
                site.node.replace_input_with(0, dq)
            ranges[x.name] = [lo, hi, scale]
        if not ranges:
            raise EqcError("quantize_activations matched no linear layer input")
        self.report({"tensors": len(ranges), "ranges": ranges, "method": opts.method})
        return ir.passes.PassResult(model, modified=True)

    def _insert_qdq(self, graph: ir.Graph, x: ir.Value, scale: float, zp: int, before: ir.Node) -> ir.Value:
        dtype = np.int8 if self.options.symmetric else np.uint8
        base = x.name
        s_val = new_initializer(graph, f"{base}_act_scale", np.array(scale, dtype=np.float32))
        z_val = new_initializer(graph, f"{base}_act_zero_point", np.array(zp, dtype=dtype))
        q = ir.node("QuantizeLinear", [x, s_val, z_val], name=f"{base}/QuantizeLinear")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], name=f"{base}/DequantizeLinear")
        graph.insert_before(before, q)
        graph.insert_before(before, dq)
        q.outputs[0].name = f"{base}_quantized"
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = x.shape
        return dq.outputs[0]
