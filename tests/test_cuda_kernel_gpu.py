"""The CUDA kernels of libeqc_ops_cuda.so on a GPU, through their C entry points (ctypes + torch).

Needs only numpy, torch and the built library (no onnxruntime-gpu): on a GPU machine run
`pytest -m gpu --noconftest test_cuda_kernel_gpu.py`. Every test skips, with the reason, where
torch or a CUDA device is missing. Results are compared bit for bit with op_reference.
"""
from __future__ import annotations

import ctypes
import pathlib

import numpy as np
import pytest

from op_reference import dequant_gemm, quantize_rows, random_problem, reference

pytestmark = pytest.mark.gpu
LIB = pathlib.Path(__file__).resolve().parents[1] / "build" / "cuda_ops" / "libeqc_ops_cuda.so"
NOT_SUPPORTED = 801  # cudaErrorNotSupported: a wgmma variant where no sm_90a code runs


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    return torch


@pytest.fixture(scope="module")
def so(torch):
    if not LIB.is_file():
        pytest.fail(f"a GPU is present but {LIB} was not built (make ops)")
    so = ctypes.CDLL(str(LIB))
    vp, i32, f32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
    so.eqc_fused_int8_gemm_cuda.argtypes = [vp, vp, vp, vp, vp, i32, i32, i32, vp]
    so.eqc_fused_int8_gemm_cuda_ex.argtypes = [vp, vp, vp, vp, vp, i32, i32, i32, f32, f32, vp, sz, vp]
    so.eqc_int8_gemm_dequant_cuda_variant.argtypes = [vp, vp, vp, vp, vp, vp, i32, i32, i32, i32, vp]
    so.eqc_fused_int8_gemm_cuda_workspace_size.argtypes = [i32, i32, i32]
    so.eqc_fused_int8_gemm_cuda_workspace_size.restype = sz
    so.eqc_cuda_variant_name.restype = ctypes.c_char_p
    so.eqc_cuda_error_string.restype = ctypes.c_char_p
    return so


def ptr(t) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def stream(torch) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def check(so, rc: int) -> None:
    assert rc == 0, so.eqc_cuda_error_string(rc).decode()


def fused(torch, so, a, b, scale, bias, floors=(0.0, 0.0)) -> np.ndarray:
    m, k = a.reshape(-1, a.shape[-1]).shape
    n = b.shape[0]
    dev = lambda arr: torch.from_numpy(np.ascontiguousarray(arr)).cuda()  # noqa: E731
    ta, tb, ts = dev(a), dev(b), dev(scale)
    tbias = dev(bias) if bias is not None else None
    y = torch.full((m, n), float("nan"), dtype=torch.float32, device="cuda")  # poison: every element written
    check(so, so.eqc_fused_int8_gemm_cuda_ex(ptr(ta), ptr(tb), ptr(ts), ptr(tbias), ptr(y), m, n, k, floors[0],
                                             floors[1], None, 0, stream(torch)))
    torch.cuda.synchronize()
    return y.cpu().numpy()


# M = 1 (decode), M = 16/17 (small-tile edge), K not a multiple of 16 (padded copy of B), K not a
# multiple of 128 (partial wgmma K tile), N not a multiple of the tile, tiles exceeding the SM count;
# K = 11008 / 16400 / 4100: 1024-thread register-cached quantization, the re-reading fallback, ldq padding.
FUSED_SHAPES = [(1, 7, 5), (3, 33, 9), (1, 576, 1536), (16, 576, 1536), (17, 576, 1536), (65, 200, 130),
                (300, 1536, 576), (1000, 4096, 4096 + 8), (2048, 576, 1536),
                (5, 11008, 64), (3, 16400, 40), (4, 4100, 24)]


@pytest.mark.parametrize("m,k,n", FUSED_SHAPES)
def test_fused_kernel_is_bit_exact(torch, so, m, k, n):
    rng = np.random.default_rng(m * 7 + k)
    a, b, scale, bias = random_problem(rng, (m, k), n)
    np.testing.assert_array_equal(fused(torch, so, a, b, scale, bias), reference(a, b, scale, bias))


def test_fused_kernel_floors_and_no_bias(torch, so):
    rng = np.random.default_rng(3)
    a, b, scale, _ = random_problem(rng, (40, 96), 72)
    a[5] = 1e-9  # a tiny row: the floors decide its scale
    y = fused(torch, so, a, b, scale, None, floors=(1e-3, 1e-5))
    np.testing.assert_array_equal(y, reference(a, b, scale, None, absmax_floor=1e-3, scale_floor=1e-5))


def variants(so) -> list[int]:
    return list(range(1, so.eqc_cuda_variant_count()))


VARIANT_SHAPES = [(1, 64, 40), (16, 576, 1536), (33, 256, 200), (130, 1536, 576), (257, 4096, 520)]


def test_every_gemm_variant_is_bit_exact(torch, so):
    """Each kernel variant on shapes with partial M, N and K tiles (host-quantized activations)."""
    ran, unsupported = [], []
    for m, k, n in VARIANT_SHAPES:
        rng = np.random.default_rng(m + n)
        a, b, scale, bias = random_problem(rng, (m, k), n)
        q, s = quantize_rows(a)
        ld = (k + 15) // 16 * 16
        q_pad = np.zeros((m, ld), np.int8)
        q_pad[:, :k] = q
        b_pad = np.zeros((n, ld), np.int8)
        b_pad[:, :k] = b
        expect = dequant_gemm(q, s, b, scale, bias)
        tq, ts_a, tb, ts_b, tbias = (torch.from_numpy(x).cuda() for x in (q_pad, s.ravel().copy(), b_pad, scale, bias))
        for v in variants(so):
            name = so.eqc_cuda_variant_name(v).decode()
            y = torch.full((m, n), float("nan"), device="cuda")
            rc = so.eqc_int8_gemm_dequant_cuda_variant(ptr(tq), ptr(ts_a), ptr(tb), ptr(ts_b), ptr(tbias), ptr(y),
                                                       m, n, ld, v, stream(torch))
            if rc == NOT_SUPPORTED:
                unsupported.append(name)
                continue
            check(so, rc)
            torch.cuda.synchronize()
            np.testing.assert_array_equal(y.cpu().numpy(), expect, err_msg=f"{name} at M={m} K={k} N={n}")
            ran.append(name)
    assert ran, "no kernel variant ran"
    if torch.cuda.get_device_capability() == (9, 0):
        assert not unsupported, f"sm_90a kernels did not run on a compute-9.0 device: {sorted(set(unsupported))}"


def test_wgmma_kernels_run_on_hopper(torch, so):
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        pytest.skip(f"wgmma needs compute capability 9.0, this device is {cap}")
    assert so.eqc_cuda_wgmma_available() == 1
    chosen = so.eqc_cuda_variant_name(so.eqc_cuda_chosen_variant(4096, 4096, 4096)).decode()
    assert chosen.startswith("wgmma"), chosen


def test_back_to_back_calls_and_graph_replay(torch, so):
    """Programmatic dependent launch overlaps each GEMM with its quantization kernel: run many
    calls back to back on changing inputs, and replay them from a CUDA graph; all stay exact."""
    rng = np.random.default_rng(11)
    m, k, n = 8, 1536, 576
    problems = [random_problem(rng, (m, k), n) for _ in range(6)]
    dev = lambda arr: torch.from_numpy(arr).cuda()  # noqa: E731
    bufs = [tuple(dev(x) for x in p) for p in problems]
    outs = [torch.full((m, n), float("nan"), device="cuda") for _ in problems]
    ws = torch.empty(so.eqc_fused_int8_gemm_cuda_workspace_size(m, n, k), dtype=torch.uint8, device="cuda")

    def run_all() -> None:
        for (ta, tb, ts, tbias), y in zip(bufs, outs):
            check(so, so.eqc_fused_int8_gemm_cuda_ex(ptr(ta), ptr(tb), ptr(ts), ptr(tbias), ptr(y), m, n, k, 0.0, 0.0,
                                                     ptr(ws), ws.numel(), stream(torch)))

    for _ in range(20):
        run_all()
    torch.cuda.synchronize()
    for p, y in zip(problems, outs):
        np.testing.assert_array_equal(y.cpu().numpy(), reference(*p))
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            run_all()
    for y in outs:
        y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for p, y in zip(problems, outs):
        np.testing.assert_array_equal(y.cpu().numpy(), reference(*p))


def test_bad_arguments_return_errors(torch, so):
    t = torch.zeros(64, dtype=torch.int8, device="cuda")
    f = torch.zeros(64, device="cuda")
    bad_variant = so.eqc_int8_gemm_dequant_cuda_variant(ptr(t), ptr(f), ptr(t), ptr(f), None, ptr(f), 2, 2, 16, 99,
                                                        stream(torch))
    bad_ld = so.eqc_int8_gemm_dequant_cuda_variant(ptr(t), ptr(f), ptr(t), ptr(f), None, ptr(f), 2, 2, 15, 0,
                                                   stream(torch))
    assert bad_variant != 0 and bad_ld != 0
    assert so.eqc_cuda_error_string(bad_ld).decode()
