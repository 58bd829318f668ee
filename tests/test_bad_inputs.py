"""Bad inputs through the real `eqc` CLI: one `error:` line, the documented exit code, nothing left behind.

Every case runs the installed command as a user would and checks:
- the exit code (2 bad input / refused, 3 numerical, 4 environment, 130 interrupted),
- stderr is exactly one line starting with `error:` that names the problem, and no traceback,
- no partial output: the requested output path is absent and no `.tmp-` staging sibling remains.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import run_eqc

EQC = pathlib.Path(sys.executable).parent / "eqc"


def assert_refused(proc: subprocess.CompletedProcess, *words: str, code: int = 2,
                   out: pathlib.Path | None = None) -> str:
    err = proc.stderr.strip()
    lines = err.splitlines()
    assert proc.returncode == code, f"exit {proc.returncode} (want {code}); stderr: {err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line: {err[-1500:]}"
    assert "Traceback" not in err and "internal error" not in err, err
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    if out is not None:
        assert_no_output(out)
    return lines[0]


def assert_no_output(out: pathlib.Path) -> None:
    assert not out.exists(), f"partial output left at {out}"
    if out.parent.is_dir():
        stray = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        assert not stray, f"staging leftovers: {stray}"


def clone(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def set_location(folder: pathlib.Path, location: str) -> str:
    """Point the biggest external tensor of folder/model.onnx at `location`; returns its name."""
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ext = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    target = max(ext, key=lambda t: int(np.prod(t.dims)))
    for entry in target.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(folder / "model.onnx"))
    return target.name


def synthetic(folder: pathlib.Path, mutate=None, **spec_kw) -> pathlib.Path:
    """A small synthetic decoder artifact (no tokenizer), optionally edited before saving."""
    from eqcompiler.artifact import folder as art_mod
    from eqcompiler.models.synthetic import SynthSpec, build_model

    model = build_model(SynthSpec(**spec_kw))
    if mutate is not None:
        mutate(model)
    folder.mkdir(parents=True)
    art_mod.save_ir(model, folder)
    art_mod.write_manifest(folder, {"task": "causal-lm", "family": "synthetic-llama"})
    return folder


# ---------------------------------------------------------------- model files

def test_truncated_onnx(llama, tmp_path):
    bad = clone(llama, tmp_path / "m")
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", bad, "--recipe", "w8", "-o", out, check=False), "model.onnx", out=out)


def test_non_onnx_file(tmp_path):
    (tmp_path / "model.onnx").write_text("this is not a protobuf, just some text\n" * 20)
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", tmp_path / "model.onnx", "--recipe", "w8", "-o", out, check=False),
                   "not", "onnx", out=out)


def test_empty_model_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", tmp_path / "model.onnx", "--recipe", "w8", "-o", out, check=False),
                   "empty", out=out)


def test_missing_default_opset(llama, tmp_path):
    bad = clone(llama, tmp_path / "m")
    proto = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    del proto.opset_import[:]
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(proto, str(bad / "model.onnx"))
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", bad, "--recipe", "w8", "-o", out, check=False), "opset", out=out)


@pytest.mark.parametrize("version", [9, 99])
def test_unsupported_default_opset(llama, tmp_path, version):
    """Too old for the QDQ forms eqc emits (per-axis/blocked DequantizeLinear) or newer than onnx knows."""
    bad = clone(llama, tmp_path / "m")
    proto = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = version
    onnx.save(proto, str(bad / "model.onnx"))
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", bad, "--recipe", "w8", "-o", out, check=False), "opset", str(version), out=out)


def test_missing_external_data(llama, tmp_path):
    bad = clone(llama, tmp_path / "m")
    (bad / "model.onnx.data").unlink()
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", bad, "--recipe", "w8", "-o", out, check=False), "missing", out=out)


@pytest.mark.parametrize("command", ["compile", "calibrate", "eval"])
def test_external_data_parent_escape(llama, tmp_path, command, wiki_valid):
    bad = clone(llama, tmp_path / "m")
    shutil.copy(bad / "model.onnx.data", tmp_path / "x")
    set_location(bad, "../x")
    out = tmp_path / "out"
    args = {"compile": ["--recipe", "w8", "-o", out], "calibrate": ["--data", wiki_valid, "--seq-len", "64", "-o", out],
            "eval": ["--ppl", wiki_valid, "--max-tokens", "256", "--window", "64"]}[command]
    line = assert_refused(run_eqc(command, bad, *args, check=False), out=out)
    assert re.search("outside the model folder|escapes model directory", line), line


def test_external_data_absolute(llama, tmp_path):
    bad = clone(llama, tmp_path / "m")
    shutil.copy(bad / "model.onnx.data", tmp_path / "abs.data")
    set_location(bad, str(tmp_path / "abs.data"))
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", bad, "--recipe", "w8", "-o", out, check=False), "outside the model folder", out=out)


def link_outside(folder: pathlib.Path, name: str, outside: pathlib.Path) -> None:
    """Move folder/name to `outside` (a path beyond the folder) and leave a symlink to it in its place."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)


def test_external_data_symlink_out(llama, tmp_path, wiki_test):
    """A data file that is a symlink to a file outside the folder is refused, never read."""
    bad = clone(llama, tmp_path / "m")
    link_outside(bad, "model.onnx.data", tmp_path / "elsewhere" / "secret.data")
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", bad, "--recipe", "w8", "-o", out, check=False), "outside the model folder", out=out)
    # eval hands the path to ONNX Runtime, whose own containment check refuses the symlink too
    proc = run_eqc("eval", bad, "--no-latency", "--ppl", wiki_test, "--max-tokens", "256", "--window", "64",
                   check=False)
    assert re.search("outside the model folder|escapes model directory", assert_refused(proc))


def test_folder_without_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", tmp_path / "m", "--recipe", "w8", "-o", out, check=False), "model.onnx", out=out)


def test_model_does_not_exist(tmp_path):
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", tmp_path / "nope", "--recipe", "w8", "-o", out, check=False),
                   "does not exist", out=out)


# ---------------------------------------------------------------- weights

@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_weight_refused(tmp_path, value):
    name = "model/layers.0/mlp/up_proj.weight_t"

    def poison(model: ir.Model) -> None:
        init = next(v for k, v in model.graph.initializers.items() if k.endswith("up_proj.weight_t"))
        arr = init.const_value.numpy().copy()
        arr[3, 5] = value
        init.const_value = ir.tensor(arr, name=init.name)

    art = synthetic(tmp_path / "m", poison)
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", art, "--recipe", "w8", "-o", out, check=False), name, "NaN/Inf", out=out)


def test_non_float_weight_refused(tmp_path):
    """An integer MatMul with a constant weight is a 'linear site' but cannot be quantized: refuse by name."""

    def add_int_matmul(model: ir.Model) -> None:
        g = model.graph
        w = ir.Value(name="aux.weight_t", shape=ir.Shape([16, 4]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.arange(64, dtype=np.int64).reshape(16, 4), name="aux.weight_t"))
        g.register_initializer(w)
        node = ir.node("MatMul", [g.inputs[0], w], name="/model/aux/MatMul")
        g.append(node)
        node.outputs[0].name = "aux"
        node.outputs[0].type = ir.TensorType(ir.DataType.INT64)
        node.outputs[0].shape = ir.Shape([1, 4])
        g.outputs.append(node.outputs[0])

    art = synthetic(tmp_path / "m", add_int_matmul, dynamic=False, seq_len=16)
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", art, "--recipe", "w8", "-o", out, check=False), "aux.weight_t", "not floating",
                   out=out)


def test_custom_domain_consumer_is_fine(tmp_path):
    """A custom-domain op reading a quantized layer's output is outside the quantized region: compile keeps it."""

    def add_custom(model: ir.Model) -> None:
        g = model.graph
        model.opset_imports["com.example"] = 1
        logits = g.outputs[0]
        node = ir.node("Postprocess", [logits], domain="com.example", name="/custom/Postprocess")
        g.append(node)
        node.outputs[0].name = "post"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        node.outputs[0].shape = ir.Shape(logits.shape)
        g.outputs.append(node.outputs[0])

    art = synthetic(tmp_path / "m", add_custom)
    out = tmp_path / "out"
    run_eqc("compile", art, "--recipe", "w8", "-o", out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in proto.graph.node if n.domain == "com.example"] == ["Postprocess"]
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) >= 7


# ---------------------------------------------------------------- calibration data and statistics

def test_empty_calibration_text(llama, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    out = tmp_path / "s.npz"
    assert_refused(run_eqc("calibrate", llama, "--data", tmp_path / "empty.txt", "-o", out, check=False), "empty", out=out)


def test_non_utf8_text(llama, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50)
    out = tmp_path / "s.npz"
    assert_refused(run_eqc("calibrate", llama, "--data", tmp_path / "latin1.txt", "-o", out, check=False), "UTF-8",
                   out=out)


def test_missing_data_file(llama, tmp_path):
    out = tmp_path / "s.npz"
    assert_refused(run_eqc("calibrate", llama, "--data", tmp_path / "none.txt", "-o", out, check=False),
                   "does not exist", out=out)


def test_samples_zero(llama, tmp_path, wiki_valid):
    out = tmp_path / "s.npz"
    assert_refused(run_eqc("calibrate", llama, "--data", wiki_valid, "--samples", "0", "-o", out, check=False),
                   "samples", out=out)


def test_window_larger_than_text(llama, tmp_path):
    (tmp_path / "short.txt").write_text("the cat sat . " * 5)
    out = tmp_path / "s.npz"
    assert_refused(run_eqc("calibrate", llama, "--data", tmp_path / "short.txt", "--seq-len", "120", "-o", out,
                           check=False), "fewer than one window", out=out)


def test_eval_window_too_small(llama, wiki_test):
    assert_refused(run_eqc("eval", llama, "--ppl", wiki_test, "--window", "1", "--max-tokens", "64", "--no-latency",
                           check=False), "window")


def test_missing_tokenizer(llama, tmp_path, wiki_valid):
    bad = tmp_path / "m"
    bad.mkdir()
    for name in ("model.onnx", "model.onnx.data", "manifest.json"):
        shutil.copy(llama / name, bad / name)
    out = tmp_path / "s.npz"
    assert_refused(run_eqc("calibrate", bad, "--data", wiki_valid, "-o", out, check=False), "tokenizer", out=out)


def test_stats_from_another_model(llama, stats, tmp_path):
    other = synthetic(tmp_path / "other")
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", other, "--recipe", "w8a8", "--calib", stats, "-o", out, check=False),
                   "another model", out=out)


def test_corrupt_stats_file(llama, stats, tmp_path):
    bad = tmp_path / "bad.npz"
    data = stats.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", "w8a8", "--calib", bad, "-o", out, check=False),
                   "statistics file", out=out)


def test_stats_wrong_version(llama, stats, tmp_path):
    import json

    with np.load(stats, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(bytes(arrays["header"]).decode())
    header["version"] = 99
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    bad = tmp_path / "v99.npz"
    np.savez(bad, **arrays)
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", "w8a8", "--calib", bad, "-o", out, check=False),
                   "version 99", out=out)


def test_recipe_needs_calibration(llama, tmp_path):
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", "w8a8", "-o", out, check=False), "--calib", out=out)


def test_stats_output_exists(llama, stats, tmp_path, wiki_valid):
    existing = tmp_path / "s.npz"
    shutil.copy(stats, existing)
    before = existing.read_bytes()
    assert_refused(run_eqc("calibrate", llama, "--data", wiki_valid, "-o", existing, check=False), "--overwrite")
    assert existing.read_bytes() == before


# ---------------------------------------------------------------- recipes

def test_unknown_recipe(llama, tmp_path):
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", "w3a3", "-o", out, check=False), "unknown recipe", "w8",
                   out=out)


@pytest.mark.parametrize("recipe, message", [
    ('{"name": "x", "passes": [', "not valid JSON"),
    ('{"name": "x", "passes": [{"pass": "quantize_everything"}]}', "unknown pass 'quantize_everything'"),
    ('{"name": "x", "passes": [{"pass": "quantize_weights", "options": {"bitz": 4}}]}', "no option 'bitz'"),
    ('{"name": "x", "passes": [{"pass": "quantize_weights", "options": {"bits": 3}}]}', "bits"),
    # Each option's JSON type is the one its Options dataclass declares, refused before any pass runs.
    ('{"name": "x", "passes": [{"pass": "quantize_weights", "options": {"symmetric": "yes"}}]}',
     "option 'symmetric' must be true or false, got 'yes'"),
    ('{"name": "x", "passes": [{"pass": "quantize_weights", "options": {"block_size": "x"}}]}',
     "option 'block_size' must be an integer"),
    ('{"name": "x", "passes": [{"pass": "smooth_quant", "options": {"alpha_grid": "abc"}}]}',
     "option 'alpha_grid' must be a list of numbers"),
    ('{"name": "x", "passes": [{"pass": "quantize_weights", "options": {"include": 5}}]}',
     "option 'include' must be a string or null"),
], ids=["truncated-json", "unknown-pass", "unknown-option", "bad-option-value", "bool-as-string", "int-as-string",
        "list-as-string", "regex-as-number"])
def test_bad_recipe_file(llama, tmp_path, recipe, message):
    (tmp_path / "r.json").write_text(recipe)
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", tmp_path / "r.json", "-o", out, check=False), message,
                   out=out)


# ---------------------------------------------------------------- outputs

def test_output_exists_without_overwrite(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(run_eqc("compile", llama, "--recipe", "w8", "-o", out, check=False), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_output_is_a_file(llama, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    assert_refused(run_eqc("compile", llama, "--recipe", "w8", "-o", out, check=False), "not a folder")
    assert out.read_text() == "a file"


def test_output_parent_missing(llama, tmp_path):
    out = tmp_path / "no" / "such" / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", "w8", "-o", out, check=False), "does not exist", out=out)


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_output_folder(llama, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        out = ro / "out"
        assert_refused(run_eqc("compile", llama, "--recipe", "w8", "-o", out, check=False), "cannot write", out=out)


def test_disk_full(llama, tmp_path):
    """ENOSPC while writing the weights: no artifact, no staging folder, one line naming the problem."""
    with tmpfs(tmp_path / "small", "size=64k") as small:
        out = small / "out"
        assert_refused(run_eqc("compile", llama, "--recipe", "w8", "-o", out, check=False), "cannot write", out=out)
        assert list(small.iterdir()) == []


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the kernel's EFBIG reaches Python as an OSError
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


def test_file_size_limit(llama, tmp_path):
    """A quota-like limit (RLIMIT_FSIZE: EFBIG on write) behaves like a full disk."""
    out = tmp_path / "out"
    proc = subprocess.run([str(EQC), "compile", str(llama), "--recipe", "w8", "-o", str(out)], capture_output=True,
                          text=True, preexec_fn=_limit_file_size)
    assert_refused(proc, "cannot write", "too large", out=out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_write(tmp_path, signum):
    """SIGINT or SIGTERM while the artifact is being written: exit 130, nothing left behind."""
    from eqcompiler.models.synthetic import SynthSpec, save_artifact

    src = save_artifact(SynthSpec(hidden=512, layers=6, heads=8, kv_heads=8, intermediate=2048, vocab=8192),
                        tmp_path / "m")
    out = tmp_path / "out"
    # On a loaded 2-core machine the signal can land after the (fast) write has finished: that attempt
    # tests nothing, so it is discarded and the compile repeated (fp32 output: the longest write).
    for _attempt in range(4):
        # A runner started in the background by a shell (nohup ... &) ignores SIGINT, and children inherit
        # SIG_IGN (Python then installs no KeyboardInterrupt handler): restore the default for the compile.
        proc = subprocess.Popen([str(EQC), "compile", str(src), "--recipe", "none", "-o", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(".tmp-" in p.name for p in tmp_path.iterdir()):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "compile finished before the staging folder appeared"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0 or "had been written completely" in stderr:  # the signal landed after the rename
            shutil.rmtree(out)
            continue
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert_refused(result, "interrupted", code=130, out=out)
        return
    pytest.fail("the compile finished before SIGINT arrived in every attempt")


def test_staging_left_by_a_dead_writer_is_swept(tmp_path):
    """A staging folder whose writer died without cleaning up (SIGKILL) is removed by the next write to the
    same output; one whose writer still runs is left alone."""
    from eqcompiler.artifact.atomic import staged_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    live = tmp_path / f".out.tmp-{os.getppid()}-def456"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"x" * 1024)
    with staged_dir(tmp_path / "out") as staging:
        (staging / "manifest.json").write_text("{}")
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert not stale.exists() and live.is_dir()


def test_input_is_output(llama, tmp_path):
    work = clone(llama, tmp_path / "m")
    assert_refused(run_eqc("compile", work, "--recipe", "w8", "-o", work, "--overwrite", check=False), "input")
    assert (work / "model.onnx").is_file()


# ---------------------------------------------------------------- tasks and sources

def test_encoder_given_to_perplexity(tiny_artifact, wiki_test):
    bert = tiny_artifact("bert")
    assert_refused(run_eqc("eval", bert, "--ppl", wiki_test, "--no-latency", check=False), "causal LM", "encoder")


def test_export_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_refused(run_eqc("export", tmp_path / "nothing", "-o", out, check=False), "does not exist", out=out)


def test_export_remote_code_refused(tiny_hf, tmp_path):
    """A config that needs custom code (auto_map) is refused unless --trust-remote-code is given."""
    import json

    src = clone(tiny_hf("llama"), tmp_path / "remote")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (src / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    out = tmp_path / "out"
    assert_refused(run_eqc("export", src, "-o", out, check=False), "--trust-remote-code", out=out)


def test_no_pickle_in_sources():
    """Nothing eqc ships unpickles data: no pickle module, torch.load only with weights_only=True,
    numpy loads with allow_pickle=False, and trust_remote_code only as the user's explicit flag."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    sources = [p for d in ("eqcompiler", "passes", "models", "tools") for p in (repo / d).rglob("*.py")]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path


def test_text_the_tokenizer_cannot_read_is_refused(wiki_valid, tiny_artifact):
    """A tokenizer that maps most of the text to its unknown token (another model's files, or a bare vocabulary)
    is refused in one line instead of calibrating or scoring on [UNK]s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from eqcompiler.data import tokenize
    from eqcompiler.errors import EqcError

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, ",": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    text = wiki_valid.read_text()[:20_000]
    with pytest.raises(EqcError, match=r"maps \d+% of the text to its unknown token '\[UNK\]'"):
        tokenize(bare, text)
    # a real vocabulary with an unknown token (the tiny BERT's WordPiece) on the same text: accepted
    from eqcompiler.data import load_tokenizer

    wordpiece = load_tokenizer(tiny_artifact("bert"))
    assert wordpiece.unk_token_id is not None
    ids = tokenize(wordpiece, text)
    assert len(ids) > 1000 and float(np.mean(ids == wordpiece.unk_token_id)) < 0.5
