"""Compile targets: which lowering or check passes run after a recipe (`eqc compile --target`).

- portable (default): the recipe's standard-ONNX QDQ graph, unchanged; runs anywhere.
- tensorrt: QDQ unchanged, then check_tensorrt_placement (fails with the first violations).
- ort-cpu: first the transformer blocks are fused (residual Add + RMSNorm -> SkipSimplifiedLayerNormalization,
  attention with rotary and KV cache -> RotaryEmbedding + GroupQueryAttention, per-head q/k norms, partial
  rotary and soft-capped scores included; passes/fuse_*.py), then
  QDQ lowered to the fastest ONNX Runtime CPU kernels that keep the QDQ numerics
  (int8 rounding included). Measured on SmolLM2-135M, 2 threads (tools/bench_speed.py,
  tools/results/speed.md): ORT's CPU provider does not fuse eqc's DQ->MatMul into an integer
  kernel, so QDQ graphs dequantize every weight on every run and are 4-16x slower than fp32.
  Preference, per pattern (each pass leaves layers it does not match untouched, so the
  order below is the per-recipe choice):
    * per-token dynamic W8A8 -> ai.eqc::FusedInt8Gemm (eqc's op library; without the built library
      the compile is refused, exit 4, naming `make ops`)
    * static per-tensor W8A8 -> com.microsoft::MatMulIntegerToFloat (int8 x int8, int32 acc)
    * blocked weight-only 4/8-bit -> com.microsoft::MatMulNBits (passes/lower_matmul_nbits.py)
    * per-channel int8 weight-only (all of w8; the tied lm_head/embedding table of w4-* and mixed)
      -> com.microsoft::MatMulNBits bits=8 at accuracy level 4 (passes/lower_weight_only_int8.py): ORT quantizes
      the activations to int8 per block and runs integer dot products (AVX-512 VNNI / AVX2). SmolLM2, one
      interleaved run through onnxruntime-genai (tools/results/vs_genai.md): w8 decodes 1.47x faster than with
      eqc's float-math Int8WeightGemm (111.3 vs 75.6 tok/s: 0.90x the builder's int4 instead of 0.61x) at ppl
      +0.11% instead of -0.02%; w4-gptq's lm_head alone: 97.3 -> 121.8 tok/s, ppl +19.27% -> +19.44%
      (tools/results/vs_genai_lm_head.md). Such artifacts need no eqc op library. (Level 0, float compute, is
      slower than QDQ: 109-118 ms for the lm_head alone.)
    * the tied lm_head of w8a8-* (its input is not int8 on purpose: per-token int8 there costs +0.6% ppl)
      -> ai.eqc::Int8WeightGemm with int16 activation rows and exact integer products (258x finer than int8;
      passes/lower_int8_weight_gemm.py, option activation_bits=0 for float math); refused like FusedInt8Gemm
      without the library
  Last, projections that read the same input (q/k/v, gate/up) are packed into one GEMM
  (passes/pack_parallel_projections.py).
- ort-cuda: per-token dynamic W8A8 -> ai.eqc::FusedInt8Gemm, whose CUDA kernel (tensor-core int8,
  cuda_ops/src/fused_int8_gemm.cu) lives in libeqc_ops_cuda.so; every other layer stays QDQ, which the
  CUDA provider runs as is. The artifact's manifest names the provider and library it needs. The
  lowering needs no library at compile time. The CUDA kernel's H100 figures: tools/results/cuda_gemm.md.
- ort-mobile: the ort-cpu fusions and the lowerings to ONNX Runtime's own contrib ops (no ai.eqc op: a minimal
  build cannot load eqc's library), then the graph is converted with onnxruntime's tool to model.ort plus the
  reduced-build operator list (lowering/edge.py); ops the runtime cannot run are refused at compile time.
- web: onnxruntime-web (WASM). Its CPU kernels do not fuse DequantizeLinear into MatMul, so a QDQ weight is
  dequantized on every run (w8 ~2 tok/s on SmolLM2); the int8/int4 weights are rewritten into standard
  integer-to-float ops on constants, which ORT's constant folding turns into float weights once at session
  creation (passes/lower_weights_for_web.py, measured in tools/results/edge.md); then the graph's small constant
  computations are folded (passes/simplify_graph.py: SmolLM2's graph 1.44 -> 0.98 MB). Refusal as ort-mobile.
"""
from __future__ import annotations

from typing import Any

from eqcompiler.errors import EqcError

TARGETS = ("portable", "tensorrt", "ort-cpu", "ort-cuda", "ort-mobile", "web")

# Transformer-block fusions for ort-cpu, run first (they need ONNX shape inference, so standard ops only).
ORT_CPU_FUSIONS = ("fuse_skip_rms_norm", "fuse_group_query_attention")
# Lowering passes for ort-cpu in preference order (see module docstring).
ORT_CPU_LOWERINGS = ("lower_fused_int8_gemm", "lower_qdq_to_ort_int8", "lower_matmul_nbits", "lower_weight_only_int8",
                     "lower_int8_weight_gemm")
# MatMulNBits at accuracy level 4: ORT quantizes the activations to int8 per block and runs integer dot
# products (AVX2 / AVX-512 VNNI); on a CPU without them it falls back to float compute by itself.
ORT_CPU_OPTIONS = {"lower_matmul_nbits": {"accuracy_level": 4}, "lower_weight_only_int8": {"accuracy_level": 4}}
EQC_LIBRARY_LOWERINGS = {"lower_fused_int8_gemm": "per-token W8A8 layers", "lower_int8_weight_gemm": "int8 weight-only layers"}


def _require_eqc_library(what: str) -> None:
    """ort-cpu without the op library would leave those layers as QDQ graphs that dequantize every weight
    on every run (measured 10.8x slower than fp32 for w8a8-dynamic): refuse instead of warning."""
    from eqcompiler.runtime import custom_ops
    from eqcompiler.errors import EnvironmentProblem

    try:
        custom_ops.find_library()
    except custom_ops.EqcOpsError as exc:
        raise EnvironmentProblem(f"--target ort-cpu lowers {what} to eqc's op library, which is not built ({exc}); "
                                 "run `make ops` (C++ compiler, CMake and npm), or compile with --target portable") from None


# apply_precision_plan's default choices (eqcompiler.compile.bitwidth.DEFAULT_CHOICES, not imported here: the
# lowering room reads a recipe as data). A plan may put no layer at 4 bits, so its MatMulNBits lowering is
# scheduled as one that may match nothing.
MIXED_DEFAULT_CHOICES = ("int4-g128", "int4-g64", "int8", "float")
MAY_MATCH_NOTHING = "lower_matmul_nbits: optional"


def _recipe_needs(recipe: dict[str, Any] | None) -> set[str]:
    """Which ort-cpu lowerings a recipe's output can use (lowering passes refuse graphs they cannot match)."""
    if recipe is None:
        return set(ORT_CPU_LOWERINGS) - {"lower_weight_only_int8"}
    needs: set[str] = set()
    for step in recipe.get("passes", []):
        name, opts = step.get("pass"), step.get("options", {}) or {}
        if name == "quantize_activations_dynamic":
            needs.add("lower_fused_int8_gemm")
        elif name == "quantize_activations":
            needs.add("lower_qdq_to_ort_int8")
        if opts.get("block_size"):
            needs.add("lower_matmul_nbits")
        if name == "quantize_weights":  # per-channel int8 layers, or a tied int8 table (any block size)
            needs.add("lower_int8_weight_gemm")
        if name == "apply_precision_plan":  # per layer, what its plan chooses from (and the int8 embedding table)
            choices = str(opts.get("choices") or ",".join(MIXED_DEFAULT_CHOICES)).split(",")
            if any(c.strip().startswith("int4") for c in choices):
                needs |= {"lower_matmul_nbits", MAY_MATCH_NOTHING}
            needs.add("lower_int8_weight_gemm")
            if "w8a8" in (c.strip() for c in choices):
                needs.add("lower_qdq_to_ort_int8")
    w8a8 = needs & {"lower_fused_int8_gemm", "lower_qdq_to_ort_int8"}
    if "lower_int8_weight_gemm" in needs and ("lower_matmul_nbits" in needs or not w8a8):
        # Weight-only int8 layers (w8, the tied table of w4-* and mixed) run on ORT's MatMulNBits at accuracy level 4
        # (int8 activations per block, integer dot products) instead of eqc's float-math Int8WeightGemm. The
        # lm_head of w8a8-* keeps Int8WeightGemm's float numerics: that recipe leaves it unquantized on purpose.
        needs = (needs - {"lower_int8_weight_gemm"}) | {"lower_weight_only_int8"}
    return needs


def target_steps(target: str, warnings: list[str] | None = None, recipe: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Pass steps appended after `recipe` for `target`."""
    if target not in TARGETS:
        raise EqcError(f"unknown target '{target}' (known: {', '.join(TARGETS)})")
    if target == "portable":
        return []
    if target == "tensorrt":
        return [{"pass": "check_tensorrt_placement", "options": {"fail": True}}]
    if target == "ort-cuda":
        return _ort_cuda_steps(warnings, recipe)
    if target == "web":
        return [{"pass": "lower_weights_for_web", "options": {}}, {"pass": "simplify_graph", "options": {}}]
    from eqcompiler.compile.pass_base import available_passes

    known = available_passes()
    needs = _recipe_needs(recipe)
    steps = [{"pass": name, "options": {}} for name in ORT_CPU_FUSIONS if name in known]
    for name in ORT_CPU_LOWERINGS:
        if name not in known or name not in needs:
            continue
        if name in EQC_LIBRARY_LOWERINGS and target == "ort-mobile":
            continue  # a minimal build cannot load eqc's library: those layers stay QDQ (ORT fuses them itself)
        if name in EQC_LIBRARY_LOWERINGS:
            _require_eqc_library(EQC_LIBRARY_LOWERINGS[name])
        options = dict(ORT_CPU_OPTIONS.get(name, {}))
        if name == "lower_matmul_nbits" and MAY_MATCH_NOTHING in needs:
            options["required"] = False
        steps.append({"pass": name, "options": options})
    if len(steps) == len(ORT_CPU_FUSIONS) and warnings is not None and (recipe is None or recipe.get("passes")):
        warnings.append(f"{target}: no integer lowering applies to this recipe (only the transformer-block fusions run)")
    if "pack_parallel_projections" in known:  # last: it joins what the lowerings made
        steps.append({"pass": "pack_parallel_projections", "options": {}})
    return steps


def _ort_cuda_steps(warnings: list[str] | None, recipe: dict[str, Any] | None) -> list[dict[str, Any]]:
    if "lower_fused_int8_gemm" in _recipe_needs(recipe):
        return [{"pass": "lower_fused_int8_gemm", "options": {}}]
    if warnings is not None:
        warnings.append("ort-cuda: only per-token W8A8 (w8a8-dynamic, zeroquant) lowers to ai.eqc::FusedInt8Gemm; "
                        "this recipe's graph stays QDQ, which the CUDA provider runs as is")
    return []


def runtime_requirements(target: str, applied_passes: list[str]) -> dict[str, str] | None:
    """What a runtime needs to load an artifact compiled for `target` (recorded in the manifest; the edge
    targets add their ops, opsets and files in the pipeline)."""
    if target == "ort-mobile":
        return {"provider": "CPUExecutionProvider", "runtime": "onnxruntime minimal or mobile build (ORT format)"}
    if target == "web":
        return {"provider": "wasm", "runtime": "onnxruntime-web (WASM backend)"}
    if not set(EQC_LIBRARY_LOWERINGS) & set(applied_passes):
        return None
    if target == "ort-cuda":
        return {"provider": "CUDAExecutionProvider", "custom_op_library": "libeqc_ops_cuda.so", "domain": "ai.eqc"}
    # The artifact carries a copy of the library beside the model (genai_config.json names it).
    return {"provider": "CPUExecutionProvider", "custom_op_library": "libeqc_ops.so (or libeqc_ops_cuda.so)",
            "domain": "ai.eqc"}
