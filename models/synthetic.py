"""Transformer-shaped ONNX graphs with random weights, built directly with onnx-ir (no PyTorch).

Two uses:
- fuzzing: many small graphs with varied dims, norms, activations, tied weights, Gemm vs MatMul and
  static or dynamic shapes, to run every recipe over (tools/fuzz_recipes.py, tests/test_fuzz_recipes.py);
- scale: a LLaMA-shaped 3B model whose weights are written to model.onnx.data one layer at a time
  and referenced as external tensors, so building it never holds more than one layer in memory
  (tools/bench_scale_3b.py). This is how the 3B benchmark model is made: no HF checkpoint exists
  offline and instantiating one in PyTorch would need 12 GB of RAM.

The graphs follow the export conventions (eqcompiler/export/hf.py): inputs input_ids, attention_mask,
position_ids, past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]; outputs logits and
present.{i}.key/value; linear weights named `<layer>.weight_t` ([K, N], MatMul layout) or
`<layer>.weight` ([N, K], Gemm transB=1); node names `/model/model/layers.{i}/mlp/up_proj/MatMul` so
reports name layers as an exported model does. Written folders are complete eqc artifacts
(manifest + word-level tokenizer), so `eqc calibrate/compile/eval` take them as they are.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

OPSET = 21
ALIGN = 4096  # external-data offsets page-aligned so ONNX Runtime can memory-map them


@dataclasses.dataclass
class SynthSpec:
    """Shape and flavour of a synthetic decoder."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 512
    norm: str = "rms"  # "rms" (decomposed RMSNorm) or "layer" (LayerNormalization)
    act: str = "silu"  # "silu" (gated MLP), "gelu" or "relu" (plain MLP)
    tied: bool = False  # lm_head reads the embedding table through Transpose
    linear: str = "matmul"  # "matmul" ([K,N] weights) or "gemm" (Gemm transB=1 on 2-D reshaped input)
    dynamic: bool = True  # symbolic batch/sequence dims; False: static [1, seq_len]
    seq_len: int = 16  # only for dynamic=False
    kv_cache: bool = True
    bias: bool = False  # linear layers with a bias Add
    weight_std: float = 0.05
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        kv = self.kv_heads * self.head_dim
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        mlp = (3 if self.act == "silu" else 2) * self.hidden * self.intermediate
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * (attn + mlp + 2 * self.hidden) + self.vocab * self.hidden + head + self.hidden


class WeightWriter:
    """Makes initializer tensors: in memory, or appended to an external-data file and referenced lazily."""

    def __init__(self, data_path: pathlib.Path | None = None) -> None:
        self.data_path = data_path
        self._fh = open(data_path, "wb") if data_path is not None else None
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> ir.TensorProtocol:
        array = np.asarray(array, order="C")  # (ascontiguousarray would turn a scalar into shape [1])
        if self._fh is None or array.nbytes < 1024:
            return ir.tensor(array, name=name)
        pad = (-self.offset) % ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self.offset += pad
        self._fh.write(array.tobytes())
        tensor = ir.ExternalTensor(self.data_path.name, offset=self.offset, length=array.nbytes,
                                   dtype=ir.DataType.from_numpy(array.dtype), shape=ir.Shape(array.shape),
                                   name=name, base_dir=str(self.data_path.parent))
        self.offset += array.nbytes
        return tensor

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class _Builder:
    def __init__(self, spec: SynthSpec, writer: WeightWriter) -> None:
        self.spec = spec
        self.writer = writer
        self.rng = np.random.default_rng(spec.seed)
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": OPSET}, name="synthetic")
        self._consts: dict[tuple, ir.Value] = {}
        self._n = 0

    # -- helpers -------------------------------------------------------------------------------
    def init(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=self.writer.tensor(name, array))
        self.graph.register_initializer(value)
        return value

    def const(self, values: Any, dtype: Any = np.int64) -> ir.Value:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None,
           name: str | None = None, outputs: int = 1) -> Any:
        self._n += 1
        node = ir.node(op_type, inputs, attrs or {}, num_outputs=outputs, name=name or f"/{op_type}_{self._n}")
        self.graph.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def random(self, shape: tuple[int, ...], std: float | None = None) -> np.ndarray:
        out = self.rng.standard_normal(shape, dtype=np.float32)
        out *= std if std is not None else self.spec.weight_std
        return out

    def linear(self, x: ir.Value, prefix: str, k: int, n: int, tied_table: ir.Value | None = None) -> ir.Value:
        """x [..., K] @ W -> [..., N], as MatMul on a [K,N] weight or Gemm(transB=1) on a [N,K] weight."""
        spec = self.spec
        if tied_table is not None:
            wt = self.op("Transpose", [tied_table], {"perm": [1, 0]}, name=f"/model/{prefix}/tied_weight_transpose")
            y = self.op("MatMul", [x, wt], name=f"/model/{prefix}/MatMul")
        elif spec.linear == "gemm":
            w = self.init(f"{prefix}.weight", self.random((n, k)))
            flat = self.op("Reshape", [x, self.const([-1, k])], name=f"/model/{prefix}/flatten")
            bias = [self.init(f"{prefix}.bias", self.random((n,), 0.01))] if spec.bias else []
            y2 = self.op("Gemm", [flat, w, *bias], {"transB": 1}, name=f"/model/{prefix}/Gemm")
            shape = self.op("Shape", [x], {"end": -1}, name=f"/model/{prefix}/lead_shape")
            full = self.op("Concat", [shape, self.const([n])], {"axis": 0}, name=f"/model/{prefix}/out_shape")
            return self.op("Reshape", [y2, full], name=f"/model/{prefix}/unflatten")
        else:
            w = self.init(f"{prefix}.weight_t", self.random((k, n)))
            y = self.op("MatMul", [x, w], name=f"/model/{prefix}/MatMul")
        if spec.bias:
            y = self.op("Add", [y, self.init(f"{prefix}.bias", self.random((n,), 0.01))], name=f"/model/{prefix}/Add")
        return y

    def norm(self, x: ir.Value, prefix: str) -> ir.Value:
        h = self.spec.hidden
        weight = self.init(f"{prefix}.weight", (1.0 + self.random((h,), 0.1)).astype(np.float32))
        if self.spec.norm == "layer":
            bias = self.init(f"{prefix}.bias", self.random((h,), 0.02))
            return self.op("LayerNormalization", [x, weight, bias], {"axis": -1, "epsilon": 1e-5},
                           name=f"/model/{prefix}/LayerNormalization")
        sq = self.op("Mul", [x, x], name=f"/model/{prefix}/square")
        mean = self.op("ReduceMean", [sq, self.const([-1])], {"keepdims": 1}, name=f"/model/{prefix}/ReduceMean")
        eps = self.op("Add", [mean, self.const(1e-5, np.float32)], name=f"/model/{prefix}/eps")
        rms = self.op("Sqrt", [eps], name=f"/model/{prefix}/Sqrt")
        normed = self.op("Div", [x, rms], name=f"/model/{prefix}/Div")
        return self.op("Mul", [normed, weight], name=f"/model/{prefix}/scale")

    def activation(self, x: ir.Value, prefix: str) -> ir.Value:
        act = self.spec.act
        if act == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x], name=f"/model/{prefix}/Sigmoid")], name=f"/model/{prefix}/silu")
        if act == "gelu":
            return self.op("Gelu", [x], name=f"/model/{prefix}/Gelu")
        return self.op("Relu", [x], name=f"/model/{prefix}/Relu")

    # -- blocks --------------------------------------------------------------------------------
    def rope(self, positions: ir.Value) -> tuple[ir.Value, ir.Value]:
        d = self.spec.head_dim
        inv = (1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)
        pos = self.op("Cast", [positions], {"to": ir.DataType.FLOAT}, name="/model/rope/cast")
        pos = self.op("Unsqueeze", [pos, self.const([-1])], name="/model/rope/unsqueeze")
        freqs = self.op("Mul", [pos, self.const(inv, np.float32)], name="/model/rope/freqs")
        emb = self.op("Concat", [freqs, freqs], {"axis": -1}, name="/model/rope/emb")
        emb = self.op("Unsqueeze", [emb, self.const([1])], name="/model/rope/heads")  # [B,1,S,D]
        return self.op("Cos", [emb], name="/model/rope/cos"), self.op("Sin", [emb], name="/model/rope/sin")

    def apply_rope(self, x: ir.Value, cos: ir.Value, sin: ir.Value, prefix: str) -> ir.Value:
        half = self.spec.head_dim // 2
        x1, x2 = self.op("Split", [x, self.const([half, half])], {"axis": -1}, outputs=2, name=f"/model/{prefix}/split")
        neg = self.op("Neg", [x2], name=f"/model/{prefix}/neg")
        rot = self.op("Concat", [neg, x1], {"axis": -1}, name=f"/model/{prefix}/rotate")
        a = self.op("Mul", [x, cos], name=f"/model/{prefix}/mul_cos")
        b = self.op("Mul", [rot, sin], name=f"/model/{prefix}/mul_sin")
        return self.op("Add", [a, b], name=f"/model/{prefix}/add")

    def heads(self, x: ir.Value, n: int, prefix: str) -> ir.Value:
        d = self.spec.head_dim
        r = self.op("Reshape", [x, self.const([0, 0, n, d])], name=f"/model/{prefix}/split_heads")
        return self.op("Transpose", [r], {"perm": [0, 2, 1, 3]}, name=f"/model/{prefix}/heads_first")

    def attention(self, x: ir.Value, i: int, cos: ir.Value, sin: ir.Value, bias: ir.Value) -> tuple[ir.Value, list[ir.Value]]:
        spec = self.spec
        p = f"model.layers.{i}.self_attn"
        lp = f"model/layers.{i}/self_attn"
        kv_dim = spec.kv_heads * spec.head_dim
        q = self.heads(self.linear(x, f"{lp}/q_proj", spec.hidden, spec.hidden), spec.heads, f"{lp}/q")
        k = self.heads(self.linear(x, f"{lp}/k_proj", spec.hidden, kv_dim), spec.kv_heads, f"{lp}/k")
        v = self.heads(self.linear(x, f"{lp}/v_proj", spec.hidden, kv_dim), spec.kv_heads, f"{lp}/v")
        q = self.apply_rope(q, cos, sin, f"{lp}/q_rope")
        k = self.apply_rope(k, cos, sin, f"{lp}/k_rope")
        presents: list[ir.Value] = []
        if spec.kv_cache:
            past_k, past_v = self.past[i]
            k = self.op("Concat", [past_k, k], {"axis": 2}, name=f"/model/{lp}/cat_k")
            v = self.op("Concat", [past_v, v], {"axis": 2}, name=f"/model/{lp}/cat_v")
            k.name, v.name = f"present.{i}.key", f"present.{i}.value"
            presents = [k, v]
        rep = spec.heads // spec.kv_heads
        if rep > 1:
            k = self._repeat_kv(k, rep, f"{lp}/k")
            v = self._repeat_kv(v, rep, f"{lp}/v")
        kt = self.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, name=f"/model/{lp}/k_t")
        scores = self.op("MatMul", [q, kt], name=f"/model/{lp}/scores")
        scores = self.op("Mul", [scores, self.const(1.0 / np.sqrt(spec.head_dim), np.float32)], name=f"/model/{lp}/scale")
        scores = self.op("Add", [scores, bias], name=f"/model/{lp}/mask")
        probs = self.op("Softmax", [scores], {"axis": -1}, name=f"/model/{lp}/Softmax")
        ctx = self.op("MatMul", [probs, v], name=f"/model/{lp}/context")
        ctx = self.op("Transpose", [ctx], {"perm": [0, 2, 1, 3]}, name=f"/model/{lp}/seq_first")
        ctx = self.op("Reshape", [ctx, self.const([0, 0, spec.hidden])], name=f"/model/{lp}/merge_heads")
        del p
        return self.linear(ctx, f"{lp}/o_proj", spec.hidden, spec.hidden), presents

    def _repeat_kv(self, x: ir.Value, rep: int, prefix: str) -> ir.Value:
        spec = self.spec
        u = self.op("Unsqueeze", [x, self.const([2])], name=f"/model/{prefix}/rep_unsqueeze")
        shape = self.op("Shape", [u], name=f"/model/{prefix}/rep_shape")
        target = self.op("Mul", [shape, self.const([1, 1, rep, 1, 1])], name=f"/model/{prefix}/rep_target")
        e = self.op("Expand", [u, target], name=f"/model/{prefix}/rep_expand")
        return self.op("Reshape", [e, self.const([0, spec.heads, -1, spec.head_dim])], name=f"/model/{prefix}/rep_merge")

    def mlp(self, x: ir.Value, i: int) -> ir.Value:
        spec = self.spec
        lp = f"model/layers.{i}/mlp"
        if spec.act == "silu":
            gate = self.activation(self.linear(x, f"{lp}/gate_proj", spec.hidden, spec.intermediate), f"{lp}/act")
            up = self.linear(x, f"{lp}/up_proj", spec.hidden, spec.intermediate)
            h = self.op("Mul", [gate, up], name=f"/model/{lp}/gated")
        else:
            h = self.activation(self.linear(x, f"{lp}/up_proj", spec.hidden, spec.intermediate), f"{lp}/act")
        return self.linear(h, f"{lp}/down_proj", spec.intermediate, spec.hidden)

    def mask_bias(self, positions: ir.Value, attention_mask: ir.Value) -> ir.Value:
        """[B,1,S,T] additive bias: key t visible to query s when t <= position(s) and mask[t] == 1."""
        t = self.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="/model/mask/total")
        t = self.op("Squeeze", [t, self.const([0])], name="/model/mask/total_scalar")
        keys = self.op("Range", [self.const(0), t, self.const(1)], name="/model/mask/keys")  # [T]
        qpos = self.op("Unsqueeze", [positions, self.const([-1])], name="/model/mask/qpos")  # [B,S,1]
        causal = self.op("LessOrEqual", [keys, qpos], name="/model/mask/causal")  # [B,S,T]
        am = self.op("Cast", [attention_mask], {"to": ir.DataType.BOOL}, name="/model/mask/am")
        am = self.op("Unsqueeze", [am, self.const([1])], name="/model/mask/am_rows")  # [B,1,T]
        allowed = self.op("And", [causal, am], name="/model/mask/allowed")
        bias = self.op("Where", [allowed, self.const(0.0, np.float32), self.const(-1e9, np.float32)], name="/model/mask/bias")
        return self.op("Unsqueeze", [bias, self.const([1])], name="/model/mask/heads")

    def build(self) -> ir.Model:
        spec = self.spec
        batch: Any = "batch" if spec.dynamic else 1
        seq: Any = "sequence" if spec.dynamic else spec.seq_len
        total: Any = "total_sequence" if spec.dynamic else spec.seq_len
        i64 = ir.TensorType(ir.DataType.INT64)
        f32 = ir.TensorType(ir.DataType.FLOAT)
        ids = ir.Value(name="input_ids", shape=ir.Shape([batch, seq]), type=i64)
        mask = ir.Value(name="attention_mask", shape=ir.Shape([batch, total]), type=i64)
        positions = ir.Value(name="position_ids", shape=ir.Shape([batch, seq]), type=i64)
        self.graph.inputs.extend([ids, mask, positions])
        self.past: list[tuple[ir.Value, ir.Value]] = []
        if spec.kv_cache:
            past_len: Any = "past_sequence" if spec.dynamic else 0
            for i in range(spec.layers):
                pair = tuple(ir.Value(name=f"past_key_values.{i}.{kind}", type=f32,
                                      shape=ir.Shape([batch, spec.kv_heads, past_len, spec.head_dim]))
                             for kind in ("key", "value"))
                self.past.append(pair)  # type: ignore[arg-type]
                self.graph.inputs.extend(pair)
        table = self.init("model.embed_tokens.weight", self.random((spec.vocab, spec.hidden), 0.5))
        x = self.op("Gather", [table, ids], {"axis": 0}, name="/model/model/embed_tokens/Gather")
        cos, sin = self.rope(positions)
        bias = self.mask_bias(positions, mask)
        presents: list[ir.Value] = []
        for i in range(spec.layers):
            h = self.norm(x, f"model/layers.{i}/input_layernorm")
            a, pres = self.attention(h, i, cos, sin, bias)
            presents += pres
            x = self.op("Add", [x, a], name=f"/model/model/layers.{i}/attn_residual")
            h = self.norm(x, f"model/layers.{i}/post_attention_layernorm")
            x = self.op("Add", [x, self.mlp(h, i)], name=f"/model/model/layers.{i}/mlp_residual")
            self.layer_done(i)
        x = self.norm(x, "model/norm")
        logits = self.linear(x, "lm_head", spec.hidden, spec.vocab, tied_table=table if spec.tied else None)
        logits.name = "logits"
        logits.type, logits.shape = f32, ir.Shape([batch, seq, spec.vocab])
        for value in presents:
            value.type, value.shape = f32, ir.Shape([batch, spec.kv_heads, total, spec.head_dim])
        self.graph.outputs.extend([logits, *presents])
        return ir.Model(self.graph, ir_version=10, producer_name="eqc-synthetic")

    def layer_done(self, i: int) -> None:
        """Hook between layers (the external writer has already flushed each weight)."""


def build_model(spec: SynthSpec, writer: WeightWriter | None = None) -> ir.Model:
    """The synthetic decoder as an onnx-ir model (weights in memory unless `writer` writes them out)."""
    return _Builder(spec, writer or WeightWriter()).build()


def save_artifact(spec: SynthSpec, folder: str | os.PathLike, text: str | None = None, external: bool = True) -> pathlib.Path:
    """Write a complete eqc artifact folder (model.onnx + model.onnx.data + manifest + tokenizer).

    With `external`, each weight is appended to model.onnx.data as soon as it is drawn and the graph
    only references it, so peak memory is one weight matrix whatever the model size.
    """
    from eqcompiler.artifact import folder as art_mod

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = WeightWriter(folder / art_mod.DATA_FILE if external else None)
    try:
        model = build_model(spec, writer)
    finally:
        writer.close()
    if external:
        proto = ir.serde.serialize_model(model)  # external tensors stay references: nothing is read
        onnx.save(proto, str(folder / art_mod.MODEL_FILE))
    else:
        art_mod.save_ir(model, folder)
    tok = None
    if text is not None:
        from eqcompiler.models.tiny import build_tokenizer

        tok = build_tokenizer(text, spec.vocab)
        tok.save_pretrained(folder)
    manifest: dict[str, Any] = {
        "task": "causal-lm", "family": "synthetic-llama", "opset": OPSET, "quantization": None,
        "source": {"source": "eqcompiler.models.synthetic", "spec": dataclasses.asdict(spec)},
        "tokenizer": {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                      "pad_token_id": tok.pad_token_id} if tok is not None else None,
    }
    if spec.kv_cache:
        manifest["kv_cache"] = {"num_layers": spec.layers, "num_kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
                                "layout": ["batch", "num_kv_heads", "sequence", "head_dim"],
                                "past_input": "past_key_values.{layer}.{key|value}",
                                "present_output": "present.{layer}.{key|value}", "dtype": "float32", "quantized": None}
    art_mod.write_manifest(folder, manifest)
    return folder


def random_spec(rng: np.random.Generator, seed: int) -> SynthSpec:
    """A random small spec for fuzzing (dims kept small so hundreds of cases run in minutes)."""
    head_dim = int(rng.choice([8, 16, 32]))
    heads = int(rng.choice([1, 2, 4]))
    kv_heads = int(rng.choice([h for h in (1, 2, 4) if heads % h == 0]))
    act = str(rng.choice(["silu", "gelu", "relu"]))
    return SynthSpec(hidden=head_dim * heads, layers=int(rng.integers(1, 4)), heads=heads, kv_heads=kv_heads,
                     intermediate=int(rng.choice([16, 48, 64, 96, 160])), vocab=int(rng.choice([64, 100, 256])),
                     norm=str(rng.choice(["rms", "layer"])), act=act, tied=bool(rng.random() < 0.4),
                     linear=str(rng.choice(["matmul", "gemm"])), dynamic=bool(rng.random() < 0.7),
                     seq_len=int(rng.choice([8, 16, 32])), kv_cache=bool(rng.random() < 0.7),
                     bias=bool(rng.random() < 0.3), weight_std=float(rng.choice([0.02, 0.05, 0.2])), seed=seed)
