"""Decode-size (M rows) timing of eqc's CPU ops against ORT's MatMulNBits, one node per session, interleaved.

    .venv/bin/python tools/bench_decode_ops.py OLD.so NEW.so [--op FusedInt8Gemm|Int8WeightGemm] [--m 1]
        [--activation-bits 0|16]

SmolLM2's shapes (the tied 576x49152 lm_head and each layer's packed or single projections). Each variant gets its
own session (2 intra-op threads, spinning off so an idle session's threads do not steal the cores), and the
variants take turns call by call, so the 28 MB lm_head comes from memory as in a model's decode step rather than
from a warm cache. Asserts the two libraries' outputs are equal (a kernel change must not change the bits), then
prints the median ms per call.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

SHAPES = [(576, 49152), (576, 3072), (1536, 576), (576, 960), (576, 576)]  # (K, N)


def session(node, inits, k: int, n: int, domain: tuple[str, int] | None, lib: str | None) -> ort.InferenceSession:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", 1, ["M", k])],
                              [helper.make_tensor_value_info("Y", 1, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]
                              + ([helper.make_opsetid(*domain)] if domain else []))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lib:
        opts.register_custom_ops_library(lib)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def eqc_op(op: str, k: int, n: int, lib: str, bits: int) -> ort.InferenceSession:
    rng = np.random.default_rng(1)
    b = rng.integers(-127, 128, (n, k), dtype=np.int8)
    scale = np.full(n, 1e-3, np.float32)
    attrs = {"activation_bits": bits} if bits else {}
    node = helper.make_node(op, ["A", "B", "S"], ["Y"], domain="ai.eqc", **attrs)
    return session(node, [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scale, "S")], k, n, ("ai.eqc", 1), lib)


def nbits8(k: int, n: int) -> ort.InferenceSession:
    rng = np.random.default_rng(2)
    block = 64
    blob = rng.integers(0, 256, (n, k // block, block), dtype=np.uint8)
    scale = np.full(n * (k // block), 1e-3, np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=block, accuracy_level=4)
    return session(node, [numpy_helper.from_array(blob, "B"), numpy_helper.from_array(scale, "S")], k, n,
                   ("com.microsoft", 1), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--op", default="FusedInt8Gemm", choices=["FusedInt8Gemm", "Int8WeightGemm"])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--activation-bits", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for k, n in SHAPES:
        variants = {"old": eqc_op(args.op, k, n, args.old, args.activation_bits),
                    "new": eqc_op(args.op, k, n, args.new, args.activation_bits), "MatMulNBits 8-bit L4": nbits8(k, n)}
        a = rng.standard_normal((args.m, k)).astype(np.float32)
        outs = {name: s.run(None, {"A": a})[0] for name, s in variants.items()}
        assert np.array_equal(outs["old"], outs["new"]), f"{k}x{n}: the two libraries' outputs differ"
        times: dict[str, list[float]] = {name: [] for name in variants}
        rounds = (20 if n > 10000 else 200) if args.m == 1 else (3 if n > 10000 else 20)
        for _ in range(rounds):
            for name, s in variants.items():
                for _ in range(5 if args.m == 1 else 1):
                    start = time.perf_counter()
                    s.run(None, {"A": a})
                    times[name].append(time.perf_counter() - start)
        cells = ", ".join(f"{name} {np.median(t) * 1e3:.3f}" for name, t in times.items())
        print(f"{args.op} M={args.m} K={k} N={n}: median ms {cells}", flush=True)


if __name__ == "__main__":
    main()
