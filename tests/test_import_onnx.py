"""Bring your own ONNX: a graph exported at an older opset (torch.onnx writes 17-20, Optimum 14-18) is
converted with onnx's version converter, not refused; a conversion that fails is one line naming the op; a bare
.onnx without a tokenizer takes one from --tokenizer."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import onnx
import pytest

from conftest import run_eqc
from eqcompiler.calibration.stats import CalibrationStats


def _torch_mlp(path: pathlib.Path, opset: int) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    x = torch.randn(3, 64)
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=opset, dynamo=False)


@pytest.mark.parametrize("opset", [17, 20])
def test_older_opset_graph_is_converted_and_quantized(tmp_path, opset):
    import onnxruntime as ort

    src = tmp_path / "mlp.onnx"
    _torch_mlp(src, opset)
    assert onnx.load(str(src)).opset_import[0].version == opset
    proc = run_eqc("compile", src, "--recipe", "w8", "-o", tmp_path / "w8", "--json")
    manifest = json.loads((tmp_path / "w8" / "manifest.json").read_text())
    assert any(f"converted from opset {opset} to 21" in w for w in manifest["quantization"]["warnings"]), proc.stdout
    out = onnx.load(str(tmp_path / "w8" / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in out.opset_import}[""] == 21
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == 2  # both Linear weights int8
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "w8" / "model.onnx")).run(None, {"x": x})[0]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.02, err  # int8 weights: changed, but within rounding


def test_a_graph_the_converter_cannot_take_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Scatter", ["x", "i", "u"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
                                            helper.make_tensor_value_info("i", TensorProto.INT64, [2, 2]),
                                            helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    src = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)]), str(src))
    proc = run_eqc("compile", src, "--recipe", "w8", "-o", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Scatter" in proc.stderr and "opset 8" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_onnxruntime_genai_builder_graph_compiles_beside_its_fused_ops(tiny_hf, tmp_path):
    """onnxruntime-genai's builder writes GroupQueryAttention, SimplifiedLayerNormalization (an ORT op in the
    ONNX domain) and a tied embedding read through Transpose(lm_head weight): w8 quantizes every MatMul beside
    them and the graph still runs, within int8 rounding of the builder's own logits."""
    import subprocess
    import sys

    import onnxruntime as ort

    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    built = tmp_path / "builder"
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_hf("llama")),
                           "-o", str(built), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ops = {n.op_type for n in onnx.load(str(built / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SimplifiedLayerNormalization"} <= ops
    run_eqc("compile", built / "model.onnx", "--recipe", "w8", "-o", tmp_path / "w8")
    compiled = onnx.load(str(tmp_path / "w8" / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "DequantizeLinear" for n in compiled.graph.node) >= 2 * 5 + 1  # 2 layers x 5, lm_head
    decoder = json.loads((built / "genai_config.json").read_text())["model"]["decoder"]

    def logits(path: pathlib.Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ids = np.array([[5, 17, 42, 99, 7, 250]], dtype=np.int64)
        feed = {}
        for i in session.get_inputs():
            if i.name == "input_ids":
                feed[i.name] = ids
            elif i.name == "attention_mask":
                feed[i.name] = np.ones_like(ids, dtype=np.int32 if "int32" in i.type else np.int64)
            else:  # past_key_values.N.key/value: empty past
                feed[i.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
        return session.run(["logits"], feed)[0]

    ref, got = logits(built / "model.onnx"), logits(tmp_path / "w8" / "model.onnx")
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err
    # The builder leaves the head size symbolic ('kv_cache_dim'): the artifact records the cache layout read from
    # the graph's attention, carries the builder folder's tokenizer, and eqc's own KV-cache tools score it.
    kv = json.loads((tmp_path / "w8" / "manifest.json").read_text())["kv_cache"]
    assert (kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]) == (2, decoder["num_key_value_heads"],
                                                                      decoder["head_size"])
    assert (tmp_path / "w8" / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()
    from eqcompiler.artifact.kv_layout import past_shape_hints  # from the graph alone, no genai_config.json beside it

    for graph in (built / "model.onnx", tmp_path / "w8" / "model.onnx"):  # float, and int8 DequantizeLinear weights
        assert past_shape_hints(graph, None) == (decoder["num_key_value_heads"], decoder["head_size"]), graph
    from conftest import WIKI_TEST

    scores = [json.loads(run_eqc("eval", folder, "--ppl", WIKI_TEST, "--max-tokens", "256", "--window", "64",
                                 "--no-latency", "--json").stdout)["ppl"] for folder in (built / "model.onnx", tmp_path / "w8")]
    assert np.isfinite(scores).all() and scores[1] == pytest.approx(scores[0], rel=0.05) and scores[1] != scores[0]
    # onnxruntime-genai loads the compiled folder (the builder's genai_config.json travels with the graph) and
    # generates, greedily, the tokens eqc's own KV-cache loop picks on it.
    import onnxruntime_genai as og

    from eqcompiler.runtime.decode import CacheRunner
    from eqcompiler.runtime.session import make_session

    assert json.loads((tmp_path / "w8" / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
    ids = [5, 17, 42, 99, 7, 250]
    generator_params = og.GeneratorParams(model := og.Model(str(tmp_path / "w8")))
    generator_params.set_search_options(max_length=len(ids) + 8, do_sample=False)
    generator = og.Generator(model, generator_params)
    generator.append_tokens(ids)
    theirs = []
    while not generator.is_done() and len(theirs) < 8:
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    runner = CacheRunner(make_session(tmp_path / "w8" / "model.onnx", threads=1))
    step_logits, ours = runner.step(np.array([ids], dtype=np.int64)), []
    while len(ours) < len(theirs):
        ours.append(int(np.argmax(step_logits[0, -1])))
        step_logits = runner.step(np.array([[ours[-1]]], dtype=np.int64))
    assert len(theirs) == 8 and theirs == ours


def _bare_copy(src: pathlib.Path, bare: pathlib.Path) -> pathlib.Path:
    """The artifact's model.onnx (+ data) alone in a folder: no manifest, no tokenizer beside it."""
    bare.mkdir()
    for f in src.iterdir():
        if f.name.startswith("model.onnx"):
            shutil.copy(f, bare / f.name)
    return bare


def test_bare_onnx_calibrates_compiles_and_scores_with_tokenizer(tiny_artifact, wiki_valid, wiki_test, tmp_path):
    """A bare model.onnx (no tokenizer beside it) is refused where text is read, naming --tokenizer; given
    --tokenizer it calibrates (the statistics record it, so the SmoothQuant search a compile runs reads the same
    tokens), compiles into an artifact that carries that tokenizer, and scores the same perplexity as the artifact
    the graph came from."""
    src = tiny_artifact("llama")
    bare = _bare_copy(src, tmp_path / "bare")
    stats = tmp_path / "stats.npz"
    refused = run_eqc("calibrate", bare / "model.onnx", "--data", wiki_valid, "--samples", "4", "--seq-len", "32",
                      "-o", stats, check=False)
    assert refused.returncode == 2 and "--tokenizer" in refused.stderr and not stats.exists()
    run_eqc("calibrate", bare / "model.onnx", "--data", wiki_valid, "--samples", "4", "--seq-len", "32", "-o", stats,
            "--tokenizer", src / "tokenizer.json")
    assert CalibrationStats.load(stats).meta["data"]["tokenizer"] == str((src / "tokenizer.json").resolve())
    run_eqc("compile", bare / "model.onnx", "--recipe", "w8a8-dynamic", "--calib", stats, "-o", tmp_path / "q")
    scores = {}
    # The compiled artifact carries the tokenizer its statistics recorded: it scores without --tokenizer.
    assert (tmp_path / "q" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    for name, model, extra in (("source", src, []), ("bare", bare / "model.onnx", ["--tokenizer", src]),
                               ("compiled", tmp_path / "q", [])):
        proc = run_eqc("eval", model, "--ppl", wiki_test, "--max-tokens", "256", "--window", "64", "--no-latency",
                       "--json", *extra)
        scores[name] = json.loads(proc.stdout)["ppl"]
    assert scores["bare"] == pytest.approx(scores["source"], rel=1e-6)
    assert scores["compiled"] == pytest.approx(scores["source"], rel=0.05) and scores["compiled"] != scores["source"]


def _with_data(stats: pathlib.Path, out: pathlib.Path, **changes: object) -> pathlib.Path:
    """A copy of the statistics file with its header's data record changed (None removes a key)."""
    with np.load(stats, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(bytes(arrays["header"]).decode())
    data = {**header["data"], **changes}
    header["data"] = {k: v for k, v in data.items() if v is not None}
    np.savez(out, **{**arrays, "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)})
    return out


def test_paths_a_statistics_file_names_are_read_only_with_their_recorded_digest(tiny_artifact, wiki_valid, tmp_path):
    """A statistics file names its calibration text and tokenizer; compile reads them back (SmoothQuant's alpha
    search) and copies the tokenizer into a bare model's artifact. A crafted file pointing elsewhere (another file,
    or the right path with its digest removed) is refused in one line, exit 2, nothing written or copied."""
    src = tiny_artifact("llama")
    bare = _bare_copy(src, tmp_path / "bare")
    stats = tmp_path / "stats.npz"
    run_eqc("calibrate", bare / "model.onnx", "--data", wiki_valid, "--samples", "4", "--seq-len", "32", "-o", stats,
            "--tokenizer", src / "tokenizer.json")
    data = CalibrationStats.load(stats).meta["data"]
    assert len(data["tokenizer_sha256"]) == 64 and len(data["sha256"]) == 64
    secret = tmp_path / "elsewhere" / "secret.json"
    secret.parent.mkdir()
    secret.write_text('{"api_key": "do-not-copy"}')
    cases = {
        "tokenizer elsewhere": (_with_data(stats, tmp_path / "a.npz", tokenizer=str(secret)), "tokenizer", "sha256"),
        "tokenizer digest removed": (_with_data(stats, tmp_path / "b.npz", tokenizer_sha256=None), "tokenizer", "sha256"),
        "text elsewhere": (_with_data(stats, tmp_path / "c.npz", path=str(secret)), "calibration text", "sha256"),
        "text digest removed": (_with_data(stats, tmp_path / "d.npz", sha256=None), "calibration text", "sha256"),
    }
    for case, (bad, *words) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        proc = run_eqc("compile", bare / "model.onnx", "--recipe", "w8a8-dynamic", "--calib", bad, "-o", out,
                       check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (case, proc.stderr)
        (line,) = proc.stderr.strip().splitlines()
        assert all(w in line for w in words), (case, line)
        assert not out.exists(), case
    # the untouched file still compiles, carrying the tokenizer it names
    run_eqc("compile", bare / "model.onnx", "--recipe", "w8a8-dynamic", "--calib", stats, "-o", tmp_path / "ok")
    assert (tmp_path / "ok" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_opset_conversion_keeps_external_weights_readable(tmp_path, monkeypatch):
    """torch.onnx's dynamo exporter writes opset 20 with the weights in model.onnx.data: after the conversion to
    opset 21 the weights are still read from the model's folder, not from the working directory (they were not)."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from eqcompiler.artifact.folder import load_ir
    from eqcompiler.export.upgrade_opset import upgrade_opset

    weight = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                              [numpy_helper.from_array(weight, "w")])
    src = tmp_path / "model" / "model.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(src),
              save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # elsewhere: a relative 'model.onnx.data' would not be found from here
    upgraded, was = upgrade_opset(load_ir(src), 21, "g")
    assert was == 20 and upgraded.opset_imports[""] == 21
    tensor = upgraded.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and np.array_equal(tensor.numpy(), weight)
