"""numpy statement of ai.eqc::FusedInt8Gemm, shared by the CPU-kernel and GPU-kernel tests.

Kept free of onnx/onnxruntime imports so the GPU tests run where only numpy, torch and ctypes are.
"""
from __future__ import annotations

import numpy as np


def quantize_rows(a2: np.ndarray, absmax_floor: float = 0.0, scale_floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 quantization exactly as the kernels do it: (q int8 [M,K], scale [M,1])."""
    k = a2.shape[-1]
    absmax = np.abs(a2).max(axis=1, keepdims=True) if k else np.zeros((a2.shape[0], 1), np.float32)
    s = np.maximum(np.maximum(absmax, np.float32(absmax_floor)) / np.float32(127), np.float32(scale_floor))
    s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    return np.clip(np.rint(a2 / s), -128, 127).astype(np.int8), s


def dequant_gemm(q: np.ndarray, s: np.ndarray, b_nk: np.ndarray, b_scale: np.ndarray,
                 bias: np.ndarray | None) -> np.ndarray:
    """int32 GEMM of int8 rows and weights, then ((float)acc * s_row) * s_col (+ bias), no FMA."""
    acc = q.astype(np.int32) @ b_nk.astype(np.int32).T
    y = (acc.astype(np.float32) * s) * b_scale.astype(np.float32)
    return y + bias if bias is not None else y


def reference(a: np.ndarray, b_nk: np.ndarray, b_scale: np.ndarray, bias: np.ndarray | None = None,
              absmax_floor: float = 0.0, scale_floor: float = 0.0) -> np.ndarray:
    """The whole op: per-row symmetric int8 quantization, int32 GEMM, dequantize."""
    k = a.shape[-1]
    q, s = quantize_rows(a.reshape(-1, k).astype(np.float32), absmax_floor, scale_floor)
    y = dequant_gemm(q, s, b_nk, b_scale, bias)
    return y.reshape(*a.shape[:-1], b_nk.shape[0]).astype(np.float32)


def random_problem(rng: np.random.Generator, a_shape: tuple[int, ...], n: int):
    """Activations with one all-zero token, full-range int8 weights, positive scales, a bias."""
    k = a_shape[-1]
    a = rng.standard_normal(a_shape).astype(np.float32) * rng.uniform(0.1, 10)
    if a.size and a_shape[0] > 2:
        a.reshape(-1, k)[1] = 0.0  # an all-zero token must not divide by zero
    b = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    scale = (rng.random(n).astype(np.float32) + 0.5) * np.float32(0.01)
    bias = rng.standard_normal(n).astype(np.float32)
    return a, b, scale, bias
