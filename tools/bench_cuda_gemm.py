#!/usr/bin/env python3
"""Benchmarks for ai.eqc::FusedInt8Gemm.

GPU (default): the CUDA kernel of build/cuda_ops/libeqc_ops_cuda.so through its C entry points
(ctypes) against torch._int_mm (cuBLASLt int8 -> int32) and fp16 torch.matmul, on prefill
(M = 512..4096) and decode (M = 1..16) shapes with SmolLM2 (576/1536) and 7B-class (4096/11008)
K/N. Writes tools/results/cuda_gemm.json and .md. Without a CUDA device: prints one line, exits 0,
writes nothing.

--cpu: the CPU kernel inside onnxruntime (the lowered graph) against the QDQ graph it replaces
and a float32 MatMul, at SmolLM2 shapes (--cpu-op weight: Int8WeightGemm, plus the tied lm_head).
Writes tools/results/cpu_{fused,int8_weight}_gemm_<variant>.json and .md (variant = the CPU kernel the library picked, e.g. avx2 or avx512vnni; EQC_CPU_ISA forces one).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"

SMOLLM2_KN = [(576, 1536), (1536, 576), (576, 576)]  # (K, N): up/gate, down, q/o projections
LLAMA7B_KN = [(4096, 11008), (11008, 4096), (4096, 4096)]
PREFILL_M = [512, 1024, 2048, 4096]
DECODE_M = [1, 4, 8, 16]
SMALL_BATCH_M = [64]  # between decode and prefill: small-tile and 64-row kernels compete


def write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def find_library(cuda: bool) -> pathlib.Path:
    try:
        from eqcompiler.runtime import custom_ops

        return custom_ops.find_library(cuda=cuda)
    except ImportError:  # running from a checkout without the package installed
        return REPO / "build" / "cuda_ops" / ("libeqc_ops_cuda.so" if cuda else "libeqc_ops.so")


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            v = row.get(key)
            cells.append("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


# ================================================================================== GPU
class CudaLib:
    """ctypes view of the C entry points in eqc_ops_cuda.h."""

    def __init__(self, path: pathlib.Path) -> None:
        self.so = ctypes.CDLL(str(path))
        vp, i32, f32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
        self.so.eqc_fused_int8_gemm_cuda_ex.argtypes = [vp, vp, vp, vp, vp, i32, i32, i32, f32, f32, vp, sz, vp]
        self.so.eqc_fused_int8_gemm_cuda_workspace_size.argtypes = [i32, i32, i32]
        self.so.eqc_fused_int8_gemm_cuda_workspace_size.restype = sz
        self.so.eqc_quantize_rows_cuda.argtypes = [vp, vp, vp, i32, i32, i32, f32, f32, vp]
        self.so.eqc_int8_gemm_dequant_cuda_variant.argtypes = [vp, vp, vp, vp, vp, vp, i32, i32, i32, i32, vp]
        self.so.eqc_cuda_variant_name.restype = ctypes.c_char_p
        self.so.eqc_cuda_error_string.restype = ctypes.c_char_p
        self.variants = {v: self.so.eqc_cuda_variant_name(v).decode() for v in range(self.so.eqc_cuda_variant_count())}

    def check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"eqc CUDA call failed: {self.so.eqc_cuda_error_string(rc).decode()}")


def median_us_per_call(torch: Any, run: Callable[[], None], calls_per_run: int, min_ms: float) -> float:
    """Median over 5 samples of CUDA-event time per call, each sample ~min_ms of back-to-back runs."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    reps = int(max(3, min(2000, min_ms / max(start.elapsed_time(end), 1e-3))))
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (reps * calls_per_run))
    return statistics.median(samples)


def graph_time_us(torch: Any, calls: list[Callable[[], None]], min_ms: float = 20.0) -> float:
    """GPU time per call from CUDA-graph replays of all `calls` (launch gaps included, Python and
    ctypes overhead excluded), after an eager warm-up."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        for call in calls:
            call()
    graph.replay()
    return median_us_per_call(torch, graph.replay, len(calls), min_ms)


def eager_time_us(torch: Any, calls: list[Callable[[], None]], min_ms: float = 20.0) -> float:
    """Time per call issued from Python (what an eager caller sees; includes launch cost)."""
    def run_all() -> None:
        for call in calls:
            call()

    run_all()
    torch.cuda.synchronize()
    return median_us_per_call(torch, run_all, len(calls), min_ms)


def weight_copies(n: int, k: int, l2_bytes: int) -> int:
    """Distinct int8 weight copies to rotate through so repeated calls stream weights from DRAM
    (3x the L2 in int8, 6x in fp16), as a model's consecutive layers do; at most 256."""
    return int(min(256, max(1, -(-3 * l2_bytes // (n * k)))))


def exact_rows(torch: Any, a, b, b_scale, bias, y) -> tuple[bool, float]:
    """Bit-exact check of sampled rows of y against the numpy statement of the op."""
    rows = sorted({0, a.shape[0] - 1, *range(0, a.shape[0], max(1, a.shape[0] // 6))})
    a_np = a[rows].cpu().numpy()
    s = np.maximum(np.abs(a_np).max(axis=1, keepdims=True) / np.float32(127), np.float32(0))
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(a_np / s), -128, 127).astype(np.int32)
    acc = q @ b.cpu().numpy().astype(np.int32).T
    ref = (acc.astype(np.float32) * s) * b_scale.cpu().numpy() + bias.cpu().numpy()
    got = y[rows].cpu().numpy()
    return bool(np.array_equal(got, ref)), float(np.abs(got - ref).max())


def bench_gpu_shape(torch: Any, lib: CudaLib, m: int, k: int, n: int, l2_bytes: int,
                    variants: bool) -> dict[str, Any]:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(m * 31 + k * 7 + n)
    copies = weight_copies(n, k, l2_bytes)
    a = torch.randn(m, k, device=dev, generator=gen)
    bs = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen) for _ in range(copies)]
    b_scale = torch.rand(n, device=dev, generator=gen) * 0.01 + 0.001
    bias = torch.randn(n, device=dev, generator=gen)
    y = torch.empty(m, n, device=dev)
    ld = (k + 15) // 16 * 16
    assert ld == k, "benchmark shapes keep K a multiple of 16 (no padded copy of B)"
    ws = torch.empty(lib.so.eqc_fused_int8_gemm_cuda_workspace_size(m, n, k), device=dev, dtype=torch.uint8)
    aq = torch.zeros(m, ld, device=dev, dtype=torch.int8)
    a_scale = torch.empty(m, device=dev)
    p = lambda t: t.data_ptr()  # noqa: E731
    cur = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731  (the capture stream inside a graph)

    def fused(b) -> Callable[[], None]:
        return lambda: lib.check(lib.so.eqc_fused_int8_gemm_cuda_ex(
            p(a), p(b), p(b_scale), p(bias), p(y), m, n, k, 0.0, 0.0, p(ws), ws.numel(), cur()))

    def gemm(b, v: int) -> Callable[[], None]:
        return lambda: lib.check(lib.so.eqc_int8_gemm_dequant_cuda_variant(
            p(aq), p(a_scale), p(b), p(b_scale), p(bias), p(y), m, n, ld, v, cur()))

    row: dict[str, Any] = {"M": m, "K": k, "N": n, "ops": 2.0 * m * n * k, "weight_copies": copies,
                           "auto_variant": lib.variants[lib.so.eqc_cuda_chosen_variant(m, n, k)]}
    fused(bs[0])()
    torch.cuda.synchronize()
    row["exact"], row["max_abs_err"] = exact_rows(torch, a, bs[0], b_scale, bias, y)
    row["fused_us"] = graph_time_us(torch, [fused(b) for b in bs])
    row["fused_eager_us"] = eager_time_us(torch, [fused(b) for b in bs])
    lib.check(lib.so.eqc_quantize_rows_cuda(p(a), p(aq), p(a_scale), m, k, ld, 0.0, 0.0, cur()))
    row["gemm_us"] = graph_time_us(torch, [gemm(b, 0) for b in bs])
    per_variant: dict[str, Any] = {}
    for v, name in lib.variants.items():
        if v == 0 or not variants or (m > 64 and name.startswith("mma_16x")) or (m <= 16 and not name.startswith("mma_16x")):
            continue  # tiles far from the problem's shape (64/128-row tiles at decode and the reverse)
        rc = lib.so.eqc_int8_gemm_dequant_cuda_variant(p(aq), p(a_scale), p(bs[0]), p(b_scale), p(bias), p(y),
                                                      m, n, ld, v, cur())
        if rc != 0:
            per_variant[name] = {"error": lib.so.eqc_cuda_error_string(rc).decode()}
            continue
        torch.cuda.synchronize()
        exact, _ = exact_rows(torch, a, bs[0], b_scale, bias, y)
        us = graph_time_us(torch, [gemm(b, v) for b in bs], min_ms=15.0)
        per_variant[name] = {"us": us, "tops": row["ops"] / (us * 1e-6) / 1e12, "exact": exact}
    row["variants"] = per_variant
    timed = {k2: v2 for k2, v2 in per_variant.items() if "us" in v2 and v2["exact"]}
    if timed:
        row["best_variant"] = min(timed, key=lambda k2: timed[k2]["us"])
        row["best_gemm_us"] = timed[row["best_variant"]]["us"]

    aq_k = aq[:, :k].contiguous()
    try:
        row["int_mm_us"] = graph_time_us(torch, [lambda b=b: torch._int_mm(aq_k, b.t()) for b in bs])
    except RuntimeError as exc:  # torch._int_mm needs M > 16
        row["int_mm_us"] = None
        row["int_mm_note"] = str(exc).splitlines()[0][:120]
    a16 = a.half()
    w16s = [(b.float() * b_scale[:, None]).half() for b in bs]
    del bs
    row["fp16_us"] = graph_time_us(torch, [lambda w=w: torch.matmul(a16, w.t()) for w in w16s])
    row["fp16_eager_us"] = eager_time_us(torch, [lambda w=w: torch.matmul(a16, w.t()) for w in w16s])
    for key in ("fused", "gemm", "int_mm", "fp16"):
        us = row.get(f"{key}_us")
        row[f"{key}_tops"] = row["ops"] / (us * 1e-6) / 1e12 if us else None
    row["fused_vs_int_mm"] = row["int_mm_us"] / row["fused_us"] if row["int_mm_us"] else None
    row["gemm_vs_int_mm"] = row["int_mm_us"] / row["gemm_us"] if row["int_mm_us"] else None
    row["fused_vs_fp16"] = row["fp16_us"] / row["fused_us"]
    row["fused_vs_fp16_eager"] = row["fp16_eager_us"] / row["fused_eager_us"]
    del w16s
    torch.cuda.empty_cache()
    return row


def run_gpu(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("no CUDA device; skipped (torch not installed)")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device; skipped")
        return 0
    path = find_library(cuda=True)
    if not path.is_file():
        print(f"error: {path} not built (run `make ops` on a machine with nvcc)", file=sys.stderr)
        return 1
    lib = CudaLib(path)
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    kn = (SMOLLM2_KN if "smollm2" in args.models else []) + ([] if args.quick or "7b" not in args.models else LLAMA7B_KN)
    ms = (PREFILL_M[:2] if args.quick else PREFILL_M) + DECODE_M + SMALL_BATCH_M
    rows = []
    t0 = time.time()
    out = pathlib.Path(args.out_dir)
    for k, n in kn:
        for m in ms:
            row = bench_gpu_shape(torch, lib, m, k, n, l2, variants=not args.no_variants)
            rows.append(row)
            print(f"M={m:5d} K={k:5d} N={n:5d} {row['auto_variant']:>14s} fused {row['fused_us']:8.1f}us "
                  f"{row['fused_tops']:6.1f} TOPS | gemm {row['gemm_tops']:6.1f} (best {row.get('best_variant')}) "
                  f"| int_mm {row['int_mm_tops'] or 0:6.1f} | fp16 {row['fp16_tops']:6.1f} "
                  f"| x{row['fused_vs_fp16']:.2f} fp16 x{row['fused_vs_int_mm'] or 0:.2f} int_mm "
                  f"exact={row['exact']} [{time.time() - t0:.0f}s]", flush=True)
            write_atomic(out / "cuda_gemm.partial.json", json.dumps(rows) + "\n")  # survives a timeout
    env = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
           "sm_count": props.multi_processor_count, "l2_bytes": l2, "torch": torch.__version__,
           "cuda": torch.version.cuda, "library": str(path),
           "wgmma": bool(lib.so.eqc_cuda_wgmma_available())}
    (out / "cuda_gemm.partial.json").unlink(missing_ok=True)
    write_atomic(out / "cuda_gemm.json", json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    write_atomic(out / "cuda_gemm.md", gpu_markdown(env, rows))
    print(f"wrote {out / 'cuda_gemm.json'} and .md")
    return 0


def gpu_markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cols = [("M", "M"), ("K", "K"), ("N", "N"), ("auto_variant", "kernel"), ("fused_us", "eqc fused us"),
            ("fused_tops", "eqc fused TOPS"), ("gemm_tops", "eqc GEMM TOPS"), ("int_mm_tops", "int_mm TOPS"),
            ("fp16_tops", "fp16 TFLOPS"), ("gemm_vs_int_mm", "GEMM / int_mm"), ("fused_vs_int_mm", "fused / int_mm"),
            ("fused_vs_fp16", "fused / fp16"), ("fused_vs_fp16_eager", "fused / fp16 (eager)"), ("exact", "bit-exact")]
    names = sorted({name for r in rows for name in r.get("variants", {})})
    vrows = []
    for r in rows:
        vr: dict[str, Any] = {"M": r["M"], "K": r["K"], "N": r["N"]}
        for name in names:
            v = r.get("variants", {}).get(name)
            vr[name] = None if v is None else (f"{v['tops']:.1f}" + ("" if v["exact"] else " WRONG")) if "us" in v \
                else "n/a"
        vrows.append(vr)
    return (f"# FusedInt8Gemm CUDA kernel\n\nDevice: {env['device']} (compute {env['capability']}, "
            f"{env['sm_count']} SMs, L2 {env['l2_bytes'] >> 20} MiB), torch {env['torch']}, CUDA {env['cuda']}, "
            f"wgmma kernels {'on' if env['wgmma'] else 'off'}.\n\n"
            "Times are GPU time per call from CUDA-graph replays (no Python/ctypes overhead), rotating through "
            "enough weight copies that the weights stream from DRAM as in a model (`weight_copies` in the JSON). "
            "Ratios > 1 mean eqc is faster. `eqc fused` = per-token quantization kernel + int8 GEMM with the "
            "dequantize(+bias) epilogue (two launches, overlapped by programmatic dependent launch); `eqc GEMM` "
            "is the GEMM stage alone on pre-quantized rows, the like-for-like comparison with torch._int_mm "
            "(cuBLASLt int8 -> int32, no quantization or dequantization; it rejects M <= 16). fp16 = "
            "torch.matmul on fp16 activations and weights. `fused / fp16 (eager)` compares calls issued one by "
            "one from Python instead. bit-exact: sampled rows equal the numpy statement of the op.\n\n"
            + markdown_table(rows, cols) + "\n"
            + ("" if not names else "\n## GEMM TOPS by kernel variant\n\n"
               + markdown_table(vrows, [("M", "M"), ("K", "K"), ("N", "N")] + [(n_, n_) for n_ in names]) + "\n"))


# ================================================================================== CPU
def per_channel_int8_weight(k: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A float [K, N] weight, its symmetric per-output-channel int8 values and scales."""
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    return w, np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8), w_scale


def cpu_models(k: int, n: int, rng: np.random.Generator):
    """(QDQ W8A8-dynamic graph as eqc emits it, lowered FusedInt8Gemm graph, float32 MatMul graph)."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from eqcompiler.passes.lower_fused_int8_gemm import LowerFusedInt8GemmPass

    w, wq, w_scale = per_channel_int8_weight(k, n, rng)
    bias = rng.standard_normal(n).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])
    opset = [helper.make_opsetid("", 21)]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(127.0, np.float32), "c127"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(bias, "bias")]
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1),
             helper.make_node("Div", ["m", "c127"], ["s"]),
             helper.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=-1, block_size=k, output_dtype=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["q", "s"], ["dq"], axis=-1, block_size=k),
             helper.make_node("DequantizeLinear", ["wq", "w_scale"], ["w"], axis=1),
             helper.make_node("MatMul", ["dq", "w"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["y"])]
    qdq = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], initializer=inits), opset_imports=opset)
    ir_model = ir.serde.deserialize_model(qdq)
    LowerFusedInt8GemmPass()(ir_model)
    fused = ir.serde.serialize_model(ir_model)
    assert any(node.op_type == "FusedInt8Gemm" for node in fused.graph.node), "lowering did not apply"
    fp32_nodes = [helper.make_node("MatMul", ["x", "w_f"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["y"])]
    fp32_inits = [numpy_helper.from_array(w, "w_f"), numpy_helper.from_array(bias, "bias")]
    fp32 = helper.make_model(helper.make_graph(fp32_nodes, "fp32", [x], [y], initializer=fp32_inits),
                             opset_imports=opset)
    for model in (qdq, fp32):
        onnx.checker.check_model(model)
    return qdq, fused, fp32


def weight_only_models(k: int, n: int, rng: np.random.Generator, tied: bool):
    """(weight-only QDQ graph as eqc emits it, lowered Int8WeightGemm graph, float32 MatMul graph).
    tied: the lm_head form, MatMul(x, Transpose(DequantizeLinear(table [N,K], axis=0)))."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from eqcompiler.passes.lower_int8_weight_gemm import LowerInt8WeightGemmPass

    _, wq, w_scale = per_channel_int8_weight(k, n, rng)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])
    opset = [helper.make_opsetid("", 21)]
    if tied:
        inits = [numpy_helper.from_array(np.ascontiguousarray(wq.T), "table_q"), numpy_helper.from_array(w_scale, "w_scale")]
        nodes = [helper.make_node("DequantizeLinear", ["table_q", "w_scale"], ["table"], axis=0),
                 helper.make_node("Transpose", ["table"], ["w"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "w"], ["y"], name="/lm_head/MatMul")]
    else:
        inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(w_scale, "w_scale")]
        nodes = [helper.make_node("DequantizeLinear", ["wq", "w_scale"], ["w"], axis=1),
                 helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/up_proj/MatMul")]
    qdq = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], initializer=inits), opset_imports=opset)
    ir_model = ir.serde.deserialize_model(qdq)
    LowerInt8WeightGemmPass()(ir_model)
    lowered = ir.serde.serialize_model(ir_model)
    assert any(node.op_type == "Int8WeightGemm" for node in lowered.graph.node), "lowering did not apply"
    fp32 = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w_f"], ["y"])], "fp32", [x], [y],
                                               initializer=[numpy_helper.from_array(wq * w_scale, "w_f")]),
                             opset_imports=opset)
    for model in (qdq, fp32):
        onnx.checker.check_model(model)
    return qdq, lowered, fp32


def cpu_time_ms(run: Callable[[], Any], min_s: float = 0.3) -> float:
    run()
    t0 = time.perf_counter()
    run()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(max(3, min(500, min_s / one)))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples) * 1e3


def run_cpu(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from eqcompiler.runtime import custom_ops

    lib = custom_ops.find_library()
    rng = np.random.default_rng(0)
    thread_counts = sorted({1, os.cpu_count() or 1})
    ms_list = [1, 16, 128] if args.quick else [1, 16, 128, 512]
    weight_only = args.cpu_op == "weight"
    shapes = SMOLLM2_KN + [(576, 49152)] if weight_only else SMOLLM2_KN  # + SmolLM2's tied lm_head
    rows = []
    for k, n in shapes:
        if weight_only:
            qdq, fused, fp32 = weight_only_models(k, n, rng, tied=n == 49152)
        else:
            qdq, fused, fp32 = cpu_models(k, n, rng)
        for threads in thread_counts:
            def session(model, custom: bool, exact: bool = False) -> ort.InferenceSession:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                if exact:  # ORT's DQ->MatMul rewrite in float32 compute: the QDQ graph's own numerics
                    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
                if custom:
                    custom_ops.register(opts, lib)
                return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

            sessions = {"fused": session(fused, True), "qdq": session(qdq, False), "fp32": session(fp32, False)}
            if weight_only:  # by default ORT turns DQ->MatMul into MatMulNBits with int8 activations
                sessions["qdq_exact"] = session(qdq, False, exact=True)
            for m in ms_list:
                feed = {"x": rng.standard_normal((m, k)).astype(np.float32)}
                outs = {name: s.run(None, feed)[0] for name, s in sessions.items()}
                scale = float(np.abs(outs["qdq"]).max())
                row: dict[str, Any] = {"M": m, "K": k, "N": n, "threads": threads,
                                       "fused_vs_qdq_max_rel_diff": float(np.abs(outs["fused"] - outs["qdq"]).max()) / scale}
                if weight_only:
                    row["fused_vs_qdq_exact_max_rel_diff"] = float(np.abs(outs["fused"] - outs["qdq_exact"]).max()) / scale
                for name, s in sessions.items():
                    row[f"{name}_ms"] = cpu_time_ms(lambda s=s: s.run(None, feed))
                    row[f"{name}_gops"] = 2.0 * m * n * k / (row[f"{name}_ms"] * 1e-3) / 1e9
                if weight_only:
                    row["speedup_vs_qdq_exact"] = row["qdq_exact_ms"] / row["fused_ms"]
                row["speedup_vs_qdq"] = row["qdq_ms"] / row["fused_ms"]
                row["speedup_vs_fp32"] = row["fp32_ms"] / row["fused_ms"]
                rows.append(row)
                print(f"M={m:4d} K={k:5d} N={n:5d} t={threads}  fused {row['fused_ms']:.3f} ms  "
                      f"qdq {row['qdq_ms']:.3f} ms  fp32 {row['fp32_ms']:.3f} ms  "
                      f"x{row['speedup_vs_qdq']:.2f} vs qdq  x{row['speedup_vs_fp32']:.2f} vs fp32")
    so = ctypes.CDLL(str(lib))
    so.eqc_ops_build_info.restype = ctypes.c_char_p
    env = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "onnxruntime": ort.__version__, "library": str(lib), "build": so.eqc_ops_build_info().decode()}
    op = "Int8WeightGemm" if weight_only else "FusedInt8Gemm"
    result = {"environment": env, "rows": rows, "op": op,
              "note": f"per-call session.run latency incl. ORT overhead; fused = lowered ai.eqc::{op}"}
    # One file per kernel variant: results from a VNNI machine and an AVX2 one are both kept.
    isa = env["build"].split("cpu_isa=")[-1].split()[0] if "cpu_isa=" in env["build"] else "unknown"
    stem = pathlib.Path(args.out_dir) / f"cpu_{'int8_weight' if weight_only else 'fused'}_gemm_{isa}"
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    cols = [("M", "M"), ("K", "K"), ("N", "N"), ("threads", "threads"), ("fused_ms", "fused ms"),
            ("qdq_ms", "QDQ ms"), ("fp32_ms", "fp32 ms"), ("fused_gops", "fused GOPS"),
            ("speedup_vs_qdq", "fused vs QDQ"), ("speedup_vs_fp32", "fused vs fp32"),
            ("fused_vs_qdq_max_rel_diff", "max rel diff")]
    if weight_only:
        cols[6:6] = [("qdq_exact_ms", "QDQ exact ms")]
        cols[-1:-1] = [("speedup_vs_qdq_exact", "fused vs QDQ exact")]
        cols.append(("fused_vs_qdq_exact_max_rel_diff", "rel diff vs exact"))
    what = ("one weight-only linear layer (int8 weights, float activations; N = 49152 is SmolLM2's tied lm_head, "
            "QDQ = Transpose(DequantizeLinear(table)) -> MatMul). 'fused' = the lowered ai.eqc::Int8WeightGemm. "
            "ORT's default session rewrites these QDQ graphs into MatMulNBits with int8-quantized activations "
            "(the 'max rel diff' column: not the graph's numerics); 'QDQ exact' sets "
            "session.qdq_matmulnbits_accuracy_level=0 (float compute), the numerics the lowered op keeps"
            if weight_only else "a single W8A8-dynamic linear layer (+bias). 'fused' = the lowered ai.eqc::FusedInt8Gemm")
    md = (f"# {op} CPU kernel (onnxruntime {env['onnxruntime']})\n\n"
          f"CPU: {env['cpu']}, {env['cpu_count']} logical cores; {env['build']}.\n"
          f"Latency of one session.run of {what}. QDQ runs in a default ORT session (its own graph optimizations on). "
          "Speed-ups > 1 mean the lowered op is faster; max rel diff is |fused - QDQ| / max|QDQ|.\n\n"
          + markdown_table(rows, cols) + "\n")
    write_atomic(stem.with_suffix(".md"), md)
    print(f"wrote {stem}.json and .md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU kernel in onnxruntime instead")
    parser.add_argument("--cpu-op", choices=["fused", "weight"], default="fused",
                        help="--cpu: FusedInt8Gemm (W8A8-dynamic) or Int8WeightGemm (weight-only, incl. the tied lm_head)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--no-variants", action="store_true", help="GPU: time only the kernel auto picks")
    parser.add_argument("--models", default="smollm2,7b", help="GPU: K/N shape sets, comma-separated (smollm2, 7b)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the results are written")
    args = parser.parse_args(argv)
    return run_cpu(args) if args.cpu else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
