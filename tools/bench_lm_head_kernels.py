"""Which ONNX Runtime CPU kernel should run SmolLM2's tied lm_head at decode: one token, [1, 576] x [576, 49152].

The w4-gptq ort-cpu artifact keeps the tied embedding/lm_head int8 per row and runs it with eqc's Int8WeightGemm;
in its decode step that is 22% of the time (docs/benchmarks.md). This measures the candidates on random weights
of that shape, each alone in a session: Int8WeightGemm (eqc's op library), MatMulNBits 8-bit and 4-bit at accuracy
levels 0 and 4, and the float MatMul.

Usage: .venv/bin/python tools/bench_lm_head_kernels.py [--threads 2] [--runs 200]
Writes tools/results/lm_head_kernels.json and .md. A benchmark, not a test: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N = 576, 49152


def _model(node: helper.NodeProto, initializers: list, domains: dict[str, int]) -> bytes:
    graph = helper.make_graph([node], "lm_head", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])], initializer=initializers)
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, v) for d, v in domains.items()]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def matmul_nbits(bits: int, block: int, level: int, rng: np.random.Generator) -> bytes:
    blocks = K // block
    codes = rng.integers(0, 2 ** bits, (N, blocks, block)).astype(np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes
    scales = (rng.random(N * blocks) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=level)
    return _model(node, [numpy_helper.from_array(packed.reshape(N, blocks, block * bits // 8).astype(np.uint8), "B"),
                         numpy_helper.from_array(scales, "S")], {"com.microsoft": 1})


def int8_weight_gemm(rng: np.random.Generator) -> bytes:
    weight = rng.integers(-127, 128, (N, K)).astype(np.int8)  # [N, K]: the tied table as the op reads it
    scale = (rng.random(N) * 0.01).astype(np.float32)
    node = helper.make_node("Int8WeightGemm", ["A", "B", "S"], ["Y"], domain="ai.eqc")
    return _model(node, [numpy_helper.from_array(weight, "B"), numpy_helper.from_array(scale, "S")], {"ai.eqc": 1})


def float_matmul(rng: np.random.Generator) -> bytes:
    weight = rng.standard_normal((K, N)).astype(np.float32)
    return _model(helper.make_node("MatMul", ["A", "B"], ["Y"]), [numpy_helper.from_array(weight, "B")], {})


def time_ms(model: bytes, threads: int, runs: int, library: str | None = None) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {"A": np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)}
    for _ in range(20):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return (time.perf_counter() - start) / runs * 1e3


def main() -> None:
    from eqcompiler.runtime.custom_ops import find_library

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out-prefix", default="tools/results/lm_head_kernels")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = [("float MatMul (fp32 weight, 113 MB)", time_ms(float_matmul(rng), args.threads, args.runs)),
            ("eqc Int8WeightGemm (int8 per row, 28 MB)",
             time_ms(int8_weight_gemm(rng), args.threads, args.runs, str(find_library())))]
    for bits, block, level in ((8, 64, 0), (8, 64, 4), (8, 32, 4), (4, 64, 4), (4, 32, 4)):
        name = f"MatMulNBits {bits}-bit block {block} accuracy level {level}"
        rows.append((name, time_ms(matmul_nbits(bits, block, level, rng), args.threads, args.runs)))
    result = {"shape": [1, K, N], "threads": args.threads, "runs": args.runs, "ort": ort.__version__,
              "ms": {name: round(ms, 3) for name, ms in rows}}
    out = pathlib.Path(args.out_prefix)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# lm_head kernels at decode (SmolLM2 shape)", "",
             f"`.venv/bin/python tools/bench_lm_head_kernels.py --threads {args.threads} --runs {args.runs}`, "
             f"ORT {ort.__version__}, x [1, {K}] times a [{K}, {N}] weight, mean of {args.runs} runs.", "",
             "| kernel | ms per call |", "|---|---:|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
