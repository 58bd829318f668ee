"""Hardening (issue 23): what a model, recipe or statistics file names, and the limits of eqc calibrate.

- the model fingerprint covers every external-data file the graph references, whatever its name;
- one file-access layer: names found in files stay inside their folder; carried tokenizer/config files come
  from an explicit list, are never links and are size-capped; sensitivity_cache writes only into the user
  cache folder (or a folder the caller granted);
- limits checked up front: --seq-len beyond the model's positions, --workers/--threads < 1, malformed
  statistics headers, statistics entries that would inflate to gigabytes;
- distributed ranks refuse to merge with a rank that calibrates another model or another text;
- mutated statistics files never end in a traceback or a partial output (hypothesis).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import WIKI_TEST as WIKI_TEST_PATH, run_eqc
from test_bad_inputs import assert_no_output, assert_refused, clone, link_outside

TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def bare_onnx(src: pathlib.Path, folder: pathlib.Path, bump: float = 0.0) -> pathlib.Path:
    """folder/x.onnx with its weights in folder/weights.bin (no manifest, no model.onnx.data) and the
    tokenizer beside it; `bump` is added to the largest weight (same graph bytes, other weights)."""
    folder.mkdir(parents=True)
    proto = onnx.load(str(src / "model.onnx"))  # with its external data
    if bump:
        big = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        big.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(big) + np.float32(bump), big.name))
    onnx.save(proto, str(folder / "x.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, folder / name)
    return folder / "x.onnx"


# ---------------------------------------------------------------- 1. honest fingerprint

def test_fingerprint_covers_the_referenced_data_file(llama, tmp_path, wiki_valid):
    a = bare_onnx(llama, tmp_path / "a")
    b = bare_onnx(llama, tmp_path / "b", bump=0.25)
    c = tmp_path / "c"
    shutil.copytree(a.parent, c)
    assert a.read_bytes() == b.read_bytes(), "the two graphs must be byte-identical for this test"
    assert (a.parent / "weights.bin").read_bytes() != (b.parent / "weights.bin").read_bytes()
    assert not (a.parent / "model.onnx.data").exists()
    stats = tmp_path / "a.npz"
    run_eqc("calibrate", a, "--data", wiki_valid, "--samples", "2", "--seq-len", "32", "-o", stats)
    out = tmp_path / "out-b"
    assert_refused(run_eqc("compile", b, "--recipe", "w8a8", "--calib", stats, "-o", out, check=False),
                   "another model", out=out)
    run_eqc("compile", c / "x.onnx", "--recipe", "w8a8", "--calib", stats, "-o", tmp_path / "out-c")
    assert (tmp_path / "out-c" / "model.onnx").is_file()


def test_fingerprint_unchanged_for_a_usual_artifact(llama):
    """One file named model.onnx.data: sha256(graph + data) as before (existing statistics stay valid)."""
    import hashlib

    from eqcompiler.artifact.folder import model_fingerprint

    digest = hashlib.sha256((llama / "model.onnx").read_bytes() + (llama / "model.onnx.data").read_bytes())
    assert model_fingerprint(llama) == digest.hexdigest()[:32]


# ---------------------------------------------------------------- 2. file access: carried files, confinement

def test_only_listed_tokenizer_files_are_carried(llama, tmp_path):
    src = clone(llama, tmp_path / "m")
    (src / "notes.txt").write_text("private notes\n")
    (src / "dump.json").write_text("{}")
    out = tmp_path / "out"
    run_eqc("compile", src, "--recipe", "w8", "-o", out)
    names = {p.name for p in out.iterdir()}
    assert set(TOKENIZER_FILES) <= names, names
    assert "notes.txt" not in names and "dump.json" not in names, names
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("command", ["compile", "calibrate"])
def test_linked_tokenizer_is_refused(llama, tmp_path, command, wiki_valid):
    src = clone(llama, tmp_path / "m")
    link_outside(src, "tokenizer.json", tmp_path / "elsewhere" / "tokenizer.json")
    out = tmp_path / "out"
    args = {"compile": ["--recipe", "w8", "-o", out], "calibrate": ["--data", wiki_valid, "--seq-len", "32",
                                                                    "--samples", "1", "-o", out]}[command]
    assert_refused(run_eqc(command, src, *args, check=False), "tokenizer.json", "symbolic link", out=out)


def test_oversized_carried_file_is_refused(llama, tmp_path):
    src = clone(llama, tmp_path / "m")
    with open(src / "added_tokens.json", "wb") as fh:
        fh.truncate((64 << 20) + 1)  # sparse: no disk used
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", src, "--recipe", "w8", "-o", out, check=False), "added_tokens.json", "limit",
                   out=out)


def test_external_data_goes_through_the_confinement_check(llama, tmp_path):
    """A location that resolves inside the folder is fine; '..' that climbs out is refused by the same layer
    the fingerprint reads through (test_bad_inputs covers compile/calibrate/eval)."""
    from eqcompiler.artifact.folder import confined, model_fingerprint
    from eqcompiler.errors import EqcError

    assert confined(llama, "sub/../model.onnx.data", "x") == (llama / "model.onnx.data").resolve()
    for name in ("../x", "/etc/passwd", "", "."):
        with pytest.raises(EqcError, match="outside the model folder"):
            confined(llama, name, "external data")
    bad = clone(llama, tmp_path / "m")
    proto = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../model.onnx.data"
    onnx.save(proto, str(bad / "model.onnx"))
    shutil.copy(bad / "model.onnx.data", tmp_path / "model.onnx.data")
    with pytest.raises(EqcError, match="outside the model folder"):
        model_fingerprint(bad)


@pytest.mark.parametrize("data", ["../secret.txt", "/etc/hostname", "link/text.txt"])
def test_recipe_text_path_outside_its_folder_is_refused(llama, stats, tmp_path, data):
    """A file a recipe names (smooth_quant's calibration text) is read relative to the recipe and must stay in
    its folder, links followed: one line, exit 2, before any work."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (tmp_path / "secret.txt").write_text("private words " * 100)
    (folder / "link").symlink_to(tmp_path)  # a link inside the folder leading out of it
    recipe = folder / "sq.json"
    recipe.write_text(json.dumps({"name": "sq", "description": "t", "requires_calibration": True, "passes": [
        {"pass": "smooth_quant", "options": {"data": data}}, {"pass": "quantize_weights", "options": {}}]}))
    out = tmp_path / "out"
    proc = run_eqc("compile", llama, "--recipe", recipe, "--calib", stats, "-o", out, check=False)
    assert_refused(proc, "smooth_quant option 'data'", "outside the recipe's folder", out=out)


def test_recipe_text_path_beside_the_recipe_is_resolved_there(tmp_path):
    from eqcompiler.compile.recipes import load_recipe

    (tmp_path / "text.txt").write_text("words " * 10)
    recipe = tmp_path / "sq.json"
    recipe.write_text(json.dumps({"name": "sq", "description": "t", "passes": [
        {"pass": "smooth_quant", "options": {"data": "text.txt"}}]}))
    assert load_recipe(str(recipe))["passes"][0]["options"]["data"] == str((tmp_path / "text.txt").resolve())


def _kl_recipe(tmp_path: pathlib.Path, cache: object) -> pathlib.Path:
    recipe = tmp_path / "kl.json"
    recipe.write_text(json.dumps({"name": "kl", "description": "t", "requires_calibration": True, "passes": [
        {"pass": "apply_precision_plan", "options": {"sensitivity": "kl", "sensitivity_cache": cache}}]}))
    return recipe


@pytest.mark.parametrize("cache", ["/etc/eqc-x", "../../eqc-x", "ABS_OUTSIDE", "link/kl.json"])
def test_recipe_sensitivity_cache_outside_is_refused(llama, stats, tmp_path, monkeypatch, cache):
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    (xdg / "eqc" / "sensitivity").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (xdg / "eqc" / "sensitivity" / "link").symlink_to(tmp_path / "outside")  # a link planted in the cache
    cache = str(tmp_path / "outside") if cache == "ABS_OUTSIDE" else cache
    out = tmp_path / "out"
    proc = run_eqc("compile", llama, "--recipe", _kl_recipe(tmp_path, cache), "--calib", stats, "--budget", "6bits",
                   "-o", out, check=False)
    assert_refused(proc, "sensitivity_cache", "outside the cache folder", out=out)
    assert not list((tmp_path / "outside").iterdir()) and not pathlib.Path("/etc/eqc-x").exists()
    assert not (xdg.parent / "eqc-x").exists() and not (xdg / "eqc-x").exists()


def test_recipe_sensitivity_cache_inside_is_used(llama, stats, tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    run_eqc("compile", llama, "--recipe", _kl_recipe(tmp_path, "mine"), "--calib", stats, "--budget", "6bits",
            "-o", tmp_path / "out")
    assert list((xdg / "eqc" / "sensitivity" / "mine").glob("kl-*.json"))


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                       st.text(max_size=40), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                       st.sampled_from(["none", "/", "/etc/passwd", "..", "../..", "~", "~/x", "a/../../b", "x\0y"])))
def test_sensitivity_cache_option_is_confined_for_any_value(value):
    """Any recipe value: refused with a one-line EqcError, or resolved inside the user cache folder."""
    from eqcompiler.calibration import sensitivity as sens
    from eqcompiler.compile.pass_base import CompileContext
    from eqcompiler.errors import EqcError
    from eqcompiler.passes.apply_precision_plan import ApplyPrecisionPlanPass

    with tempfile.TemporaryDirectory() as xdg:
        old = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = xdg
        try:
            try:
                ApplyPrecisionPlanPass(CompileContext(), sensitivity_cache=value)
                path = sens.cache_path(value, "k")
            except EqcError as exc:
                assert "\n" not in str(exc)
                return
            root = pathlib.Path(xdg).resolve() / "eqc"
            assert path is None or root in path.resolve().parents, (value, path)
        finally:
            if old is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = old


# ---------------------------------------------------------------- 3. limits checked up front

@pytest.mark.parametrize("family,limit", [("llama", 128), ("gpt2", 128)])
def test_seq_len_beyond_the_models_positions(tiny_artifact, tmp_path, wiki_valid, family, limit):
    out = tmp_path / "s.npz"
    start = time.monotonic()
    proc = run_eqc("calibrate", tiny_artifact(family), "--data", wiki_valid, "--seq-len", str(limit + 1),
                   "--samples", "1", "-o", out, check=False)
    assert_refused(proc, f"exceeds the {limit} positions", out=out)
    proc = run_eqc("calibrate", tiny_artifact(family), "--data", wiki_valid, "--seq-len", str(limit - 1),
                   "--decode-steps", "2", "--samples", "1", "-o", out, check=False)
    assert_refused(proc, "plus --decode-steps 2", out=out)
    proc = run_eqc("calibrate", tiny_artifact(family), "--data", wiki_valid, "--seq-len", "4096", "--workers", "2",
                   "-o", out, check=False)
    assert_refused(proc, f"exceeds the {limit} positions", out=out)
    assert time.monotonic() - start < 120
    run_eqc("calibrate", tiny_artifact(family), "--data", wiki_valid, "--seq-len", str(limit), "--samples", "1",
            "-o", out)  # exactly the limit is fine


@pytest.mark.parametrize("flag,value,word", [("--workers", "0", "--workers"), ("--workers", "-2", "--workers"),
                                             ("--threads", "0", "--threads"), ("--samples", "0", "--samples"),
                                             ("--samples", "-1", "--samples"), ("--seq-len", "1", "window length"),
                                             ("--decode-steps", "-1", "--decode-steps")])
def test_calibrate_counts_must_be_positive(llama, tmp_path, wiki_valid, flag, value, word):
    out = tmp_path / "s.npz"
    assert_refused(run_eqc("calibrate", llama, "--data", wiki_valid, flag, value, "-o", out, check=False), word, out=out)


def _arrays(stats: pathlib.Path) -> tuple[dict, dict]:
    with np.load(stats, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(bytes(arrays["header"]).decode()), arrays


def _with_header(arrays: dict, header: object) -> dict:
    return {**arrays, "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}


HEADER_MUTATIONS = {
    "no tensors": lambda h, a: ({k: v for k, v in h.items() if k != "tensors"}, a),
    "tensors not a list": lambda h, a: ({**h, "tensors": "abc"}, a),
    "tensor names not strings": lambda h, a: ({**h, "tensors": [1] * len(h["tensors"])}, a),
    "duplicate tensor": lambda h, a: ({**h, "tensors": [h["tensors"][0]] * len(h["tensors"])}, a),
    "more tensors than arrays": lambda h, a: ({**h, "tensors": h["tensors"] + ["extra.tensor"]}, a),
    "fewer tensors than arrays": lambda h, a: ({**h, "tensors": h["tensors"][:-1]}, a),
    "header is a list": lambda h, a: ([1, 2], a),
    "fingerprint not a string": lambda h, a: ({**h, "model_fingerprint": 5}, a),
    "observers not a list": lambda h, a: ({**h, "observers": "minmax"}, a),
    "data not an object": lambda h, a: ({**h, "data": 3}, a),
    "data.seq_len negative": lambda h, a: ({**h, "data": {**h["data"], "seq_len": -4}}, a),
    "minmax wrong shape": lambda h, a: (h, {**a, "t0.minmax": np.zeros(3)}),
    "count negative": lambda h, a: (h, {**a, "t0.count": np.array(-1)}),
    "count missing": lambda h, a: (h, {k: v for k, v in a.items() if k != "t0.count"}),
    "string array": lambda h, a: (h, {**a, "t0.extra.hist": np.array(["x"])}),
    "unexpected entry": lambda h, a: (h, {**a, "evil": np.zeros(1)}),
}


@pytest.mark.parametrize("mutation", sorted(HEADER_MUTATIONS))
def test_malformed_statistics_are_refused(llama, stats, tmp_path, mutation):
    header, arrays = _arrays(stats)
    header, arrays = HEADER_MUTATIONS[mutation](header, arrays)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **_with_header(arrays, header))
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", "w8a8", "--calib", bad, "-o", out, check=False),
                   "statistics", out=out)


def _write_npy_entry(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: str, data_bytes: int,
                     compress: int = zipfile.ZIP_DEFLATED) -> None:
    """An .npy entry declaring `shape` followed by `data_bytes` zero bytes, streamed (never in memory)."""
    from numpy.lib import format as npy_format

    info = zipfile.ZipInfo(name)
    info.compress_type = compress
    for attr in ("compress_level", "_compresslevel"):  # fast: zeros compress ~1000x at any level
        try:
            setattr(info, attr, 1)
            break
        except AttributeError:
            continue
    with zf.open(info, "w", force_zip64=True) as fh:
        npy_format.write_array_header_1_0(fh, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
        chunk = bytes(16 << 20)
        left = data_bytes
        while left > 0:
            fh.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)


def _bomb(stats: pathlib.Path, path: pathlib.Path, gib: int = 2) -> None:
    header, arrays = _arrays(stats)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, value in arrays.items():
            if key != "t0.absmax_channel":
                with zf.open(f"{key}.npy", "w") as fh:
                    np.lib.format.write_array(fh, value, allow_pickle=False)
        n = (gib << 30) // 4
        _write_npy_entry(zf, "t0.absmax_channel.npy", (n,), "<f4", n * 4)


# Runs ARGV and prints its exit code and peak RSS. The kernel keeps a process's peak RSS across exec, so a child
# forked straight from a big pytest worker would report the worker's size; forked from this small interpreter, it
# reports its own.
_RSS_TRAMPOLINE = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


def _peak_rss_mib(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run eqc ARGS; return the completed process and its own peak RSS (MiB, from wait4)."""
    import json

    exe = pathlib.Path(sys.executable).parent / "eqc"
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-c", _RSS_TRAMPOLINE, str(exe), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=err, text=True)
        err.seek(0)
        lines = proc.stdout.strip().splitlines()
        result = json.loads(lines[-1])
        done = subprocess.CompletedProcess([str(exe), *map(str, args)], result["rc"], "\n".join(lines[:-1]),
                                           err.read().decode())
    return done, result["maxrss_kib"] / 1024


def test_statistics_zip_bomb_is_refused_before_loading(llama, stats, tmp_path):
    bomb = tmp_path / "bomb.npz"
    _bomb(stats, bomb, gib=2)
    assert bomb.stat().st_size < 16 << 20  # a few MB on disk, 2 GiB declared
    out = tmp_path / "out"
    proc, rss = _peak_rss_mib(["compile", llama, "--recipe", "w8a8", "--calib", bomb, "-o", out])
    assert_refused(proc, "statistics", "inflate", out=out)
    assert rss < 1024, f"peak RSS {rss:.0f} MiB: the entry was inflated"


def test_statistics_entry_with_a_lying_npy_header_is_refused(llama, stats, tmp_path):
    header, arrays = _arrays(stats)
    bad = tmp_path / "lie.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        for key, value in arrays.items():
            if key != "t0.count":
                with zf.open(f"{key}.npy", "w") as fh:
                    np.lib.format.write_array(fh, value, allow_pickle=False)
        _write_npy_entry(zf, "t0.count.npy", (10 ** 9,), "<i8", 8, compress=zipfile.ZIP_STORED)
    out = tmp_path / "out"
    assert_refused(run_eqc("compile", llama, "--recipe", "w8a8", "--calib", bad, "-o", out, check=False),
                   "statistics", "declares", out=out)


# ---------------------------------------------------------------- 4. distributed: ranks agree before merging

def _ranks(model_per_rank: list[pathlib.Path], data_per_rank: list[pathlib.Path], out: pathlib.Path
           ) -> list[subprocess.CompletedProcess]:
    """Start the torchrun-style module entry once per rank (own model and text each) and wait for all."""
    from eqcompiler.calibration.distributed import free_port

    port, world = free_port(), len(model_per_rank)
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", EQC_DIST_TIMEOUT="60")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "eqcompiler.calibration.distributed_calibrate", str(model_per_rank[rank]),
             "--data", str(data_per_rank[rank]), "--samples", "4", "--seq-len", "32", "--threads", "1",
             "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def assert_rank_refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """A rank's refusal: exit 2, exactly one `error:` line naming the problem, no traceback."""
    err = proc.stderr.strip()
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {err[-1500:]}"
    assert len(errors) == 1 and "Traceback" not in err, err[-1500:]
    for word in words:
        assert word.lower() in errors[0].lower(), f"{word!r} not in {errors[0]!r}"
    return errors[0]


def test_ranks_with_different_texts_refuse_to_merge(llama, tmp_path, wiki_valid, wiki_test):
    out = tmp_path / "s.npz"
    for rank, proc in enumerate(_ranks([llama, llama], [wiki_valid, wiki_test], out)):
        line = assert_rank_refused(proc, f"rank {rank}:", "rank 1 of 2", "another calibration text")
        assert "nothing was merged" in line
    assert_no_output(out)


def test_ranks_with_different_models_refuse_to_merge(llama, tmp_path, wiki_valid):
    other = clone(llama, tmp_path / "other")
    with open(other / "model.onnx.data", "r+b") as fh:  # other weights, same graph
        fh.seek(4096)
        fh.write(np.full(16, 0.5, dtype=np.float32).tobytes())
    same = clone(llama, tmp_path / "same")  # another path, the same bytes: fine
    out = tmp_path / "s.npz"
    for rank, proc in enumerate(_ranks([llama, other], [wiki_valid, wiki_valid], out)):
        assert_rank_refused(proc, f"rank {rank}:", "rank 1 of 2", "another model")
    assert_no_output(out)
    procs = _ranks([llama, same], [wiki_valid, wiki_valid], out)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr + procs[1].stderr
    assert out.is_file()


# ---------------------------------------------------------------- 5. mutated statistics files (property)

@pytest.fixture(scope="module")
def stats_bytes(stats) -> bytes:
    return stats.read_bytes()


def _invoke(args: list[str]) -> tuple[int, str]:
    """eqc in this process (click's runner): exit code and stderr."""
    from click.testing import CliRunner

    from eqcompiler.cli import main

    import signal

    handler = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        signal.signal(signal.SIGTERM, handler)  # `guarded` turns SIGTERM into KeyboardInterrupt
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_statistics_never_crash(llama, stats_bytes, data):
    """Random byte flips or truncations of a real statistics file: eqc compile either succeeds (the flip
    hit bytes nobody reads, e.g. a zip timestamp) and writes a whole artifact, or exits 2/3/4 with exactly
    one `error:` line and no output; never a traceback, an internal error or a partial output."""
    blob = bytearray(stats_bytes)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, len(blob) - 1), label="offset")
            blob[i] ^= data.draw(st.integers(1, 255), label="xor")
    with tempfile.TemporaryDirectory() as tmp:
        bad, out = pathlib.Path(tmp) / "m.npz", pathlib.Path(tmp) / "out"
        bad.write_bytes(bytes(blob))
        code, err = _invoke(["compile", llama, "--recipe", "w8a8", "--calib", bad, "-o", out])
        lines = err.strip().splitlines()
        if code == 0:
            assert (out / "manifest.json").is_file()
            return
        assert code in (2, 3, 4), (code, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err[-2000:]
        assert_no_output(out)


# ---------------------------------------------------------------- 6. mutated manifests and graphs (property)

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                           | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


def _json_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document (dict keys and list indices)."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            paths += _json_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            paths += _json_paths(v, prefix + (i,))
    return paths


def _assert_clean_outcome(code: int, err: str, out: pathlib.Path) -> None:
    """Success with a whole artifact, or exit 2/3/4 with one `error:` line and nothing written."""
    if code == 0:
        assert (out / "manifest.json").is_file() and (out / "model.onnx").is_file()
        return
    lines = err.strip().splitlines()
    assert code in (2, 3, 4), (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err[-2000:]
    assert_no_output(out)


PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(data=st.data())
def test_mutated_manifests_never_crash(llama, data):
    """A manifest with any one value replaced by random JSON, a key removed, or its text cut short: eqc
    compile and eqc eval either work or refuse in one line (exit 2/3/4), never a traceback or partial output."""
    manifest = json.loads((llama / "manifest.json").read_text())
    text = json.dumps(manifest)
    how = data.draw(st.sampled_from(["replace", "remove", "truncate"]), label="how")
    if how == "truncate":
        text = text[:data.draw(st.integers(0, len(text) - 1), label="length")]
    else:
        path = data.draw(st.sampled_from(_json_paths(manifest)), label="path")
        *parents, last = path
        holder = manifest
        for key in parents:
            holder = holder[key]
        if how == "remove":
            del holder[last]
        else:
            holder[last] = data.draw(JSON_VALUES, label="value")
        text = json.dumps(manifest)
    with tempfile.TemporaryDirectory() as tmp:
        art = pathlib.Path(shutil.copytree(llama, pathlib.Path(tmp) / "art"))
        (art / "manifest.json").write_text(text)
        out = pathlib.Path(tmp) / "out"
        code, err = _invoke(["compile", art, "--recipe", "w8", "-o", out])
        _assert_clean_outcome(code, err, out)
        for args in (["eval", art, "--max-tokens", "64", "--window", "32", "--no-latency", "--ppl", WIKI_TEST_PATH],
                     ["inspect", art]):
            code, err = _invoke(args)
            assert code in (0, 2, 3, 4) and "Traceback" not in err and "internal error" not in err, (code, err[-2000:])


def _mutate_graph(model: onnx.ModelProto, data: st.DataObject) -> None:
    """One structural change: a node's op, input, output or attribute; an initializer's shape or type; a graph
    input's element type; or a node removed."""
    graph = model.graph
    node = graph.node[data.draw(st.integers(0, len(graph.node) - 1), label="node")]
    how = data.draw(st.sampled_from(["op", "input", "output", "attribute", "drop node", "initializer dims",
                                     "initializer type", "input type", "domain"]), label="how")
    if how == "op":
        node.op_type = data.draw(st.sampled_from(["MatMul", "Add", "Relu", "Gather", "Reshape", "NoSuchOp", ""]))
    elif how == "input" and node.input:
        node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(
            st.sampled_from(["", "missing_tensor", graph.input[0].name, graph.node[0].output[0]]))
    elif how == "output" and node.output:
        node.output[0] = data.draw(st.sampled_from(["", graph.input[0].name, graph.node[-1].output[0], "dup"]))
    elif how == "attribute" and node.attribute:
        attr = node.attribute[data.draw(st.integers(0, len(node.attribute) - 1))]
        attr.type = data.draw(st.sampled_from([onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT,
                                               onnx.AttributeProto.STRING, onnx.AttributeProto.INTS]))
        attr.i = data.draw(st.integers(-10, 10))
    elif how == "drop node":
        graph.node.remove(node)
    elif how in ("initializer dims", "initializer type") and graph.initializer:
        init = graph.initializer[data.draw(st.integers(0, len(graph.initializer) - 1))]
        if how == "initializer dims":
            init.dims[:] = data.draw(st.lists(st.integers(0, 70), min_size=0, max_size=3))
        else:
            init.data_type = data.draw(st.sampled_from([onnx.TensorProto.INT8, onnx.TensorProto.DOUBLE,
                                                        onnx.TensorProto.STRING, 0, 99]))
    elif how == "input type":
        graph.input[0].type.tensor_type.elem_type = data.draw(st.sampled_from([onnx.TensorProto.FLOAT, 0, 99]))
    elif how == "domain":
        node.domain = data.draw(st.sampled_from(["com.microsoft", "ai.eqc", "no.such.domain"]))


@PROPERTY
@given(data=st.data())
def test_mutated_graphs_never_crash(llama, data):
    """A graph with one structural change (see _mutate_graph): eqc compile w8 either writes a whole artifact
    or refuses in one line (exit 2/3/4), never a traceback, an internal error or a partial output."""
    model = onnx.load(str(llama / "model.onnx"), load_external_data=False)
    _mutate_graph(model, data)
    with tempfile.TemporaryDirectory() as tmp:
        art = pathlib.Path(shutil.copytree(llama, pathlib.Path(tmp) / "art"))
        (art / "model.onnx").write_bytes(model.SerializeToString())
        out = pathlib.Path(tmp) / "out"
        code, err = _invoke(["compile", art, "--recipe", "w8", "-o", out])
        _assert_clean_outcome(code, err, out)


def test_a_graph_out_of_topological_order_is_read_and_compiled(llama, tmp_path):
    """ONNX asks for topological order; exporters do not always keep it. The input check sorts before it checks,
    and the compiled graph (sorted by eqc) gives the same logits as the in-order one."""
    model = onnx.load(str(llama / "model.onnx"), load_external_data=False)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    art = pathlib.Path(shutil.copytree(llama, tmp_path / "art"))
    (art / "model.onnx").write_bytes(model.SerializeToString())
    code, err = _invoke(["compile", art, "--recipe", "w8", "-o", tmp_path / "out"])
    assert code == 0, err
    run_eqc("compile", llama, "--recipe", "w8", "-o", tmp_path / "ref")
    from eqcompiler.runtime.session import causal_feed, make_session

    ids = np.arange(3, 19, dtype=np.int64)[None, :]
    got, want = (make_session(f / "model.onnx").run(["logits"], causal_feed(make_session(f / "model.onnx"), ids))[0]
                 for f in (tmp_path / "out", tmp_path / "ref"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
