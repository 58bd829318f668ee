"""ai.eqc::FusedInt8Gemm: the op library (CPU kernel, CUDA build outputs, CUDA kernel on a GPU),
its Python loader, and the pass that lowers eqc's W8A8-dynamic QDQ pattern to it."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eqcompiler.runtime import custom_ops
from eqcompiler.runtime.custom_ops import EqcOpsError
from eqcompiler.passes.lower_fused_int8_gemm import LowerFusedInt8GemmPass
from op_reference import random_problem, reference

REPO = pathlib.Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "cuda_ops"


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def lib() -> pathlib.Path:
    try:
        return custom_ops.find_library()
    except EqcOpsError as exc:
        pytest.fail(f"op library not built ({exc}); `make test` runs `make ops` first")


def fused_model(k: int | str, n: int | str, rank: int = 2, bias: bool = False, a_type: int = TensorProto.FLOAT,
                b_shape: list | None = None, op_type: str = "FusedInt8Gemm") -> onnx.ModelProto:
    """A graph with one ai.eqc op (FusedInt8Gemm, or Int8WeightGemm: same inputs) fed by graph inputs."""
    names = ["A", "B", "B_scale"] + (["bias"] if bias else [])
    node = helper.make_node(op_type, names, ["Y"], domain="ai.eqc")
    inputs = [helper.make_tensor_value_info("A", a_type, [f"d{i}" for i in range(rank - 1)] + [k]),
              helper.make_tensor_value_info("B", TensorProto.INT8, b_shape or [n, k]),
              helper.make_tensor_value_info("B_scale", TensorProto.FLOAT, [n])]
    if bias:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [n]))
    graph = helper.make_graph([node], "fused", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.eqc", 1)])


def constant_weight_model(b: np.ndarray, scale: np.ndarray, bias: np.ndarray, rank: int) -> onnx.ModelProto:
    """fused_model with B, B_scale and bias as initializers: the kernel then takes B's row sums once, when it is
    created, instead of on every call (the path every compiled artifact runs)."""
    model = fused_model(b.shape[1], b.shape[0], rank=rank, bias=True)
    del model.graph.input[1:]
    model.graph.initializer.extend([numpy_helper.from_array(b, "B"), numpy_helper.from_array(scale, "B_scale"),
                                    numpy_helper.from_array(bias, "bias")])
    return model


def cpu_session(model: onnx.ModelProto, lib: pathlib.Path | None, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if lib is not None:
        custom_ops.register(opts, lib)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def qdq_model(k: int, n: int, rng: np.random.Generator, *, rank: int = 2, floor: str = "none", eps: float = 1e-5,
              act_zp: bool = False, w_zp: bool = True, bias: str = "none", consumers: int = 1,
              reduce_attr_axes: bool = False) -> onnx.ModelProto:
    """eqc's W8A8-dynamic QDQ pattern (opset 21) with `consumers` MatMuls sharing one activation chain."""
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(127.0, np.float32), "c127"),
             numpy_helper.from_array(np.array(eps, np.float32), "eps"),
             numpy_helper.from_array(np.array(0, np.int8), "act_zp")]
    nodes = [helper.make_node("Abs", ["x"], ["a"])]
    if reduce_attr_axes:  # constant axes from a Constant node rather than an initializer
        nodes.append(helper.make_node("Constant", [], ["axes_c"], value=numpy_helper.from_array(np.array([-1], np.int64))))
        nodes.append(helper.make_node("ReduceMax", ["a", "axes_c"], ["m"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1))
    if floor == "before_div":
        nodes += [helper.make_node("Max", ["m", "eps"], ["mf"]), helper.make_node("Div", ["mf", "c127"], ["s"])]
    elif floor == "after_div":
        nodes += [helper.make_node("Div", ["m", "c127"], ["sd"]), helper.make_node("Max", ["eps", "sd"], ["s"])]
    else:
        nodes.append(helper.make_node("Div", ["m", "c127"], ["s"]))
    qz = ["act_zp"] if act_zp else []
    qattrs = {} if act_zp else {"output_dtype": TensorProto.INT8}
    nodes.append(helper.make_node("QuantizeLinear", ["x", "s", *qz], ["q"], axis=-1, block_size=k, **qattrs))
    nodes.append(helper.make_node("DequantizeLinear", ["q", "s", *qz], ["dq"], axis=-1, block_size=k))
    outputs = []
    x_shape = [f"d{i}" for i in range(rank - 1)] + [k]
    for i in range(consumers):
        w = rng.standard_normal((k, n)).astype(np.float32)
        w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        wq = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(wq, f"w{i}_q"), numpy_helper.from_array(w_scale, f"w{i}_scale"),
                  numpy_helper.from_array(np.zeros(n, np.int8), f"w{i}_zp"),
                  numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_scale"] + ([f"w{i}_zp"] if w_zp else []),
                                      [f"w{i}"], axis=1))
        y = f"y{i}"
        nodes.append(helper.make_node("MatMul", ["dq", f"w{i}"], [f"mm{i}" if bias != "none" else y]))
        if bias == "add":
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [y]))
        elif bias == "add_rev":
            nodes.append(helper.make_node("Add", [f"b{i}", f"mm{i}"], [y]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, x_shape[:-1] + [n]))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model


def lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    ir_model = ir.serde.deserialize_model(model)
    pass_ = LowerFusedInt8GemmPass()
    pass_(ir_model)
    return ir.serde.serialize_model(ir_model), pass_.context.report["lower_fused_int8_gemm"]["fused"]


# ----------------------------------------------------------------------- CPU kernel
SHAPES = [  # (A shape, N)
    ((1, 576), 1536),
    ((0, 33), 7),
    ((4, 1), 5),
    ((5, 7), 3),
    ((3, 33), 1),
    ((2, 3, 33), 8),
    ((2, 0, 7), 4),
    ((17, 576), 64),
    ((9, 40), 13),
]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("a_shape,n", SHAPES, ids=[f"A{'x'.join(map(str, s))}_N{n}" for s, n in SHAPES])
def test_cpu_kernel_matches_reference(lib, a_shape, n, with_bias):
    rng = np.random.default_rng(hash((a_shape, n)) % 2**32)
    a, b, scale, bias = random_problem(rng, a_shape, n)
    sess = cpu_session(fused_model(a_shape[-1], n, rank=len(a_shape), bias=with_bias), lib)
    feed = {"A": a, "B": b, "B_scale": scale} | ({"bias": bias} if with_bias else {})
    (y,) = sess.run(None, feed)
    ref = reference(a, b, scale, bias if with_bias else None)
    assert y.shape == (*a_shape[:-1], n) and y.dtype == np.float32
    # Exact int32 accumulation + the same float ops: equal up to (at most) last-bit rounding.
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * max(1.0, float(np.abs(ref).max(initial=0))))


def check_all_shapes(lib: pathlib.Path) -> str:
    """Every SHAPES case with bias, bit-exact; returns the CPU variant the library picked."""
    rng = np.random.default_rng(9)
    for a_shape, n in SHAPES + [((70, 130), 67), ((1, 130), 67), ((3, 700), 300)]:
        a, b, scale, bias = random_problem(rng, a_shape, n)
        sess = cpu_session(fused_model(a_shape[-1], n, rank=len(a_shape), bias=True), lib, threads=2)
        (y,) = sess.run(None, {"A": a, "B": b, "B_scale": scale, "bias": bias})
        np.testing.assert_array_equal(y, reference(a, b, scale, bias))
        (y,) = cpu_session(constant_weight_model(b, scale, bias, len(a_shape)), lib, threads=2).run(None, {"A": a})
        np.testing.assert_array_equal(y, reference(a, b, scale, bias))
    # Extremes: every weight -128 and tokens at +-absmax (q = +-127) over a long K, so every
    # int16 pair sum of the AVX2 path is at its bound (2 * 127 * 128) and the int32 sums near
    # 16 million; plus NaN and inf inside a token, which must not disturb its neighbours.
    k = 4099
    a = np.where(rng.random((6, k)) < 0.5, -3.0, 3.0).astype(np.float32)
    a[4, 7], a[5, 9] = np.nan, np.inf
    b = np.full((5, k), -128, np.int8)
    b[1] = 127
    scale = np.full(5, 1e-3, np.float32)
    sess = cpu_session(fused_model(k, 5), lib, threads=2)
    (y,) = sess.run(None, {"A": a, "B": b, "B_scale": scale})
    np.testing.assert_array_equal(y[:4], reference(a[:4], b, scale))
    np.testing.assert_array_equal(y[4], reference(np.nan_to_num(a[4:5], nan=0.0), b, scale)[0])  # NaN: skipped, q = 0
    assert np.isnan(y[5]).all()  # inf: scale inf, every q 0, and 0 * inf = NaN, as the QDQ graph's DequantizeLinear gives
    so = ctypes.CDLL(str(lib))
    so.eqc_ops_build_info.restype = ctypes.c_char_p
    return so.eqc_ops_build_info().decode().split("cpu_isa=")[1]


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512vnni"])
def test_every_cpu_variant_is_exact(lib, isa):
    """The library picks one kernel per process; EQC_CPU_ISA forces each variant in a subprocess."""
    code = f"import pathlib, test_cuda_ops as t; print(t.check_all_shapes(pathlib.Path({str(lib)!r})))"
    run = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent, capture_output=True,
                         text=True, timeout=300, env=os.environ | {"EQC_CPU_ISA": isa})
    assert run.returncode == 0, run.stderr[-2000:]
    picked = run.stdout.strip().splitlines()[-1]
    if picked != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernel (ran {picked} instead)")


def test_cpu_kernel_multithreaded_and_bit_exact(lib):
    rng = np.random.default_rng(1)
    a, b, scale, bias = random_problem(rng, (130, 576), 300)
    sess = cpu_session(fused_model(576, 300, bias=True), lib, threads=4)
    (y,) = sess.run(None, {"A": a, "B": b, "B_scale": scale, "bias": bias})
    np.testing.assert_array_equal(y, reference(a, b, scale, bias))


def test_rounding_is_half_to_even_like_quantizelinear(lib):
    # absmax 127 -> scale exactly 1, so x/s hits the .5 ties; K=5 also exercises the scalar tail.
    a = np.array([[127.0, 0.5, 1.5, 2.5, -0.5], [-127.0, -1.5, -2.5, 3.5, 126.5]], np.float32)
    b = np.eye(5, dtype=np.int8)
    (y,) = cpu_session(fused_model(5, 5), lib).run(None, {"A": a, "B": b, "B_scale": np.ones(5, np.float32)})
    np.testing.assert_array_equal(y, [[127, 0, 2, 2, -0], [-127, -2, -2, 4, 126]])


def test_reference_matches_onnx_qdq_semantics():
    """The numpy reference is what onnxruntime's QDQ graph computes (up to float summation order)."""
    rng = np.random.default_rng(2)
    model = qdq_model(33, 9, rng)
    ir_model = ir.serde.deserialize_model(model)
    wq = ir_model.graph.initializers["w0_q"].const_value.numpy()
    ws = ir_model.graph.initializers["w0_scale"].const_value.numpy()
    a = rng.standard_normal((6, 33)).astype(np.float32)
    (y,) = cpu_session(model, None).run(None, {"x": a})
    ref = reference(a, wq.T, ws)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))


# -------------------------------------------------------------------------- errors
def test_bad_library_path_raises_one_line_error(tmp_path):
    with pytest.raises(EqcOpsError) as info:
        custom_ops.register(ort.SessionOptions(), tmp_path / "missing.so")
    assert "\n" not in str(info.value) and "missing.so" in str(info.value)
    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_text("not an ELF file\n")
    with pytest.raises(EqcOpsError) as info:
        custom_ops.register(ort.SessionOptions(), not_a_library)
    assert "\n" not in str(info.value) and "libfake.so" in str(info.value)


def test_older_onnxruntime_is_refused_with_a_status_not_a_crash(lib):
    """RegisterCustomOps against a runtime that lacks our API version: ORT's real GetApi(1) (which every
    runtime has) behind a fake OrtApiBase that offers nothing newer and calls itself 1.16.3. The library
    must return an error status naming both versions, the way an old onnxruntime would report it."""
    ort_capi = pathlib.Path(ort.__file__).parent / "capi"
    runtime = ctypes.CDLL(str(next(ort_capi.glob("libonnxruntime.so*"))))
    runtime.OrtGetApiBase.restype = ctypes.c_void_p
    get_api_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_t = ctypes.CFUNCTYPE(ctypes.c_void_p)

    class ApiBase(ctypes.Structure):
        _fields_ = [("GetApi", get_api_t), ("GetVersionString", version_t)]

    real = ApiBase.from_address(runtime.OrtGetApiBase())
    api_v1 = real.GetApi(1)
    asked: list[int] = []
    old_version = ctypes.create_string_buffer(b"1.16.3")

    def get_api(version: int) -> int | None:
        asked.append(version)
        return api_v1 if version == 1 else None

    fake = ApiBase(get_api_t(get_api), version_t(lambda: ctypes.addressof(old_version)))
    eqc_ops = ctypes.CDLL(str(lib))
    eqc_ops.RegisterCustomOps.restype = ctypes.c_void_p
    eqc_ops.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.POINTER(ApiBase)]
    status = eqc_ops.RegisterCustomOps(None, ctypes.byref(fake))  # no options: it must stop before using them
    assert status, "an unusable runtime must be reported, not accepted"
    # OrtApi v1 layout: CreateStatus, GetErrorCode, GetErrorMessage, ...
    table = ctypes.cast(api_v1, ctypes.POINTER(ctypes.c_void_p))
    error_code = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(table[1])
    error_message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(table[2])
    eqc_ops.eqc_ops_build_info.restype = ctypes.c_char_p
    built_for = int(eqc_ops.eqc_ops_build_info().decode().split("ort_api=")[1].split()[0])
    assert asked[0] == built_for and 1 in asked
    assert error_code(status) == 1  # ORT_FAIL
    assert error_message(status).decode() == (f"eqc_ops needs onnxruntime API version {built_for} "
                                              f"(onnxruntime >= 1.{built_for}); this runtime is 1.16.3")


def test_env_var_overrides_search(lib, monkeypatch, tmp_path):
    monkeypatch.setenv(custom_ops.ENV_VAR, str(lib))
    assert custom_ops.find_library() == lib.resolve()
    monkeypatch.setenv(custom_ops.ENV_VAR, str(tmp_path / "nope.so"))
    with pytest.raises(EqcOpsError, match="EQC_OPS_LIB"):
        custom_ops.find_library()


def test_float16_activation_is_a_clear_ort_error(lib):
    with pytest.raises(Exception) as info:  # ORT's pybind exception types are not importable API
        cpu_session(fused_model(8, 4, a_type=TensorProto.FLOAT16), lib)
    assert "float16" in str(info.value) and "FusedInt8Gemm" in str(info.value)


def test_shape_mismatch_is_a_clear_ort_error(lib):
    sess = cpu_session(fused_model(8, 4, b_shape=["N", "K"]), lib)  # symbolic: only the kernel can object
    with pytest.raises(Exception, match=r"FusedInt8Gemm: B is \[4,9\] but A's last dim is K=8"):
        sess.run(None, {"A": np.ones((2, 8), np.float32), "B": np.ones((4, 9), np.int8),
                        "B_scale": np.ones(4, np.float32)})


# ------------------------------------------------------------------ lowering pass
# Blocked QuantizeLinear needs a zero point of x's rank, which a constant cannot have for dynamic
# token counts, so eqc emits none (output_dtype=INT8); act_zp=True is only checked for matching.
LOWERING_CASES = [
    dict(act_zp=False),
    dict(floor="before_div", act_zp=False, w_zp=False),
    dict(floor="after_div", act_zp=False, bias="add"),
    dict(bias="add_rev", act_zp=False, rank=3),
    dict(consumers=3, act_zp=False, bias="add", reduce_attr_axes=True),
]


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_lowered_graph_matches_qdq_graph(lib, case):
    rng = np.random.default_rng(3)
    k, n = 40, 24
    model = qdq_model(k, n, rng, **case)
    lowered, fused = lower(model)
    consumers = case.get("consumers", 1)
    assert fused == consumers
    onnx.checker.check_model(lowered)
    ops = [node.op_type for node in lowered.graph.node]
    assert ops.count("FusedInt8Gemm") == consumers
    assert not {"QuantizeLinear", "DequantizeLinear", "MatMul", "Abs", "ReduceMax", "Add"} & set(ops), ops
    assert {(o.domain, o.version) for o in lowered.opset_import} >= {("ai.eqc", 1)}
    assert custom_ops.uses_eqc_domain(lowered) and not custom_ops.uses_eqc_domain(model)

    shape = (3, 5, k) if case.get("rank") == 3 else (7, k)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    x.reshape(-1, k)[0] = 0.0
    x.reshape(-1, k)[1] *= 1e-9  # below eps: the floors must be honoured exactly
    want = cpu_session(model, None).run(None, {"x": x})
    got = ort.InferenceSession(lowered.SerializeToString(), custom_ops.session_options_for(lowered),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for w, g in zip(want, got):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * max(1e-30, float(np.abs(w).max())))


def test_lowering_accepts_explicit_zero_points():
    lowered, fused = lower(qdq_model(16, 8, np.random.default_rng(8), act_zp=True, w_zp=True))
    assert fused == 1 and [n.op_type for n in lowered.graph.node] == ["FusedInt8Gemm"]


def test_lowering_leaves_other_patterns_alone():
    rng = np.random.default_rng(4)
    model = qdq_model(16, 8, rng)
    for init in model.graph.initializer:
        if init.name == "c127":  # /255 is not the symmetric int8 scale
            init.CopyFrom(numpy_helper.from_array(np.array(255.0, np.float32), "c127"))
    lowered, fused = lower(model)
    assert fused == 0 and "FusedInt8Gemm" not in {n.op_type for n in lowered.graph.node}


def test_session_options_for_paths(lib, tmp_path):
    rng = np.random.default_rng(5)
    lowered, _ = lower(qdq_model(16, 8, rng))
    path = tmp_path / "lowered.onnx"
    onnx.save(lowered, path)
    assert custom_ops.uses_eqc_domain(path) and custom_ops.uses_eqc_domain(str(path))
    sess = ort.InferenceSession(str(path), custom_ops.session_options_for(path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((2, 16), np.float32)})[0].shape == (2, 8)


# ---------------------------------------------------------------- build outputs
def _nvcc() -> str | None:
    if os.environ.get("EQC_OPS_CUDA") == "0":
        return None
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), f"{cuda_home}/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def fatbin_images(path: pathlib.Path) -> list[tuple[str, int]]:
    """(kind, sm) of every image in the .nv_fatbin section of an ELF shared library.

    Fatbin layout: container header {u32 magic 0xBA55ED50, u16 version, u16 header size,
    u64 payload size}, then entries {u16 kind (1 PTX, 2 ELF), u16, u32 header size,
    u64 payload size, ..., u32 sm at offset 28}. (cuobjdump is not shipped with every nvcc.)
    """
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = sections[shstrndx][4]

    def name(sec) -> str:
        start = strtab_off + sec[0]
        return data[start:data.index(b"\0", start)].decode()

    fat = next((s for s in sections if name(s) == ".nv_fatbin"), None)
    assert fat is not None, f"{path.name} has no .nv_fatbin section"
    images, pos, end = [], fat[4], fat[4] + fat[5]
    while pos + 16 <= end:
        magic, _, hsize, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != 0xBA55ED50:
            pos += 8  # containers are 8-byte aligned; skip padding
            continue
        entry, stop = pos + hsize, pos + hsize + size
        while entry < stop:
            kind, _, ehsize, esize = struct.unpack_from("<HHIQ", data, entry)
            sm, = struct.unpack_from("<I", data, entry + 28)
            images.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
            entry += ehsize + esize
        pos = stop
    return images


def test_build_info_and_cuda_archs():
    info_path = BUILD / "build_info.json"
    assert info_path.is_file(), f"{info_path} missing: run `make ops`"
    info = json.loads(info_path.read_text())
    assert info["ort_api_version"] == 29
    if _nvcc() is None:
        assert info["cuda"] is False and not (BUILD / "libeqc_ops_cuda.so").exists()
        pytest.skip("nvcc not installed: CPU-only build (checked that no stale CUDA library is left)")
    assert info["cuda"] is True, "nvcc is present but build.sh did not build the CUDA library"
    # 90a: the Hopper cubin holds the wgmma kernels (the arch-specific target has no PTX to fall back to).
    assert info["cuda_archs"] == os.environ.get("EQC_CUDA_ARCHS", "80;90a").split(";")
    images = set(fatbin_images(BUILD / "libeqc_ops_cuda.so"))
    assert {("elf", 80), ("elf", 90), ("ptx", 90)} <= images, images


def test_cuda_library_exports_c_entry_points():
    if _nvcc() is None:
        pytest.skip("nvcc not installed: no CUDA library")
    so = ctypes.CDLL(str(BUILD / "libeqc_ops_cuda.so"))  # static cudart: loads without a GPU
    for sym in ("eqc_fused_int8_gemm_cuda", "eqc_fused_int8_gemm_cuda_ex", "eqc_quantize_rows_cuda",
                "eqc_int8_gemm_dequant_cuda", "eqc_fused_int8_gemm_cuda_workspace_size", "RegisterCustomOps"):
        assert hasattr(so, sym), sym
    so.eqc_ops_build_info.restype = ctypes.c_char_p
    assert b"cuda=1" in so.eqc_ops_build_info()


def test_cuda_library_serves_cpu_sessions_too():
    """libeqc_ops_cuda.so registers the CPU kernel as well, so it can replace libeqc_ops.so."""
    if _nvcc() is None:
        pytest.skip("nvcc not installed: no CUDA library")
    rng = np.random.default_rng(6)
    a, b, scale, bias = random_problem(rng, (5, 33), 7)
    sess = cpu_session(fused_model(33, 7, bias=True), custom_ops.find_library(cuda=True))
    (y,) = sess.run(None, {"A": a, "B": b, "B_scale": scale, "bias": bias})
    np.testing.assert_array_equal(y, reference(a, b, scale, bias))


def test_rebuild_is_a_no_op():
    libs = sorted(BUILD.glob("libeqc_ops*.so"))
    before = {p: p.stat().st_mtime_ns for p in libs}
    run = subprocess.run(["bash", str(REPO / "cuda_ops" / "build.sh")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert {p: p.stat().st_mtime_ns for p in libs} == before


def _build_tree(tmp_path: pathlib.Path, with_headers: bool) -> pathlib.Path:
    """A copy of cuda_ops/ for build.sh to build into <copy>/build/cuda_ops (headers cached or not)."""
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("third_party") if not with_headers else None
    shutil.copytree(REPO / "cuda_ops", root / "cuda_ops", ignore=ignore)
    return root


def _run_build(root: pathlib.Path, path: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"NVCC", "CUDA_HOME", "EQC_OPS_CUDA"}}
    return subprocess.run(["bash", str(root / "cuda_ops" / "build.sh")], capture_output=True, text=True,
                          timeout=600, env=clean | {"PATH": path, "JOBS": "2"} | env)


def test_build_without_nvcc_gives_a_working_cpu_library(tmp_path):
    """No nvcc anywhere (PATH without it, CUDA_HOME empty): a message, then the CPU library, which runs."""
    root = _build_tree(tmp_path, with_headers=True)
    no_nvcc = ":".join(d for d in os.environ["PATH"].split(":") if not (pathlib.Path(d) / "nvcc").exists())
    run = _run_build(root, no_nvcc, CUDA_HOME=str(tmp_path / "no-cuda"))
    assert run.returncode == 0, run.stderr
    assert "nvcc not found; building the CPU kernel only" in run.stdout
    out = root / "build" / "cuda_ops"
    assert json.loads((out / "build_info.json").read_text())["cuda"] is False
    assert not (out / "libeqc_ops_cuda.so").exists()
    rng = np.random.default_rng(9)
    a, b, scale, bias = random_problem(rng, (3, 21), 5)
    (y,) = cpu_session(fused_model(21, 5, bias=True), out / "libeqc_ops.so").run(
        None, {"A": a, "B": b, "B_scale": scale, "bias": bias})
    np.testing.assert_array_equal(y, reference(a, b, scale, bias))


def test_build_with_a_wrong_nvcc_path_is_an_error(tmp_path):
    root = _build_tree(tmp_path, with_headers=True)
    run = _run_build(root, os.environ["PATH"], NVCC=str(tmp_path / "nvcc-missing"))
    assert run.returncode == 1 and not run.stdout.strip()
    assert run.stderr.strip().splitlines() == [
        f"eqc ops: error: NVCC={tmp_path / 'nvcc-missing'} is not an executable file "
        "(unset NVCC to search PATH, or EQC_OPS_CUDA=0 for a CPU-only build)"]
    assert not (root / "build").exists()


@pytest.mark.parametrize("npm", ["missing", "fails", "wrong-tarball"])
def test_header_download_failures_are_one_line_errors(tmp_path, npm):
    """No cached headers and no usable `npm pack`: one clear line, exit 1, no partial cache left."""
    root = _build_tree(tmp_path, with_headers=False)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("base64", "bash", "cat", "cp", "cut", "dirname", "grep", "mkdir", "mktemp", "mv", "od", "rm",
                 "sha256sum", "sha512sum", "tail", "tar", "tr"):
        (fake_bin / tool).symlink_to(shutil.which(tool))
    if npm != "missing":
        body = {"fails": "echo 'npm ERR! code E404' >&2; exit 1",
                "wrong-tarball": "echo tampered > com.github.asus4.onnxruntime-0.4.9.tgz"}[npm]
        (fake_bin / "npm").write_text(f"#!/bin/bash\n{body}\n")
        (fake_bin / "npm").chmod(0o755)
    run = _run_build(root, str(fake_bin))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eqc ops: error: "), run.stderr
    want = {"missing": "npm not found; needed once to fetch onnxruntime headers",
            "fails": "failed to download onnxruntime headers with 'npm pack com.github.asus4.onnxruntime@0.4.9' "
                     "(npm ERR! code E404)",
            "wrong-tarball": "integrity mismatch for com.github.asus4.onnxruntime-0.4.9.tgz: sha512 "}[npm]
    assert want in lines[0]
    third_party = root / "cuda_ops" / "third_party"
    assert not third_party.exists() or not any(third_party.iterdir()), list(third_party.iterdir())
    assert not (root / "build").exists()


def test_an_edited_cached_header_is_refused(tmp_path):
    """The header cache is checked against the sha256 of what was extracted from the verified tarball."""
    root = _build_tree(tmp_path, with_headers=True)
    (header,) = root.glob("cuda_ops/third_party/onnxruntime-*/include/onnxruntime_c_api.h")
    header.write_text(header.read_text() + "\n#define ORT_API_VERSION_TAMPERED 1\n")
    run = _run_build(root, os.environ["PATH"], EQC_OPS_CUDA="0")
    assert run.returncode == 1
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("eqc ops: error: cached onnxruntime headers in ") and "differ from the verified download" in line
    assert not (root / "build" / "cuda_ops" / "libeqc_ops.so").exists()


def test_pinned_integrity_matches_the_cached_headers():
    """build.sh pins npm's sha512 integrity string; the cache it built records that pin beside its header hashes."""
    script = (REPO / "cuda_ops" / "build.sh").read_text()
    (pin,) = re.findall(r'^ORT_NPM_INTEGRITY="(sha512-[A-Za-z0-9+/=]{88})"$', script, flags=re.M)
    (cache,) = (REPO / "cuda_ops" / "third_party").glob("onnxruntime-*/include")
    assert (cache / ".integrity").read_text().strip() == pin
    listed = dict(line.split()[::-1] for line in (cache / ".sha256").read_text().splitlines())
    assert "onnxruntime_c_api.h" in listed
    for name, digest in listed.items():
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == digest


# --------------------------------------------------------------------------- GPU
def _cuda_or_skip():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    if not (BUILD / "libeqc_ops_cuda.so").is_file():
        pytest.fail("a GPU is present but build/cuda_ops/libeqc_ops_cuda.so was not built")
    return torch


@pytest.mark.gpu
def test_cuda_ep_kernel_in_onnxruntime():
    _cuda_or_skip()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    rng = np.random.default_rng(7)
    a, b, scale, bias = random_problem(rng, (2, 9, 64), 48)
    opts = ort.SessionOptions()
    custom_ops.register(opts, custom_ops.find_library(cuda=True))
    sess = ort.InferenceSession(fused_model(64, 48, rank=3, bias=True).SerializeToString(), opts,
                                providers=["CUDAExecutionProvider"])
    (y,) = sess.run(None, {"A": a, "B": b, "B_scale": scale, "bias": bias})
    np.testing.assert_array_equal(y, reference(a, b, scale, bias))
