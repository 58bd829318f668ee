"""Hardening of outputs and errors (issue 23).

- Exclusive outputs: of two writers to the same missing or empty output exactly one wins; the other is
  refused (exit 2, one line) and leaves nothing.
- Every refusal of -o (not empty / exists, a file or a folder, a missing parent, a read-only parent) comes
  before any work: shown by giving an input that would fail later and getting the output's error instead.
- Errors inside passes: an EqcError keeps its code, MemoryError is exit 4, anything else one line naming the
  pass (exit 1); a cyclic graph and a bad include/exclude regex are refused with exit 2 before any pass.
- Reproducible artifacts: no timings or worker counts in an artifact or a statistics file, so the same
  inputs give byte-identical folders, also from statistics of 1 and of 2 calibration workers.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run_eqc
from test_determinism import assert_same_artifact

EQC = pathlib.Path(sys.executable).parent / "eqc"


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    err = proc.stderr.strip()
    lines = err.splitlines()
    assert proc.returncode == code, f"exit {proc.returncode} (want {code}); stderr: {err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err[-1500:]}"
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    return lines[0]


def no_staging_left(parent: pathlib.Path) -> None:
    stray = [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not stray, f"staging leftovers: {stray}"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> pathlib.Path:
    """A small synthetic decoder artifact (no torch): compiles in about a second."""
    from eqcompiler.models.synthetic import SynthSpec, save_artifact

    return save_artifact(SynthSpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
                         tmp_path_factory.mktemp("synth") / "m")


# ---------------------------------------------------------------- 1. exclusive outputs

def _writer(out: str, attempts, lock, results, no_renameat2: bool) -> None:
    """One writer: enter staged_dir on `out` at the barrier; a winner holds its claim until the other has
    tried, so the two attempts overlap for certain."""
    from eqcompiler.artifact import atomic
    from eqcompiler.errors import EqcError

    if no_renameat2:
        atomic._libc_renameat2 = lambda: None
    try:
        with atomic.staged_dir(pathlib.Path(out)) as stage:
            (stage / "writer.txt").write_text(str(os.getpid()))
            with lock:
                attempts.value += 1
            deadline = time.monotonic() + 60
            while attempts.value < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        results.put(("won", os.getpid(), ""))
    except EqcError as exc:
        with lock:
            attempts.value += 1
        results.put(("refused", os.getpid(), str(exc)))


@pytest.mark.parametrize("no_renameat2", [False, True], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("existing", ["missing", "empty-folder"])
def test_two_writers_exactly_one_wins(tmp_path, existing, no_renameat2):
    from eqcompiler.artifact.atomic import WRITER_MARKER

    out = tmp_path / "out"
    if existing == "empty-folder":
        out.mkdir()
    ctx = multiprocessing.get_context("fork")
    attempts, lock, results = ctx.Value("i", 0), ctx.Lock(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(out), attempts, lock, results, no_renameat2)) for _ in range(2)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    kinds = sorted(kind for kind, _, _ in outcome)
    assert kinds == ["refused", "won"], outcome
    winner = next(pid for kind, pid, _ in outcome if kind == "won")
    message = next(msg for kind, _, msg in outcome if kind == "refused")
    assert "another eqc process is writing" in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == ["writer.txt"]  # the winner's output only, no marker
    assert (out / "writer.txt").read_text() == str(winner)
    assert not (out / WRITER_MARKER).exists()
    no_staging_left(tmp_path)


def test_failed_writer_leaves_the_output_as_found(tmp_path):
    """A failure inside the claim removes the reservation: a missing output stays missing, an empty folder
    stays an empty folder."""
    from eqcompiler.artifact.atomic import staged_dir

    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for out in (missing, empty):
        with pytest.raises(RuntimeError):
            with staged_dir(out) as stage:
                assert out.is_dir()  # claimed while the work runs
                (stage / "half.bin").write_bytes(b"x")
                raise RuntimeError("work failed")
    assert not missing.exists()
    assert empty.is_dir() and list(empty.iterdir()) == []
    no_staging_left(tmp_path)


def test_reservation_of_a_killed_writer_is_taken_over(tmp_path):
    """A writer killed with SIGKILL leaves its reserved folder with an unlocked marker: the next writer
    takes it over (the lock died with the process)."""
    code = ("import pathlib, os, sys\n"
            "from eqcompiler.artifact.atomic import staged_dir\n"
            "with staged_dir(pathlib.Path(sys.argv[1])) as s:\n"
            "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "out").is_dir()  # the dead writer's reservation
    from eqcompiler.artifact.atomic import staged_dir

    with staged_dir(tmp_path / "out") as stage:
        (stage / "a.txt").write_text("done")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]
    no_staging_left(tmp_path)


def test_overwrite_still_replaces(tmp_path):
    from eqcompiler.artifact.atomic import staged_dir
    from eqcompiler.errors import EqcError

    out = tmp_path / "out"
    for text in ("one", "two"):
        with staged_dir(out, overwrite=True) as stage:
            (stage / "v.txt").write_text(text)
    assert sorted(p.name for p in out.iterdir()) == ["v.txt"] and (out / "v.txt").read_text() == "two"
    with pytest.raises(EqcError, match="--overwrite"):
        with staged_dir(out) as stage:
            pass
    no_staging_left(tmp_path)


def test_file_output_without_overwrite_is_exclusive(tmp_path):
    """A file output that appears while a writer works is not replaced without --overwrite."""
    from eqcompiler.artifact.atomic import staged_file
    from eqcompiler.errors import EqcError

    out = tmp_path / "s.npz"
    with pytest.raises(EqcError, match="another process"):
        with staged_file(out, overwrite=False) as tmp:
            tmp.write_text("mine")
            out.write_text("theirs")  # another writer finished first
    assert out.read_text() == "theirs"
    no_staging_left(tmp_path)


def test_two_concurrent_compiles(synth, tmp_path):
    """Two `eqc compile` to the same -o started together: one exits 0, the other 2 with one line, and the
    output is the winner's complete artifact."""
    out = tmp_path / "out"
    cmd = [str(EQC), "compile", str(synth), "--recipe", "w8", "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    done = [subprocess.CompletedProcess(cmd, p.returncode, *o) for p, o in zip(procs, outputs)]
    codes = sorted(p.returncode for p in done)
    assert codes == [0, 2], [(p.returncode, p.stderr) for p in done]
    loser = next(p for p in done if p.returncode == 2)
    line = assert_one_error_line(loser, 2)
    assert "another eqc process is writing" in line or "not empty" in line, line
    assert {"model.onnx", "model.onnx.data", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "manifest.json").read_text())["quantization"]["recipe"] == "w8"
    no_staging_left(tmp_path)


# ---------------------------------------------------------------- 2. refusals of -o before any work

@contextlib.contextmanager
def read_only_folder(path: pathlib.Path):
    """A folder this process cannot write: a read-only tmpfs as root (root ignores modes), else mode 0555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def _bad_outputs(tmp_path: pathlib.Path, folder_output: bool):
    """(case, output path, words of the expected error, context manager) for each refusal of an output."""
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    existing_file = tmp_path / "existing.npz"
    existing_file.write_text("mine")
    if folder_output:
        yield "not-empty", nonempty, ("not empty", "--overwrite"), contextlib.nullcontext()
        yield "a-file", existing_file, ("not a folder",), contextlib.nullcontext()
    else:
        yield "exists", existing_file, ("exists", "--overwrite"), contextlib.nullcontext()
        yield "a-folder", nonempty, ("is a folder",), contextlib.nullcontext()
    yield "missing-parent", tmp_path / "no" / "such" / "out", ("does not exist",), contextlib.nullcontext()
    yield "read-only-parent", None, ("cannot write",), read_only_folder(tmp_path / "ro")


def _check_refusals(tmp_path: pathlib.Path, folder_output: bool, command) -> None:
    for case, out, words, ctx in _bad_outputs(tmp_path, folder_output):
        with ctx as ro:
            target = out if out is not None else ro / "out"
            proc = command(target)
            line = assert_one_error_line(proc, 2, *words)
            assert case and "missing_input" not in line
            no_staging_left(target.parent if target.parent.exists() else tmp_path)
    assert (tmp_path / "nonempty" / "keep.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "nonempty").iterdir()] == ["keep.txt"]
    assert (tmp_path / "existing.npz").read_text() == "mine"


def test_compile_refuses_output_before_loading_statistics(synth, tmp_path):
    """--calib names a file that does not exist: the output's error comes first, so the output was judged
    before the statistics were loaded (and long before any pass)."""
    missing = tmp_path / "missing_input.npz"
    _check_refusals(tmp_path, True, lambda out: run_eqc("compile", synth, "--recipe", "w8a8", "--calib", missing,
                                                         "-o", out, check=False))


def test_calibrate_refuses_output_before_reading_data(synth, tmp_path):
    missing = tmp_path / "missing_input.txt"
    _check_refusals(tmp_path, False, lambda out: run_eqc("calibrate", synth, "--data", missing, "-o", out,
                                                          check=False))


def test_export_refuses_output_before_loading_the_source(tmp_path):
    missing = tmp_path / "missing_input"
    _check_refusals(tmp_path, True, lambda out: run_eqc("export", missing, "-o", out, check=False))


def test_report_refuses_output_before_reading_models(tmp_path):
    missing = tmp_path / "missing_input"
    _check_refusals(tmp_path, False, lambda out: run_eqc("report", out, "--models", missing, "--no-speed",
                                                          check=False))


# ---------------------------------------------------------------- 3. errors inside and before passes

def _cyclic_model(folder: pathlib.Path) -> pathlib.Path:
    """y = relu(x + w @ ...) where the Add reads the Relu's output: a cycle, which no ONNX graph may have."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.ones(64, np.float32).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "r"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu")]
    graph = helper.make_graph(nodes, "cyclic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_cyclic_graph_refused_before_passes(tmp_path):
    model = _cyclic_model(tmp_path / "cyc")
    out = tmp_path / "out"
    proc = run_eqc("compile", model, "--recipe", "w8", "-o", out, check=False)
    assert_one_error_line(proc, 2, "cycle", "model.onnx")
    assert not out.exists()
    no_staging_left(tmp_path)


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_bad_regex_option_in_recipe(synth, tmp_path, option):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "mine", "description": "bad regex", "requires_calibration": False,
                                  "passes": [{"pass": "quantize_weights",
                                              "options": {"bits": 8, "symmetric": True, option: "layers.(["}}]}))
    out = tmp_path / "out"
    proc = run_eqc("compile", synth, "--recipe", recipe, "-o", out, check=False)
    assert_one_error_line(proc, 2, "quantize_weights", f"'{option}'", "regex", "layers.([")
    assert not out.exists()
    no_staging_left(tmp_path)


def _compile_in_process(monkeypatch, synth, out: pathlib.Path, method: str, exc: BaseException):
    """`eqc compile` through the CLI's wrapper, in this process, with quantize_weights' `method` raising."""
    from click.testing import CliRunner

    from eqcompiler.cli import main
    from eqcompiler.passes.quantize_weights import QuantizeWeightsPass

    def boom(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(QuantizeWeightsPass, method, boom)
    monkeypatch.delenv("EQC_DEBUG", raising=False)
    sigterm = signal.getsignal(signal.SIGTERM)  # the CLI's wrapper installs its own
    try:
        result = CliRunner().invoke(main, ["compile", str(synth), "--recipe", "w8", "-o", str(out)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert isinstance(result.exception, SystemExit), result.exception  # the wrapper's exit, not a raise
    return subprocess.CompletedProcess([], result.exit_code, result.stdout, result.stderr)


def test_memory_error_in_a_pass_is_exit_4(monkeypatch, synth, tmp_path):
    out = tmp_path / "out"
    proc = _compile_in_process(monkeypatch, synth, out, "call", MemoryError())
    assert_one_error_line(proc, 4, "out of memory", "quantize_weights")
    assert not out.exists()
    no_staging_left(tmp_path)


def test_unexpected_exception_in_a_pass_names_it(monkeypatch, synth, tmp_path):
    out = tmp_path / "out"
    proc = _compile_in_process(monkeypatch, synth, out, "call", ValueError("boom\nsecond line"))
    line = assert_one_error_line(proc, 1, "internal error in pass quantize_weights: ValueError: boom")
    assert "PassError" not in line and "second line" not in line
    assert not out.exists()


def test_eqc_error_wrapped_by_onnx_ir_keeps_its_code(monkeypatch, synth, tmp_path):
    """onnx-ir wraps what `requires` raises in a PreconditionError: the EqcError inside still decides."""
    from eqcompiler.errors import NumericsError

    out = tmp_path / "out"
    proc = _compile_in_process(monkeypatch, synth, out, "requires", NumericsError("weights are not finite"))
    line = assert_one_error_line(proc, 3, "weights are not finite")
    assert "PassError" not in line and "Precondition" not in line
    assert not out.exists()


# ---------------------------------------------------------------- 4. reproducible artifacts

def test_compile_twice_byte_identical_and_seconds_only_in_the_summary(synth, tmp_path):
    runs = [json.loads(run_eqc("compile", synth, "--recipe", "w8", "-o", tmp_path / name, "--json").stdout)
            for name in ("a", "b")]
    assert_same_artifact(tmp_path / "a", tmp_path / "b")
    assert all(isinstance(r["seconds"], float) for r in runs)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "compile_seconds" not in manifest and "seconds" not in json.dumps(manifest)
    text = run_eqc("compile", synth, "--recipe", "w8", "-o", tmp_path / "c").stdout
    assert "compiled with recipe 'w8' ->" in text and " s)" in text


def test_one_and_two_worker_statistics_compile_to_the_same_bytes(tiny_artifact, wiki_valid, tmp_path):
    art = tiny_artifact("llama")
    summaries = {}
    for workers in (1, 2):
        stats = tmp_path / f"s{workers}.npz"
        proc = run_eqc("calibrate", art, "--data", wiki_valid, "--samples", "4", "--seq-len", "32",
                       "--workers", str(workers), "--threads", "1", "-o", stats, "--json")
        summaries[workers] = json.loads(proc.stdout)
        run_eqc("compile", art, "--recipe", "w8a8", "--calib", stats, "-o", tmp_path / f"c{workers}")
    assert summaries[1]["workers"] == 1 and summaries[2]["workers"] == 2
    assert all(isinstance(s["seconds"], float) for s in summaries.values())
    headers = []
    for workers in (1, 2):
        with np.load(tmp_path / f"s{workers}.npz", allow_pickle=False) as data:
            headers.append(json.loads(bytes(data["header"]).decode()))
    assert headers[0] == headers[1]
    assert not {"seconds", "workers", "threads_per_worker"} & set(headers[0])
    assert_same_artifact(tmp_path / "c1", tmp_path / "c2")
