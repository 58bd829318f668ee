"""ai.eqc::Int8WeightGemm (int8 weights, float activations) and lower_int8_weight_gemm: the CPU
kernel against a float64 reference, its fixed summation order (bit-identical across CPU variants
and thread counts), and the lowering of eqc's weight-only QDQ layers, tied lm_head included."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from eqcompiler.passes.lower_int8_weight_gemm import LowerInt8WeightGemmPass
from eqcompiler.lowering.targets import target_steps
from test_cuda_ops import cpu_session as session
from test_cuda_ops import fused_model, lib  # noqa: F401  (lib: the op-library fixture)


def op_model(k: int | str, n: int | str, bias: bool, activation_bits: int = 0) -> onnx.ModelProto:
    model = fused_model(k, n, bias=bias, op_type="Int8WeightGemm")
    if activation_bits:
        model.graph.node[0].attribute.append(helper.make_attribute("activation_bits", activation_bits))
    return model


def int16_reference(a: np.ndarray, b: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """activation_bits=16, as the op states it: rows of A to int16 (absmax/32767, half to even, NaN -> 0), exact
    integer sums per 512-long K block, each added as float32 in block order, then * row scale * B_scale (+ bias)."""
    finite = np.where(np.isnan(a), np.float32(0), np.abs(a))
    s = (finite.max(axis=1, initial=0) / np.float32(32767)).astype(np.float32)
    s[~(s > 0)] = 1
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.rint(a / s[:, None])
    q = np.clip(np.nan_to_num(q, nan=0.0), -32767, 32767).astype(np.int64)
    total = np.zeros((a.shape[0], b.shape[0]), np.float32)
    for k0 in range(0, a.shape[1], 512):
        total += (q[:, k0:k0 + 512] @ b[:, k0:k0 + 512].T.astype(np.int64)).astype(np.float32)
    y = (total * s[:, None]) * scale
    return y + bias if bias is not None else y


def problem(rng: np.random.Generator, m: int, k: int, n: int):
    a = (rng.standard_normal((m, k)) * rng.uniform(0.1, 20)).astype(np.float32)
    b = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    scale = (rng.random(n).astype(np.float32) + 0.5) * np.float32(0.01)
    bias = rng.standard_normal(n).astype(np.float32)
    return a, b, scale, bias


# (M, K, N): decode and prefill orders (M < 16 / >= 16), K and N tails, partial 16-row tiles, empty.
SHAPES = [(1, 576, 1536), (3, 9, 5), (15, 40, 13), (16, 576, 64), (37, 577, 13), (130, 33, 300), (0, 8, 4), (4, 1, 7),
          (20, 0, 5), (2, 0, 3)]


INT16_SHAPES = SHAPES + [(1, 1100, 37), (5, 1025, 9), (70, 1536, 67)]  # K past one and two 512-blocks


def run_all(lib: pathlib.Path, threads: int, activation_bits: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    outs = []
    for m, k, n in (INT16_SHAPES if activation_bits else SHAPES):
        a, b, scale, bias = problem(rng, m, k, n)
        sess = session(op_model(k, n, True, activation_bits), lib, threads)
        (y,) = sess.run(None, {"A": a, "B": b, "B_scale": scale, "bias": bias})
        outs.append(y)
    return outs


@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"M{m}_K{k}_N{n}" for m, k, n in SHAPES])
def test_matches_float64_reference(lib, m, k, n):
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    a, b, scale, bias = problem(rng, m, k, n)
    for with_bias in (False, True):
        feed = {"A": a, "B": b, "B_scale": scale} | ({"bias": bias} if with_bias else {})
        (y,) = session(op_model(k, n, with_bias), lib).run(None, feed)
        ref = (a.astype(np.float64) @ b.T.astype(np.float64)) * scale + (bias if with_bias else 0)
        assert y.shape == (m, n) and y.dtype == np.float32
        # float32 accumulation of K products: a few ulps of the largest term, never more.
        tol = 4 * np.finfo(np.float32).eps * np.sqrt(k) * (np.abs(a) @ np.abs(b.T.astype(np.float64)) * scale + 1)
        assert np.all(np.abs(y - ref) <= tol)


def test_same_bits_for_every_thread_count(lib):
    for one, two in zip(run_all(lib, 1), run_all(lib, 2)):
        np.testing.assert_array_equal(one, two)


def test_same_bits_for_every_cpu_variant(lib, tmp_path):
    """The portable (generic) kernel states the summation order; the vector kernels must follow it."""
    code = ("import numpy as np, pathlib, test_int8_weight_gemm as t; "
            f"np.savez({str(tmp_path / 'out.npz')!r}, *t.run_all(pathlib.Path({str(lib)!r}), 2))")
    for isa in ("generic", "native"):
        env = os.environ | ({"EQC_CPU_ISA": isa} if isa != "native" else {})
        run = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent, capture_output=True,
                             text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        (tmp_path / "out.npz").rename(tmp_path / f"{isa}.npz")
    generic, native = np.load(tmp_path / "generic.npz"), np.load(tmp_path / "native.npz")
    for key in generic.files:
        np.testing.assert_array_equal(generic[key], native[key])


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
def test_int16_activations_are_their_statement_on_every_cpu_variant(lib, isa, tmp_path):
    """activation_bits=16: bit for bit the numpy statement (int16_reference), on every kernel variant and for
    extreme inputs (all weights -128 and codes at +-32767 over a full 512 block, NaN and inf in a row)."""
    code = ("import numpy as np, pathlib, test_int8_weight_gemm as t; "
            f"np.savez({str(tmp_path / 'out.npz')!r}, *t.run_all(pathlib.Path({str(lib)!r}), 2, 16), *t.extremes("
            f"pathlib.Path({str(lib)!r})))")
    env = os.environ | ({"EQC_CPU_ISA": isa} if isa != "native" else {})
    run = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent, capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    rng = np.random.default_rng(5)
    wants = []
    for m, k, n in INT16_SHAPES:
        a, b, scale, bias = problem(rng, m, k, n)
        wants.append(int16_reference(a, b, scale, bias))
    wants += [int16_reference(*case) for case in extreme_cases()]
    assert len(got.files) == len(wants)
    for i, want in enumerate(wants):
        np.testing.assert_array_equal(got[f"arr_{i}"], want)


def extreme_cases() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, None]]:
    k = 1030
    a = np.where(np.random.default_rng(1).random((3, k)) < 0.5, -2.0, 2.0).astype(np.float32)
    a[1, 5], a[2, 9] = np.nan, np.inf
    b = np.full((9, k), -128, np.int8)
    b[1] = 127
    return [(a, b, np.full(9, 1e-3, np.float32), None)]


def extremes(lib: pathlib.Path) -> list[np.ndarray]:
    outs = []
    for a, b, scale, _ in extreme_cases():
        sess = session(op_model(a.shape[1], b.shape[0], False, 16), lib, 2)
        outs.append(sess.run(None, {"A": a, "B": b, "B_scale": scale})[0])
    return outs


def test_int16_activations_are_close_to_float_math(lib):
    rng = np.random.default_rng(8)
    a, b, scale, bias = problem(rng, 4, 576, 300)
    feed = {"A": a, "B": b, "B_scale": scale, "bias": bias}
    (exact,) = session(op_model(576, 300, True), lib).run(None, feed)
    (int16,) = session(op_model(576, 300, True, 16), lib).run(None, feed)
    assert 0 < np.abs(int16 - exact).max() <= 1e-4 * np.abs(exact).max()


def test_unknown_activation_bits_is_a_clear_error(lib):
    with pytest.raises(Exception, match="activation_bits must be 0 .float. or 16, got 8"):
        session(op_model(8, 4, False, 8), lib)


def test_shape_mismatch_names_the_op(lib):
    sess = session(op_model("k", "n", False), lib)
    with pytest.raises(Exception, match="Int8WeightGemm: B is"):
        sess.run(None, {"A": np.zeros((2, 9), np.float32), "B": np.zeros((4, 8), np.int8),
                        "B_scale": np.ones(4, np.float32)})


# ---------------------------------------------------------------------------- lowering
def weight_only_model(rng: np.random.Generator, k: int = 24, n: int = 10, vocab: int = 40) -> onnx.ModelProto:
    """Embedding table tied to an lm_head (Transpose(DQ(table))), a per-channel [K,N] layer with a
    bias, and two layers the pass must leave alone: blocked weights and asymmetric weights."""
    def per_row(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        s = (np.abs(w).max(axis=axis) / 127).astype(np.float32)
        q = np.clip(np.rint(w / np.expand_dims(s, axis)), -127, 127).astype(np.int8)
        return q, s

    table_q, table_s = per_row(rng.standard_normal((vocab, k)).astype(np.float32), 1)
    w1_q, w1_s = per_row(rng.standard_normal((k, k)).astype(np.float32), 0)
    w2_q = rng.integers(-127, 128, (k, n), dtype=np.int8)
    inits = [numpy_helper.from_array(table_q, "table_q"), numpy_helper.from_array(table_s, "table_s"),
             numpy_helper.from_array(w1_q, "w1_q"), numpy_helper.from_array(w1_s, "w1_s"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b1"),
             numpy_helper.from_array(w2_q, "w2_q"), numpy_helper.from_array(np.full((k // 8, n), 0.01, np.float32), "w2_s"),
             numpy_helper.from_array(w1_q, "w3_q"), numpy_helper.from_array(w1_s, "w3_s"),
             numpy_helper.from_array(np.full(k, 3, np.int8), "w3_zp"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = [
        helper.make_node("Gather", ["table_q", "ids"], ["rows_q"], axis=0),
        helper.make_node("Gather", ["table_s", "ids"], ["rows_s0"], axis=0),
        helper.make_node("Unsqueeze", ["rows_s0", "last"], ["rows_s"]),
        helper.make_node("Mul", ["rows_q_f", "rows_s"], ["h0"]),
        helper.make_node("Cast", ["rows_q"], ["rows_q_f"], to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s"], ["w1"], axis=1),
        helper.make_node("MatMul", ["h0", "w1"], ["mm1"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Add", ["mm1", "b1"], ["h1"]),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_s"], ["w2"], axis=0, block_size=8),
        helper.make_node("MatMul", ["h1", "w2"], ["blocked"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("DequantizeLinear", ["w3_q", "w3_s", "w3_zp"], ["w3"], axis=1),
        helper.make_node("MatMul", ["h1", "w3"], ["asym"], name="/model/layers.0/mlp/gate_proj/MatMul"),
        helper.make_node("DequantizeLinear", ["table_q", "table_s"], ["table"], axis=0),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "table_t"], ["logits"], name="/lm_head/MatMul"),
    ]
    nodes.insert(3, nodes.pop(4))  # Cast before Mul (topological order)
    graph = helper.make_graph(nodes, "wo", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["b", "s", d])
                               for o, d in (("logits", vocab), ("blocked", n), ("asym", k))],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("activation_bits", [16, 0])
def test_lowering_takes_tied_and_per_channel_layers_only(lib, activation_bits):
    model = weight_only_model(np.random.default_rng(3))
    ir_model = ir.serde.deserialize_model(model)
    pass_ = LowerInt8WeightGemmPass(activation_bits=activation_bits)
    assert pass_(ir_model).modified
    assert pass_.context.report["lower_int8_weight_gemm"]["lowered"] == 2
    lowered = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(lowered)
    ops = [n.op_type for n in lowered.graph.node]
    assert ops.count("Int8WeightGemm") == 2 and "Transpose" not in ops and "Add" not in ops  # bias folded
    assert ops.count("DequantizeLinear") == 2  # the blocked and the asymmetric layer stay QDQ
    inits = {i.name for i in lowered.graph.initializer}
    assert "table_q" in inits and "w1_q" not in inits  # tied table read in place; [K,N] weight replaced by [N,K]
    gemms = [n for n in lowered.graph.node if n.op_type == "Int8WeightGemm"]
    assert any(n.input[1] == "table_q" for n in gemms)
    assert all([helper.get_attribute_value(x) for x in n.attribute if x.name == "activation_bits"]
               == ([activation_bits] if activation_bits else []) for n in gemms)
    ids = np.random.default_rng(0).integers(0, 40, (2, 7))
    ref = session(model, None).run(None, {"ids": ids})
    got = session(lowered, lib).run(None, {"ids": ids})
    for r, g in zip(ref, got):  # float math: summation order only; int16 rows: about 1/65534 of each row's max
        np.testing.assert_allclose(g, r, rtol=0, atol=(1e-4 if activation_bits else 1e-5) * float(np.abs(r).max()))


def test_gemm_layers_stay_qdq_with_a_warning(lib):
    rng = np.random.default_rng(4)
    wq = rng.integers(-127, 128, (6, 8), dtype=np.int8)  # [N, K], Gemm transB=1
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(6, 0.02, np.float32), "ws")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
             helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="/h.0/mlp/c_fc/Gemm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], initializer=inits)
    ir_model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    pass_ = LowerInt8WeightGemmPass()
    assert not pass_(ir_model).modified
    assert pass_.context.report["lower_int8_weight_gemm"]["skipped"] == {"h.0.mlp.c_fc": "Gemm, not MatMul"}
    assert len(pass_.context.warnings) == 1 and "stay QDQ" in pass_.context.warnings[0]


def test_ort_cpu_target_schedules_it_for_the_lm_head_of_w8a8_recipes():
    """Weight-only int8 layers go to ORT's MatMulNBits (lower_weight_only_int8); Int8WeightGemm takes the int8
    layers a W8A8 recipe leaves with a float input (the lm_head of w8a8-dynamic), as the last integer lowering."""
    weight_only = {"passes": [{"pass": "quantize_weights", "options": {"bits": 8}}]}
    steps = [s["pass"] for s in target_steps("ort-cpu", [], weight_only)]
    assert steps[-2:] == ["lower_weight_only_int8", "pack_parallel_projections"] and "lower_int8_weight_gemm" not in steps
    w8a8 = {"passes": [*weight_only["passes"], {"pass": "quantize_activations_dynamic", "options": {}}]}
    steps = [s["pass"] for s in target_steps("ort-cpu", [], w8a8)]
    assert steps[-2:] == ["lower_int8_weight_gemm", "pack_parallel_projections"], steps
    assert "lower_fused_int8_gemm" in steps and "lower_weight_only_int8" not in steps, steps
    assert "lower_int8_weight_gemm" not in [s["pass"] for s in target_steps("ort-cuda", [], None)]


def test_lowering_refuses_other_activation_bits():
    from eqcompiler.errors import EqcError

    with pytest.raises(EqcError, match="activation_bits must be 0 .float math. or 16, got 8"):
        LowerInt8WeightGemmPass(activation_bits=8)


def test_an_input_out_of_dequantize_linear_keeps_float_math(lib):
    """activation_bits=16 for a float input; none (float math) for an input that is already on an int8 grid
    (a DequantizeLinear output: w8a8-smooth's per-token down_proj inputs, where int16 cost +0.11% ppl)."""
    rng = np.random.default_rng(6)
    k, n = 16, 6
    wq = rng.integers(-127, 128, (k, n), dtype=np.int8)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(n, 0.02, np.float32), "ws"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1),
             helper.make_node("QuantizeLinear", ["x", "xs"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w"], ["y1"], name="/layers.0/mlp/down_proj/MatMul"),
             helper.make_node("MatMul", ["x", "w"], ["y2"], name="/layers.1/mlp/down_proj/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [3, n]) for y in ("y1", "y2")],
                              initializer=inits)
    ir_model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    LowerInt8WeightGemmPass()(ir_model)
    lowered = ir.serde.serialize_model(ir_model)
    bits = {n.output[0]: [helper.get_attribute_value(a) for a in n.attribute if a.name == "activation_bits"]
            for n in lowered.graph.node if n.op_type == "Int8WeightGemm"}
    assert bits == {"y1": [], "y2": [16]}
