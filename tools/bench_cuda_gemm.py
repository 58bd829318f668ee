#!/usr/bin/env python3
"""Benchmarks for ai.eqc::FusedInt8Gemm.

GPU (default): the CUDA kernel of build/cuda_ops/libeqc_ops_cuda.so through its C entry points
(ctypes) against torch._int_mm (cuBLASLt int8 -> int32) and fp16 torch.matmul, on prefill
(M = 512..4096) and decode (M = 1..16) shapes with SmolLM2 (576/1536) and 7B-class (4096/11008)
K/N. Writes tools/results/cuda_gemm.json and .md. Without a CUDA device: prints one line, exits 0,
writes nothing.

--cpu: the CPU kernel inside onnxruntime (the lowered graph) against the QDQ graph it replaces
and a float32 MatMul, at SmolLM2 shapes. Writes tools/results/cpu_fused_gemm.json and .md.
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


def write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def find_library(cuda: bool) -> pathlib.Path:
    try:
        from eqcompiler import custom_ops

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
        self.so.eqc_int8_gemm_dequant_cuda.argtypes = [vp, vp, vp, vp, vp, vp, i32, i32, i32, vp]
        self.so.eqc_cuda_error_string.restype = ctypes.c_char_p

    def check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"eqc CUDA call failed: {self.so.eqc_cuda_error_string(rc).decode()}")


def cuda_time_ms(torch: Any, fn: Callable[[], None], min_ms: float = 200.0) -> float:
    """Median per-call time from CUDA events, after warm-up; enough iterations for ~min_ms."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    iters = int(max(10, min(2000, min_ms / max(start.elapsed_time(end), 1e-3))))
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def bench_gpu_shape(torch: Any, lib: CudaLib, m: int, k: int, n: int) -> dict[str, Any]:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(m * 31 + k * 7 + n)
    a = torch.randn(m, k, device=dev, generator=gen)
    b = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
    b_scale = torch.rand(n, device=dev, generator=gen) * 0.01 + 0.001
    bias = torch.randn(n, device=dev, generator=gen)
    y = torch.empty(m, n, device=dev)
    ld = (k + 15) // 16 * 16
    ws = torch.empty(lib.so.eqc_fused_int8_gemm_cuda_workspace_size(m, n, k), device=dev, dtype=torch.uint8)
    aq = torch.zeros(m, ld, device=dev, dtype=torch.int8)
    a_scale = torch.empty(m, device=dev)
    stream = torch.cuda.current_stream().cuda_stream
    p = lambda t: t.data_ptr()  # noqa: E731

    def fused() -> None:
        lib.check(lib.so.eqc_fused_int8_gemm_cuda_ex(p(a), p(b), p(b_scale), p(bias), p(y), m, n, k, 0.0, 0.0,
                                                     p(ws), ws.numel(), stream))

    def gemm_only() -> None:
        lib.check(lib.so.eqc_int8_gemm_dequant_cuda(p(aq), p(a_scale), p(b), p(b_scale), p(bias), p(y), m, n, ld,
                                                    stream))

    lib.check(lib.so.eqc_quantize_rows_cuda(p(a), p(aq), p(a_scale), m, k, ld, 0.0, 0.0, stream))
    row: dict[str, Any] = {"M": m, "K": k, "N": n, "ops": 2.0 * m * n * k}
    row["eqc_fused_ms"] = cuda_time_ms(torch, fused)
    row["eqc_gemm_ms"] = cuda_time_ms(torch, gemm_only)
    row["max_abs_err"] = check_gpu_result(torch, a, b, b_scale, bias, y, fused)

    b_t = b.t()  # [K, N] column-major view, the layout cuBLASLt int8 wants
    aq_k = aq[:, :k].contiguous()
    try:
        row["int_mm_ms"] = cuda_time_ms(torch, lambda: torch._int_mm(aq_k, b_t))
    except RuntimeError as exc:  # e.g. M <= 16 is rejected by torch._int_mm
        row["int_mm_ms"] = None
        row["int_mm_note"] = str(exc).splitlines()[0][:120]
    a16, w16 = a.half(), (b.float() * b_scale[:, None]).half()
    row["fp16_ms"] = cuda_time_ms(torch, lambda: torch.matmul(a16, w16.t()))
    for key in ("eqc_fused", "eqc_gemm", "int_mm", "fp16"):
        ms = row.get(f"{key}_ms")
        row[f"{key}_tops"] = row["ops"] / (ms * 1e-3) / 1e12 if ms else None
    row["fused_vs_int_mm"] = row["int_mm_ms"] / row["eqc_fused_ms"] if row["int_mm_ms"] else None
    row["gemm_vs_int_mm"] = row["int_mm_ms"] / row["eqc_gemm_ms"] if row["int_mm_ms"] else None
    row["fused_vs_fp16"] = row["fp16_ms"] / row["eqc_fused_ms"]
    return row


def check_gpu_result(torch: Any, a, b, b_scale, bias, y, fused) -> float:
    """Max |y - reference| on a sample of rows (reference: float64 on CPU, exact int products)."""
    fused()
    torch.cuda.synchronize()
    rows = torch.arange(0, a.shape[0], max(1, a.shape[0] // 8), device=a.device)
    s = (a[rows].abs().amax(dim=1, keepdim=True) / 127.0).cpu()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(a[rows].cpu() / s), -128, 127).double()
    acc = q @ b.double().cpu().t()
    ref = (acc.float() * s) * b_scale.cpu() + bias.cpu()
    return float((y[rows].cpu() - ref).abs().max())


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
    kn = SMOLLM2_KN + ([] if args.quick else LLAMA7B_KN)
    ms = (PREFILL_M[:2] if args.quick else PREFILL_M) + DECODE_M
    rows = []
    for k, n in kn:
        for m in ms:
            row = bench_gpu_shape(torch, lib, m, k, n)
            rows.append(row)
            print(f"M={m:5d} K={k:5d} N={n:5d}  eqc {row['eqc_fused_tops']:.1f} TOPS (gemm {row['eqc_gemm_tops']:.1f})"
                  f"  int_mm {row['int_mm_tops'] or 0:.1f}  fp16 {row['fp16_tops']:.1f}  err {row['max_abs_err']:.2e}")
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "library": str(path)}
    result = {"environment": env, "rows": rows}
    write_atomic(RESULTS / "cuda_gemm.json", json.dumps(result, indent=2) + "\n")
    cols = [("M", "M"), ("K", "K"), ("N", "N"), ("eqc_fused_tops", "eqc fused TOPS"),
            ("eqc_gemm_tops", "eqc GEMM-only TOPS"), ("int_mm_tops", "torch._int_mm TOPS"),
            ("fp16_tops", "fp16 matmul TFLOPS"), ("fused_vs_int_mm", "fused / int_mm speed"),
            ("fused_vs_fp16", "fused / fp16 speed"), ("max_abs_err", "max abs err")]
    md = (f"# FusedInt8Gemm CUDA kernel\n\nDevice: {env['device']} (torch {env['torch']}, CUDA {env['cuda']}).\n"
          "Speed ratios > 1 mean the eqc kernel is faster. `eqc fused` includes per-token quantization; "
          "torch._int_mm is the int8 GEMM alone (no quantization, no dequantization).\n\n"
          + markdown_table(rows, cols) + "\n")
    write_atomic(RESULTS / "cuda_gemm.md", md)
    print(f"wrote {RESULTS / 'cuda_gemm.json'} and .md")
    return 0


# ================================================================================== CPU
def cpu_models(k: int, n: int, rng: np.random.Generator):
    """(QDQ W8A8-dynamic graph as eqc emits it, lowered FusedInt8Gemm graph, float32 MatMul graph)."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from eqcompiler.passes.lower_fused_int8_gemm import LowerFusedInt8GemmPass

    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
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

    from eqcompiler import custom_ops

    lib = custom_ops.find_library()
    rng = np.random.default_rng(0)
    thread_counts = sorted({1, os.cpu_count() or 1})
    ms_list = [1, 16, 128] if args.quick else [1, 16, 128, 512]
    rows = []
    for k, n in SMOLLM2_KN:
        qdq, fused, fp32 = cpu_models(k, n, rng)
        for threads in thread_counts:
            def session(model, custom: bool) -> ort.InferenceSession:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                if custom:
                    custom_ops.register(opts, lib)
                return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

            sessions = {"fused": session(fused, True), "qdq": session(qdq, False), "fp32": session(fp32, False)}
            for m in ms_list:
                feed = {"x": rng.standard_normal((m, k)).astype(np.float32)}
                outs = {name: s.run(None, feed)[0] for name, s in sessions.items()}
                scale = float(np.abs(outs["qdq"]).max())
                row: dict[str, Any] = {"M": m, "K": k, "N": n, "threads": threads,
                                       "fused_vs_qdq_max_rel_diff": float(np.abs(outs["fused"] - outs["qdq"]).max()) / scale}
                for name, s in sessions.items():
                    row[f"{name}_ms"] = cpu_time_ms(lambda s=s: s.run(None, feed))
                    row[f"{name}_gops"] = 2.0 * m * n * k / (row[f"{name}_ms"] * 1e-3) / 1e9
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
    result = {"environment": env, "rows": rows,
              "note": "per-call session.run latency incl. ORT overhead; fused = lowered ai.eqc::FusedInt8Gemm"}
    write_atomic(RESULTS / "cpu_fused_gemm.json", json.dumps(result, indent=2) + "\n")
    cols = [("M", "M"), ("K", "K"), ("N", "N"), ("threads", "threads"), ("fused_ms", "fused ms"),
            ("qdq_ms", "QDQ ms"), ("fp32_ms", "fp32 ms"), ("fused_gops", "fused GOPS"),
            ("speedup_vs_qdq", "fused vs QDQ"), ("speedup_vs_fp32", "fused vs fp32"),
            ("fused_vs_qdq_max_rel_diff", "max rel diff")]
    md = (f"# FusedInt8Gemm CPU kernel (onnxruntime {env['onnxruntime']})\n\n"
          f"CPU: {env['cpu']}, {env['cpu_count']} logical cores; {env['build']}.\n"
          "Latency of one session.run of a single linear layer (+bias). Speed-ups > 1 mean the fused op "
          "is faster; max rel diff is |fused - QDQ| / max|QDQ|.\n\n" + markdown_table(rows, cols) + "\n")
    write_atomic(RESULTS / "cpu_fused_gemm.md", md)
    print(f"wrote {RESULTS / 'cpu_fused_gemm.json'} and .md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU kernel in onnxruntime instead")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    return run_cpu(args) if args.cpu else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
