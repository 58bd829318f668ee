"""Static activation quantization: a QuantizeLinear/DequantizeLinear pair on each linear input.

Only the activation inputs of linear layers (MatMul/Gemm with a constant weight) get QDQ; the
attention-score MatMuls, the additive mask and softmax stay float. Scales are frozen from the
calibration statistics (per tensor). One pair serves all linear consumers of a tensor (q/k/v share
the normalised hidden state), which is also how TensorRT wants shared inputs quantized.

Per-site fallback (`dynamic_above`, off by default): a static per-tensor scale is set by the largest
|x| ever seen, so a tensor whose range is owned by a few massive-activation tokens rounds its typical
elements to a handful of levels. The pass measures that from the calibration statistics as
step / typical|x| (step = scale of the static quantizer, typical|x| = median over channels of the
mean |x|, from the "abssum" observer, or the "sample" observer's rows; after smooth_quant these are the smoothed statistics) and gives
the inputs above the threshold per-token dynamic int8 instead (the quantize_activations_dynamic
chain), so every linear stays int8 W8A8. The report lists each tensor's score and which fell back.
Inputs smooth_quant already smoothed for per-token quantization (its activation_granularity "auto",
recorded in context.per_token_inputs) get per-token int8 whatever dynamic_above says, so the
quantizer is the one their smoothing was scored for; the report lists them as per_token_from_smooth_quant.
`dynamic_symmetric: "auto"` quantizes one-sided per-token inputs (GELU outputs: calibrated min > -one_sided * max)
around each token's centre in portable artifacts, twice the resolution of int8 around 0 (all-MiniLM-L6-v2 w8a8-smooth
0.99876 -> 0.99899 at 64 x 32 calibration); the report lists them as dynamic_asymmetric.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import new_initializer, node_order, sites_by_activation
from eqcompiler.compile.layer_selection import LayerSelection
from eqcompiler.compile.pass_base import EqcPass, ObserverNeeds
from eqcompiler.compile.qdq import activation_scale, step_ratio
from eqcompiler.passes.quantize_activations_dynamic import emit_per_token

# Range selection (see eqcompiler/compile/range_methods.py): minmax uses the observed range; percentile,
# entropy (TensorRT KL) and mse clip outliers using the calibration histogram (`--observers hist`).
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass
class QuantizeActivationsOptions(LayerSelection):
    bits: int = 8
    symmetric: bool = True  # int8 with zero point 0 (TensorRT); False: uint8 asymmetric
    method: str = "minmax"
    percentile: float = 99.99  # method "percentile": share of |x| kept inside the range
    # > 0: inputs whose static step / typical |x| exceeds this get per-token dynamic int8 instead
    # (needs the abssum observer); 0: every input static.
    dynamic_above: float = 0.0
    # The per-token inputs: true, int8 around 0 (TensorRT, FusedInt8Gemm); false, int8 around each
    # token's centre (emit_per_token); "auto", centred for one-sided inputs (calibrated min > -one_sided
    # * max: GELU outputs) when the target is portable, around 0 otherwise.
    dynamic_symmetric: bool | str = True
    one_sided: float = 0.25

    def validate(self) -> None:
        if self.dynamic_above < 0:
            raise EqcError(f"quantize_activations: dynamic_above must be >= 0, got {self.dynamic_above}")
        if self.bits != 8:
            raise EqcError(f"quantize_activations: only 8-bit activations are supported, got {self.bits}")
        if self.method not in METHODS:
            raise EqcError(f"quantize_activations: unknown method '{self.method}' (known: {', '.join(METHODS)})")
        if self.dynamic_symmetric not in (True, False, "auto"):
            raise EqcError(f"quantize_activations: dynamic_symmetric must be true, false or \"auto\", got {self.dynamic_symmetric!r}")
        if not 0.0 <= self.one_sided <= 1.0:
            raise EqcError(f"quantize_activations: one_sided must be in [0, 1], got {self.one_sided}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise EqcError(f"quantize_activations: percentile must be in (0, 100], got {self.percentile}")


def static_step_ratio(stats: object, name: str, scale: float) -> float:
    """step / typical |x|: how coarse the static grid is for the tensor's ordinary elements."""
    try:
        return step_ratio(stats.get(name), scale)  # type: ignore[attr-defined]
    except EqcError as exc:
        raise EqcError(f"quantize_activations dynamic_above: {exc} ('{name}')") from None


def activation_range(stats: object, name: str, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The (lo, hi) range a method picks for one tensor's statistics."""
    from eqcompiler.compile import range_methods

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

    @classmethod
    def observers_needed(cls, options: QuantizeActivationsOptions) -> ObserverNeeds:
        required = {"hist"} if options.method != "minmax" else set()  # percentile, entropy, mse
        # dynamic_above reads mean |x| from abssum, or from the sample rows when those are there
        return ObserverNeeds(frozenset(required), frozenset({"abssum"} if options.dynamic_above > 0 else set()))
    requires_stats = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opts = self.options
        order = node_order(graph)
        groups = sites_by_activation(graph, opts)
        ranges: dict[str, list[float]] = {}
        scores: dict[str, float] = {}
        dynamic: list[str] = []
        asymmetric: list[str] = []
        per_token = set(self.context.per_token_inputs)
        for group in groups:
            x = group[0].activation
            if x.name is None:
                raise EqcError("an activation feeding a linear layer has no name; cannot look up its statistics")
            lo, hi = activation_range(self.context.stats, x.name, opts.method, opts.percentile)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise EqcError(f"statistics for '{x.name}' are not finite (min={lo}, max={hi})")
            scale, zp = activation_scale(lo, hi, opts.bits, opts.symmetric)
            first = min((s.node for s in group), key=lambda n: order[id(n)])
            # Inputs smooth_quant smoothed for per-token quantization (its granularity "auto") get it here.
            chosen_token = x.name in per_token
            if opts.dynamic_above > 0 or chosen_token:
                scores[x.name] = static_step_ratio(self.context.stats, x.name, scale)
                if chosen_token or scores[x.name] > opts.dynamic_above:
                    sym = self._dynamic_symmetric(x.name)
                    dq = emit_per_token(graph, x, group[0].in_features, first, symmetric=sym)
                    if not sym:
                        asymmetric.append(x.name)
                    for site in group:
                        site.node.replace_input_with(0, dq)
                    dynamic.append(x.name)
                    continue
            dq = self._insert_qdq(graph, x, scale, zp, before=first)
            for site in group:
                site.node.replace_input_with(0, dq)
            ranges[x.name] = [lo, hi, scale]
        if not ranges and not dynamic:
            raise EqcError("quantize_activations matched no linear layer input")
        report = {"tensors": len(ranges) + len(dynamic), "static": len(ranges), "ranges": ranges, "method": opts.method}
        # Linear inputs include/exclude left in float are a precision decision: say so, by name.
        quantized = set(ranges) | set(dynamic)
        left = [g[0].activation.name for g in sites_by_activation(graph) if g[0].activation.name not in quantized
                and not g[0].activation.name.endswith("_dequantized")]
        if left:
            report["float_inputs"] = left
            self.context.warn(f"quantize_activations: {len(left)} linear input(s) left float by include/exclude: "
                              + ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))
        if opts.dynamic_above > 0 or per_token:
            report.update({"per_token_from_smooth_quant": sorted(per_token & set(dynamic)),
                           "dynamic_above": opts.dynamic_above, "dynamic_fallback": len(dynamic),
                           "dynamic_tensors": dynamic, "step_ratio": scores, "dynamic_asymmetric": asymmetric})
        self.report(report)
        return ir.passes.PassResult(model, modified=True)

    def _dynamic_symmetric(self, name: str) -> bool:
        choice = self.options.dynamic_symmetric
        if choice != "auto":
            return bool(choice)
        if self.context.target != "portable":
            return True  # TensorRT and the fused int8 kernels take symmetric int8 only
        lo, hi = activation_range(self.context.stats, name, "minmax")
        return not (hi > 0 and lo > -self.options.one_sided * hi)

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
