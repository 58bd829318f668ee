"""Edge targets (issue 24): `--target ort-mobile` (model.ort + the reduced-build operator list, made by
onnxruntime's own converter), `--target web` (weights folded at load for onnxruntime-web), and the refusal of
graphs an edge runtime cannot run (exit 2, one line, nothing written)."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import onnx
import pytest

from conftest import run_eqc


def _session(path: pathlib.Path, level=None, optimized: pathlib.Path | None = None, config: dict | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if level is not None:
        opts.graph_optimization_level = level
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _logits(path: pathlib.Path, ids: np.ndarray, level=None) -> np.ndarray:
    from eqcompiler.runtime.session import causal_feed

    sess = _session(path, level)
    return sess.run(["logits"], causal_feed(sess, ids))[0]


IDS = (np.arange(3, 51, dtype=np.int64)[None] * 7) % 500


@pytest.fixture(scope="module")
def edge_artifacts(tiny_artifact, tmp_path_factory) -> dict[str, pathlib.Path]:
    from eqcompiler.compile.pipeline import compile_model

    root = tmp_path_factory.mktemp("edge")
    src = tiny_artifact("llama")
    out = {}
    for recipe in ("w8", "w4-rtn"):
        for target in ("portable", "ort-mobile", "web"):
            out[f"{recipe}-{target}"] = root / f"{recipe}-{target}"
            compile_model(src, recipe, out[f"{recipe}-{target}"], target=target)
    return out


@pytest.mark.parametrize("recipe", ["w8", "w4-rtn"])
def test_ort_mobile_model_ort_gives_the_onnx_logits(edge_artifacts, recipe):
    art = edge_artifacts[f"{recipe}-ort-mobile"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"] == "ort-mobile"
    assert manifest["runtime_requirements"]["ort_format"]["model"] == "model.ort"
    a = _logits(art / "model.ort", IDS)  # onnxruntime loads the ORT-format model itself
    b = _logits(art / "model.onnx", IDS)
    assert a.shape == b.shape == (1, IDS.shape[1], a.shape[-1])
    # The .ort graph is the .onnx graph after ORT's own optimizations: the same kernels, the same numbers.
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    # and the QDQ numerics of the portable artifact, up to MatMulNBits' int8 activations (accuracy level 4)
    p = _logits(edge_artifacts[f"{recipe}-portable"] / "model.onnx", IDS)
    assert np.abs(a - p).max() < 0.05 * np.abs(p).max()


def _config_ops(path: pathlib.Path) -> set[tuple[str, str]]:
    ops = set()
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _opset, names = line.split(";")
            ops |= {(domain, name) for name in names.split(",")}
    return ops


@pytest.mark.parametrize("recipe", ["w8", "w4-rtn"])
def test_ort_mobile_operator_config_lists_the_graph_ops(edge_artifacts, recipe, tmp_path):
    import onnxruntime as ort

    art = edge_artifacts[f"{recipe}-ort-mobile"]
    config = art / "model.required_operators.config"
    listed = _config_ops(config)
    # Independently: the graph ORT runs for this artifact, optimized as the converter does (level all, ARM: no
    # NCHWc layout, int8 QDQ allowed), saved as ONNX.
    copy = tmp_path / "m"
    shutil.copytree(art, copy)
    _session(copy / "model.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized=copy / "opt.onnx",
             config={"session.qdqisint8allowed": "1", "session.disable_aot_function_inlining": "0"})
    opt = onnx.load(str(copy / "opt.onnx"), load_external_data=False)
    graph_ops = {("ai.onnx" if n.domain in ("", "ai.onnx") else n.domain, n.op_type) for n in opt.graph.node}
    assert graph_ops - {("ai.onnx", "Constant")} == listed
    # what the w4 graph needs from a minimal build: the 4-bit kernel (also the 8-bit lm_head's), the fused attention;
    # no plain MatMul is left (attention's are inside GroupQueryAttention)
    if recipe == "w4-rtn":
        assert {("com.microsoft", "MatMulNBits"), ("com.microsoft", "GroupQueryAttention")} <= listed
        assert ("ai.onnx", "MatMul") not in listed
    # the manifest records the same list, and the ops/opsets of model.onnx
    needs = json.loads((art / "manifest.json").read_text())["runtime_requirements"]
    recorded = {(d, op) for d, by_opset in needs["ort_format"]["ops"].items() for ops in by_opset.values() for op in ops}
    assert recorded == listed
    assert needs["ops"]["ai.onnx"]["opset"] == 21 and "Gather" in needs["ops"]["ai.onnx"]["ops"]
    assert needs["provider"] == "CPUExecutionProvider"
    assert str(tmp_path.parent) not in config.read_text() and ".tmp-" not in config.read_text()


@pytest.mark.parametrize("recipe", ["w8", "w4-rtn"])
def test_web_weights_fold_to_the_qdq_numbers(edge_artifacts, recipe, tmp_path):
    import onnxruntime as ort

    web, portable = edge_artifacts[f"{recipe}-web"], edge_artifacts[f"{recipe}-portable"]
    ref = _logits(portable / "model.onnx", IDS, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # QDQ as written
    as_written = _logits(web / "model.onnx", IDS, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.array_equal(as_written, ref)  # (q - zp) * scale, the same float operations as DequantizeLinear
    folded = _logits(web / "model.onnx", IDS)
    assert np.abs(folded - ref).max() <= 1e-5 * np.abs(ref).max()
    # no weight is dequantized at run time: after ORT's basic (constant-folding) level every linear weight is a
    # float initializer, and the unpacking ops are gone
    copy = tmp_path / "w"
    shutil.copytree(web, copy)
    _session(copy / "model.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, optimized=copy / "opt.onnx")
    opt = onnx.load(str(copy / "opt.onnx"), load_external_data=False)
    inits = {i.name: i for i in opt.graph.initializer}
    float_weights = [n for n in opt.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                     and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]
    assert len(float_weights) == 15  # 2 layers x 7 projections + lm_head; the other 4 MatMuls are attention
    assert not any(n.op_type == "Mod" for n in opt.graph.node)
    # storage stays quantized: the web artifact's weights take the portable QDQ artifact's bytes (4-bit zero points
    # take a byte instead of a nibble)
    data = lambda folder: (folder / "model.onnx.data").stat().st_size  # noqa: E731
    assert data(portable) <= data(web) < 1.1 * data(portable)
    manifest = json.loads((web / "manifest.json").read_text())
    assert manifest["runtime_requirements"]["provider"] == "wasm"
    # 14 projections + the lm_head; the embedding table is gathered int8 and its rows dequantized (cheap)
    assert manifest["quantization"]["report"]["lower_weights_for_web"]["lowered"] == 15


def _eqc_op_recipe(tmp_path: pathlib.Path) -> pathlib.Path:
    recipe = tmp_path / "w8-eqc-ops.json"
    recipe.write_text(json.dumps({"name": "w8-eqc-ops", "passes": [
        {"pass": "quantize_weights", "options": {"bits": 8, "symmetric": True, "block_size": 0}},
        {"pass": "lower_int8_weight_gemm", "options": {}}]}))
    return recipe


@pytest.mark.parametrize("target", ["ort-mobile", "web"])
def test_edge_target_refuses_eqc_ops_in_one_line(llama, tmp_path, target):
    out = tmp_path / "out"
    proc = run_eqc("compile", llama, "--recipe", _eqc_op_recipe(tmp_path), "--target", target, "-o", out, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ai.eqc::Int8WeightGemm" in lines[0] and f"--target {target}" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


def test_edge_target_refuses_ops_onnxruntime_has_no_kernel_for(llama, tmp_path):
    """A bare .onnx with an ONNX op ORT's CPU provider lacks (ImageDecoder) and an op of an unknown domain."""
    proto = onnx.load(str(llama / "model.onnx"), load_external_data=False)
    onnx.load_external_data_for_model(proto, str(llama))
    graph = proto.graph
    graph.input.append(onnx.helper.make_tensor_value_info("jpeg", onnx.TensorProto.UINT8, [None]))
    graph.node.append(onnx.helper.make_node("ImageDecoder", ["jpeg"], ["pixels"]))
    graph.node.append(onnx.helper.make_node("Blur", ["pixels"], ["blurred"], domain="com.example"))
    graph.output.append(onnx.helper.make_tensor_value_info("blurred", onnx.TensorProto.UINT8, None))
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(proto, str(src / "custom.onnx"), save_as_external_data=True, location="custom.onnx.data")
    out = tmp_path / "out"
    proc = run_eqc("compile", src / "custom.onnx", "--recipe", "none", "--target", "ort-mobile", "--kind", "generic",
                   "-o", out, check=False)  # generic: the extra 'jpeg' input is no causal-LM input to map
    assert proc.returncode == 2, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "cannot run 2 op types" in line and "ImageDecoder (opset 21)" in line and "com.example::Blur" in line
    assert not out.exists()


def test_edge_target_keeps_function_ops_and_constant(llama):
    """Ops ORT expands (ONNX functions) or resolves at load (Constant) are not refused."""
    import onnx_ir as ir

    from eqcompiler.lowering.edge import unrunnable_ops

    model = ir.serde.deserialize_model(onnx.load(str(llama / "model.onnx"), load_external_data=False))
    assert unrunnable_ops(model) == []


def test_web_weights_are_split_into_files_a_page_can_fetch(tiny_artifact, edge_artifacts, tmp_path, monkeypatch):
    """Over the per-file limit, the external data is split (whole tensors); the graph names each file, the
    manifest lists them in order, and the logits do not change."""
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.lowering import edge

    monkeypatch.setattr(edge, "WEB_MAX_FILE_BYTES", 32 << 10)
    out = tmp_path / "split"
    manifest = compile_model(tiny_artifact("llama"), "w4-rtn", out, target="web")
    web = manifest["runtime_requirements"]["web_files"]
    assert len(web["external_data"]) >= 2 and web["external_data"][0] == "model.onnx.data"
    assert web["external_data"][1:] == [f"model.onnx.data.{i}" for i in range(1, len(web["external_data"]))]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    tensors_in: dict[str, int] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            tensors_in[location] = tensors_in.get(location, 0) + 1
    assert sorted(tensors_in) == sorted(web["external_data"])
    for name in web["external_data"]:
        assert (out / name).stat().st_size == web["files"][name]
        assert web["files"][name] <= (32 << 10) or tensors_in[name] == 1  # a bigger tensor gets a file of its own
    whole = edge_artifacts["w4-rtn-web"]
    assert np.array_equal(_logits(out / "model.onnx", IDS), _logits(whole / "model.onnx", IDS))


def _dq_matmul_model(q: onnx.TensorProto, scale: np.ndarray, zp: onnx.TensorProto | None, axis: int, block: int,
                     k: int, n: int) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    inits = [q, numpy_helper.from_array(scale, "s")] + ([zp] if zp is not None else [])
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"] + (["z"] if zp is not None else []), ["w"], **attrs),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


CASES = {  # name: (dtype, k, n, axis, block, zero point)
    "int4 blocked, K not a multiple of the block, odd K": (onnx.TensorProto.INT4, 75, 6, 0, 16, False),
    "uint4 blocked with zero points": (onnx.TensorProto.UINT4, 64, 5, 0, 32, True),
    "int4 per output channel": (onnx.TensorProto.INT4, 12, 7, 1, 0, False),
    "uint8 per tensor with a zero point": (onnx.TensorProto.UINT8, 10, 4, 1, 0, True),
    "int8 per channel": (onnx.TensorProto.INT8, 9, 3, 1, 0, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lower_weights_for_web_is_dequantize_linear_exactly(case, tmp_path):
    """Every DequantizeLinear form eqc writes: the rewritten graph computes the same bits, as written and folded."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import helper

    from eqcompiler.compile.pass_base import CompileContext, make_pass

    dtype, k, n, axis, block, with_zp = CASES[case]
    rng = np.random.default_rng(len(case))
    lo, hi = {onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.UINT8: (0, 255),
              onnx.TensorProto.INT8: (-128, 127)}[dtype]
    codes = rng.integers(lo, hi + 1, (k, n))
    q = helper.make_tensor("q", dtype, [k, n], codes.flatten().tolist())
    if block:
        sshape = [-(-k // block), n]
    elif dtype == onnx.TensorProto.UINT8:
        sshape = []
    else:
        sshape = [[k, n][axis]]
    scale = (rng.random(sshape) * 0.1 + 0.01).astype(np.float32)
    zp = (helper.make_tensor("z", dtype, sshape, rng.integers(lo, hi + 1, sshape).flatten().tolist())
          if with_zp else None)
    proto = _dq_matmul_model(q, scale, zp, axis, block, k, n)
    model = ir.serde.deserialize_model(proto)
    context = CompileContext()
    make_pass("lower_weights_for_web", context, {})(model)
    assert context.report["lower_weights_for_web"]["lowered"] == 1
    lowered = ir.serde.serialize_model(model)
    assert not any(node.op_type == "DequantizeLinear" for node in lowered.graph.node)
    onnx.checker.check_model(lowered, full_check=True)
    x = rng.standard_normal((2, k)).astype(np.float32)
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = lambda m, level=None: _session_bytes(m, level).run(None, {"x": x})[0]  # noqa: E731
    ref = run(proto, off)
    assert np.array_equal(run(lowered, off), ref)  # as written: the same float operations
    assert np.array_equal(run(lowered), run(proto, off))  # folded at load: the same weights, the same MatMul


def _session_bytes(model: onnx.ModelProto, level=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if level is not None:
        opts.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_inspect_names_what_an_edge_target_added(edge_artifacts):
    from eqcompiler.analysis.inspect_model import inspect, lines

    web = inspect(edge_artifacts["w4-rtn-web"])
    assert web["edge"]["folded_weights"] == 15 and web["edge"]["web_files"] == ["model.onnx.data"]
    assert any(line.startswith("web: 15 quantized weights folded") for line in lines(web))
    mobile = inspect(edge_artifacts["w4-rtn-ort-mobile"])
    config = edge_artifacts["w4-rtn-ort-mobile"] / "model.required_operators.config"
    assert mobile["edge"]["ort_op_types"] == len(_config_ops(config)) > 10
    assert any(line.startswith("ort-mobile: model.ort + model.required_operators.config") for line in lines(mobile))
    assert inspect(edge_artifacts["w4-rtn-portable"])["edge"] is None
