"""What took all-MiniLM-L6-v2's w8a8-smooth from 0.9981 to >= 0.999 mean cosine, each on a small case:
encoder calibration windows framed like real inputs ([CLS] ... [SEP]), tiny embedding tables left
float, include/exclude reaching embedding tables, and per-token quantization around each token's
centre for one-sided inputs (GELU outputs)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from eqcompiler.artifact import folder as am
from eqcompiler.calibration.calibrate import calibrate
from eqcompiler.data import calibration_ids, framed_windows, load_tokenizer, special_frame, windows
from eqcompiler.errors import EqcError
from eqcompiler.analysis.inspect_model import inspect
from eqcompiler.calibration.observers import observe_activation
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.passes.quantize_activations import QuantizeActivationsOptions, QuantizeActivationsPass
from eqcompiler.passes.quantize_activations_dynamic import QuantizeActivationsDynamicPass
from eqcompiler.compile.pipeline import compile_model
from eqcompiler.compile.recipes import load_recipe
from eqcompiler.runtime.session import make_session
from eqcompiler.calibration.stats import CalibrationStats, TensorStats

from conftest import WIKI_VALID


# --- calibration windows -------------------------------------------------------------------------

def test_framed_windows_put_the_frame_around_every_window():
    ids = np.arange(100, 120, dtype=np.int64)
    framed = framed_windows(ids, 6, [1], [2])
    wins = [w[0].tolist() for w in windows(framed, 6)]
    assert wins == [[1, 100, 101, 102, 103, 2], [1, 104, 105, 106, 107, 2], [1, 108, 109, 110, 111, 2],
                    [1, 112, 113, 114, 115, 2], [1, 116, 117, 118, 119, 2]]
    with pytest.raises(EqcError, match="leaves no room for text"):
        framed_windows(ids, 2, [1], [2])


def test_special_frame_of_encoder_and_causal_tokenizers(tiny_hf):
    bert, llama = load_tokenizer(tiny_hf("bert")), load_tokenizer(tiny_hf("llama"))
    assert special_frame(bert) == ([bert.cls_token_id], [bert.sep_token_id])
    # A causal LM's windows are raw text, whatever its tokenizer would add.
    ids, frame = calibration_ids(llama, WIKI_VALID.read_text()[:20000], 16, 3, causal=True)
    assert frame == ([], []) and len(ids) >= 48


def test_encoder_calibration_sees_cls_and_sep(tiny_artifact, tmp_path):
    src = tiny_artifact("bert")
    tok = load_tokenizer(am.resolve_artifact(src).folder)
    out = tmp_path / "bert.npz"
    calibrate(src, WIKI_VALID, samples=3, seq_len=16, out=out, observers="minmax,absmax_channel")
    header = json.loads(bytes(np.load(out)["header"]).decode())
    assert header["data"]["special_tokens"] == [[tok.cls_token_id], [tok.sep_token_id]]
    ids, _ = calibration_ids(tok, WIKI_VALID.read_text(), 16, 3, causal=False)
    for w in windows(ids, 16, 3):
        assert w[0, 0] == tok.cls_token_id and w[0, -1] == tok.sep_token_id
        assert tok.cls_token_id not in w[0, 1:-1] and tok.sep_token_id not in w[0, 1:-1]


# --- embedding tables ----------------------------------------------------------------------------

def _table_dtypes(folder) -> dict[str, int]:
    """Gathered table name -> element type of the initializer each embedding Gather reads."""
    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {n.name: inits[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
            and not n.name.endswith(("/row_scale", "/row_zero_point"))}


def _weights_recipe(tmp_path, name: str, **options) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "description": "test", "requires_calibration": False, "passes": [
        {"pass": "quantize_weights", "options": {"bits": 8, "symmetric": True, "block_size": 0, **options}}]}))
    return str(path)


def test_small_tables_stay_float_and_filters_reach_tables(tiny_artifact, tmp_path):
    src = tiny_artifact("bert")  # word table 512 rows, positions 128, token types 2
    manifest = compile_model(src, _weights_recipe(tmp_path, "default"), tmp_path / "a", calib=None)
    report = manifest["quantization"]["report"]["quantize_weights"]
    assert [t.split(" ")[0] for t in report["float_tables"]] == ["embeddings.token_type_embeddings"]
    assert "embeddings.word_embeddings" in report["layers"] and "embeddings.position_embeddings" in report["layers"]
    dtypes = _table_dtypes(tmp_path / "a")
    assert sorted(dtypes.values()) == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.INT8], dtypes
    # embedding_min_rows 0 quantizes every table; exclude keeps the word table float.
    manifest = compile_model(src, _weights_recipe(tmp_path, "all", embedding_min_rows=0), tmp_path / "b", calib=None)
    assert manifest["quantization"]["report"]["quantize_weights"]["float_tables"] == []
    assert onnx.TensorProto.FLOAT not in _table_dtypes(tmp_path / "b").values()
    manifest = compile_model(src, _weights_recipe(tmp_path, "noword", exclude="word_embeddings"), tmp_path / "c",
                             calib=None)
    layers = manifest["quantization"]["report"]["quantize_weights"]["layers"]
    assert "embeddings.word_embeddings" not in layers and "embeddings.position_embeddings" in layers
    assert "encoder.layer.0.attention.self.query" in layers
    with pytest.raises(EqcError, match="embedding_min_rows"):
        compile_model(src, _weights_recipe(tmp_path, "bad", embedding_min_rows=-1), tmp_path / "d", calib=None)


# --- per-token around each token's centre --------------------------------------------------------

def _linear(k: int = 32, n: int = 8, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([2, 5, k]), type=ir.TensorType(ir.DataType.FLOAT))
    wv = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w, name="w"))
    mm = ir.node("MatMul", [x, wv], name="/layer/output/dense/MatMul")
    mm.outputs[0].name, mm.outputs[0].dtype, mm.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([2, 5, n])
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[wv], opset_imports={"": 21}, name="linear")
    return ir.Model(graph, ir_version=10), w


def _gelu_like(seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(2, 5, 32)).astype(np.float32) * 2
    return (x * 0.5 * (1 + np.tanh(0.8 * x))).astype(np.float32)  # one-sided: min about -0.17 x scale


def _centred_reference(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    hi, lo = x.max(axis=-1, keepdims=True), x.min(axis=-1, keepdims=True)
    c = (hi + lo) * np.float32(0.5)
    s = np.maximum((hi - lo) / np.float32(254.0), np.float32(eps))
    return (np.clip(np.rint((x - c) / s), -128, 127) * s + c).astype(np.float32)


def _run(model: ir.Model, x: np.ndarray, qdq_numerics: bool = False) -> np.ndarray:
    """ORT with its default optimizations, or (qdq_numerics) with its QDQ fusions off."""
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    if not qdq_numerics:
        return make_session(proto.SerializeToString()).run(None, {"x": x})[0]
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_centred_per_token_matches_reference_and_halves_the_error():
    x = _gelu_like()
    x[1, 3] = 0.0  # an all-zero (padding) row stays exact
    centred, w = _linear()
    QuantizeActivationsDynamicPass(CompileContext(), symmetric=False)(centred)
    assert [n.op_type for n in centred.graph].count("ReduceMin") == 1
    # ORT's default optimizer must leave the chain runnable (a per-token zero point would be fused into
    # MatMulIntegerToFloat and rejected at run time) and keep the QDQ numerics.
    got, got_qdq = _run(centred, x), _run(centred, x, qdq_numerics=True)
    np.testing.assert_allclose(got, got_qdq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _centred_reference(x) @ w, rtol=1e-4, atol=1e-4)
    assert not got[1, 3].any()
    around_zero, _ = _linear()
    QuantizeActivationsDynamicPass(CompileContext())(around_zero)
    ref = x @ w
    err_centred = np.abs(got - ref).mean()
    err_zero = np.abs(_run(around_zero, x) - ref).mean()
    assert err_centred < 0.65 * err_zero, (err_centred, err_zero)


def _stats_for(x: np.ndarray) -> CalibrationStats:
    t = TensorStats()
    observe_activation(t, x, ("minmax", "absmax_channel", "abssum"))
    return CalibrationStats(meta={}, tensors={"x": t})


@pytest.mark.parametrize("target, one_sided, centred", [
    ("portable", True, True), ("portable", False, False), ("tensorrt", True, False), ("ort-cpu", True, False)])
def test_auto_centres_one_sided_inputs_for_portable_only(target, one_sided, centred):
    x = _gelu_like() if one_sided else np.random.default_rng(2).normal(size=(2, 5, 32)).astype(np.float32)
    model, _ = _linear()
    context = CompileContext(stats=_stats_for(x), target=target)
    QuantizeActivationsPass(context, dynamic_above=1e-9, dynamic_symmetric="auto")(model)
    report = context.report["quantize_activations"]
    assert report["dynamic_tensors"] == ["x"]
    assert report["dynamic_asymmetric"] == (["x"] if centred else [])
    assert ("ReduceMin" in [n.op_type for n in model.graph]) == centred
    _run(model, x)


def test_dynamic_symmetric_option_is_checked():
    with pytest.raises(EqcError, match="dynamic_symmetric"):
        QuantizeActivationsOptions(dynamic_symmetric="maybe").validate()
    with pytest.raises(EqcError, match="one_sided"):
        QuantizeActivationsOptions(one_sided=2.0).validate()


def test_inspect_names_the_centred_chain(tiny_artifact, tmp_path):
    src = tiny_artifact("bert")
    stats = tmp_path / "bert.npz"
    calibrate(src, WIKI_VALID, samples=4, seq_len=32, out=stats, observers="minmax,absmax_channel,abssum,gram,sample")
    # w8a8-smooth with every input per token (the tiny random model has no coarse static input) and
    # one_sided 0.5: its small random GELU inputs give GELU outputs in about [-0.16, 0.45].
    recipe = load_recipe("w8a8-smooth")
    for step in recipe["passes"]:
        if step["pass"] == "quantize_activations":
            step["options"].update(dynamic_above=1e-9, one_sided=0.5)
    path = tmp_path / "all-token.json"
    path.write_text(json.dumps(recipe))
    out = tmp_path / "smooth"
    manifest = compile_model(src, str(path), out, calib=str(stats))
    qa = manifest["quantization"]["report"]["quantize_activations"]
    info = inspect(out)
    kinds = {layer["name"]: layer["activation"] for layer in info["layers"]}
    centred = {name for name, kind in kinds.items() if kind == "dynamic-per-token-int8-centred"}
    # The GELU outputs (FFN down inputs) that fell back to per token are exactly the centred ones.
    down = {n for n in kinds if n.endswith("output.dense") and "attention" not in n}
    expected = {n for n in down if any(t.startswith(f"/model/encoder/layer.{n.split('.')[2]}/intermediate")
                                       for t in qa["dynamic_asymmetric"])}
    assert centred == expected and len(centred) >= 1, (qa["dynamic_tensors"], qa["dynamic_asymmetric"])
    assert all(t.endswith("intermediate_act_fn/Mul_1_output_0") for t in qa["dynamic_asymmetric"])
