"""Which form of a quantized linear layer onnxruntime-web's WASM backend runs fastest (issue 24, --target web).

Builds one small ONNX model per form: 8 linear layers of SmolLM2-135M's MLP shapes (576 -> 1536 -> 576, x4),
the same random weights quantized the same way, and times `session.run` in headless Chromium (forms.html) at a
decode step (1 token) and a 32-token prefill. The forms:

  fp32      float weights (the reference)
  qdq8      int8 per-channel DequantizeLinear -> MatMul (eqc's portable w8 graph)
  qdq4      int4 blocked (32) DequantizeLinear -> MatMul (eqc's portable w4 graph)
  fold8     int8 per-channel weights, Cast -> Mul(scale) -> MatMul: standard ops on constants, which ORT's
            constant folding turns into float weights once at session creation (int8 download, float compute)
  fold4     int4 codes packed two per uint8, unpacked with Div/Mod/Cast/Sub/Mul on constants -> folded likewise
  dyn8      DynamicQuantizeLinear(x) -> MatMulInteger(uint8, int8 per-channel) -> Cast -> Mul (ORT
            quantize_dynamic / transformers.js "q8")
  nbits4    com.microsoft MatMulNBits bits=4 block 32 (transformers.js "q4"), accuracy_level 0 and 4
  nbits8    com.microsoft MatMulNBits bits=8 block 32, accuracy_level 0

    python tools/web/bench_forms.py --out tools/results/web_forms.json [--threads 1] [--reps 30]

Prints a markdown table (ms per run, median) and the max |out - fp32 out| / max|fp32 out| of each form natively.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import serve as web  # noqa: E402

SHAPES = [(576, 1536), (1536, 576)] * 4
BLOCK = 32


def _weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for k, n in SHAPES]


def _q8(w):
    scale = np.abs(w).max(0) / 127
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _q4(w):
    """Asymmetric uint4 per block of 32 along K (as MatMulNBits); codes [K, N], scale/zp [K/32, N]."""
    k, n = w.shape
    b = w.reshape(k // BLOCK, BLOCK, n)
    lo, hi = np.minimum(b.min(1), 0), np.maximum(b.max(1), 0)
    scale = np.maximum((hi - lo) / 15, 1e-8)
    zp = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(b / scale[:, None]) + zp[:, None], 0, 15).astype(np.uint8)
    return q.reshape(k, n), scale.astype(np.float32), zp.astype(np.uint8)


def _layer(form: str, i: int, w: np.ndarray, x: str, nodes: list, inits: list) -> str:
    k, n = w.shape
    p, y = f"l{i}_", f"y{i}"
    init = lambda name, arr: inits.append(numpy_helper.from_array(arr, p + name)) or p + name  # noqa: E731
    node = lambda op, ins, outs, **kw: nodes.append(helper.make_node(op, ins, outs, **kw))  # noqa: E731
    if form == "fp32":
        node("MatMul", [x, init("w", w)], [y])
    elif form in ("qdq8", "fold8", "fold8i", "dyn8"):
        q, s = _q8(w)
        if form == "qdq8":
            node("DequantizeLinear", [init("q", q), init("s", s)], [p + "w"], axis=1)
            node("MatMul", [x, p + "w"], [y])
        elif form == "fold8":
            node("Cast", [init("q", q)], [p + "c"], to=TensorProto.FLOAT)
            node("Mul", [p + "c", init("s", s)], [p + "w"])
            node("MatMul", [x, p + "w"], [y])
        elif form == "fold8i":  # through int32, as fold4
            node("Cast", [init("q", q)], [p + "i"], to=TensorProto.INT32)
            node("Cast", [p + "i"], [p + "c"], to=TensorProto.FLOAT)
            node("Mul", [p + "c", init("s", s)], [p + "w"])
            node("MatMul", [x, p + "w"], [y])
        else:
            node("DynamicQuantizeLinear", [x], [p + "xq", p + "xs", p + "xz"])
            node("MatMulInteger", [p + "xq", init("q", q), p + "xz"], [p + "acc"])
            node("Cast", [p + "acc"], [p + "accf"], to=TensorProto.FLOAT)
            node("Mul", [p + "xs", init("s", s)], [p + "ws"])
            node("Mul", [p + "accf", p + "ws"], [y])
    elif form in ("qdq4", "fold4"):
        q, s, z = _q4(w)
        if form == "qdq4":
            t = helper.make_tensor(p + "q", TensorProto.UINT4, [k, n], q.flatten().tolist())
            zt = helper.make_tensor(p + "z", TensorProto.UINT4, list(z.shape), z.flatten().tolist())
            inits += [t, zt]
            node("DequantizeLinear", [p + "q", init("s", s), p + "z"], [p + "w"], axis=0, block_size=BLOCK)
            node("MatMul", [x, p + "w"], [y])
        else:
            packed = (q[0::2] | (q[1::2] << 4)).astype(np.uint8)  # rows 2j (low nibble), 2j+1 (high) -> [K/2, N]
            node("Cast", [init("packed", packed)], [p + "i"], to=TensorProto.INT32)
            node("Mod", [p + "i", init("sixteen", np.array(16, np.int32))], [p + "lo"])
            node("Div", [p + "i", p + "sixteen"], [p + "hi"])
            node("Unsqueeze", [p + "lo", init("ax", np.array([1], np.int64))], [p + "lo1"])
            node("Unsqueeze", [p + "hi", p + "ax"], [p + "hi1"])
            node("Concat", [p + "lo1", p + "hi1"], [p + "pair"], axis=1)  # [K/2, 2, N]
            node("Reshape", [p + "pair", init("kn", np.array([k // BLOCK, BLOCK, n], np.int64))], [p + "blk"])
            node("Cast", [p + "blk"], [p + "f"], to=TensorProto.FLOAT)
            node("Sub", [p + "f", init("z", z.astype(np.float32)[:, None, :])], [p + "c"])
            node("Mul", [p + "c", init("s", s[:, None, :])], [p + "wb"])
            node("Reshape", [p + "wb", init("kn2", np.array([k, n], np.int64))], [p + "w"])
            node("MatMul", [x, p + "w"], [y])
    elif form.startswith("nbits"):
        bits, level = (4, int(form[-1])) if form.startswith("nbits4") else (8, 0)
        if bits == 4:
            q, s, z = _q4(w)
        else:
            b = w.reshape(k // BLOCK, BLOCK, n)
            s = (np.abs(b).max(1) / 127).astype(np.float32)
            q = (np.clip(np.round(b / s[:, None]), -127, 127) + 128).astype(np.uint8).reshape(k, n)
            z = np.full(s.shape, 128, np.uint8)
        qt = q.T.reshape(n, k // BLOCK, BLOCK)  # [N, blocks, block]
        if bits == 4:
            blob = (qt[..., 0::2] | (qt[..., 1::2] << 4)).astype(np.uint8)
            zt = z.T  # [N, blocks]
            zp = ((zt[:, 0::2] | (np.pad(zt, ((0, 0), (0, zt.shape[1] % 2)))[:, 1::2] << 4))).astype(np.uint8)
        else:
            blob, zp = qt.astype(np.uint8), z.T.astype(np.uint8)
        node("MatMulNBits", [x, init("b", blob), init("s", np.ascontiguousarray(s.T).reshape(-1)),
                              init("z", np.ascontiguousarray(zp).reshape(-1))], [y], domain="com.microsoft",
             K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=level)
    else:
        raise ValueError(form)
    return y


FORMS = ["fp32", "qdq8", "fold8", "fold8i", "dyn8", "nbits8", "qdq4", "fold4", "nbits4_0", "nbits4_4"]


def build(form: str, path: pathlib.Path) -> None:
    nodes, inits, x = [], [], "x"
    for i, w in enumerate(_weights()):
        x = _layer(form, i, w, x, nodes, inits)
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 576])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "s", 576])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save(model, str(path))


def native_error(path: pathlib.Path, ref: np.ndarray | None, x: np.ndarray) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    out = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return out, 0.0 if ref is None else float(np.abs(out - ref).max() / np.abs(ref).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--forms", nargs="+", default=FORMS)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="eqc-forms-"))
    x = np.random.default_rng(1).standard_normal((1, 32, 576)).astype(np.float32)
    errors, ref = {}, None
    for form in args.forms:
        build(form, root / f"{form}.onnx")
        out, errors[form] = native_error(root / f"{form}.onnx", ref, x)
        ref = out if form == "fp32" else ref
    server, base = web.serve({"forms": root})
    url = f"{base}forms.html?forms={','.join(args.forms)}&threads={args.threads}&reps={args.reps}"
    result = web.run_page(url, timeout_s=900)
    server.shutdown()
    rows = ["| form | file MB | decode ms (1 token) | prefill ms (32 tokens) | load ms | native rel. error vs fp32 |",
            "|---|---|---|---|---|---|"]
    for form in args.forms:
        r = result["forms"][form]
        size = (root / f"{form}.onnx").stat().st_size / 1e6
        rows.append(f"| {form} | {size:.1f} | {r['decode_ms']:.2f} | {r['prefill_ms']:.1f} | {r['load_ms']:.0f} | "
                    f"{errors[form]:.2e} |")
    print("\n".join(rows))
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "reps": args.reps, "browser": result,
                                        "native_rel_error": errors}, indent=2) + "\n")


if __name__ == "__main__":
    main()
