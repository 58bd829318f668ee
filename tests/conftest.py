"""Shared fixtures: tiny random models of each family, the real SmolLM2 artifact, calibration stats.

Expensive artifacts are session-scoped so the whole suite exports SmolLM2 once.
Tests import eqcompiler from the installed package (make test installs it non-editable).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs two workers on two cores: one thread each, so ORT's and OpenMP's spinning worker threads
    # never compete with the other worker's for a core (tests that measure threads set their own).
    os.environ.setdefault("EQC_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("EQC_THREADS", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _wikitext(split: str) -> pathlib.Path:
    from eqcompiler.data import find_wikitext  # the copy shipped inside the installed package

    return find_wikitext(split)


WIKI_VALID = _wikitext("valid")
WIKI_TEST = _wikitext("test")


def causal_logits_at_level(folder: pathlib.Path, fused_int8: bool) -> "np.ndarray":
    """Logits of an eqc artifact on fixed token ids; fused_int8=False turns ORT's graph fusions (its
    int8 QDQ kernels among them) off, i.e. the QDQ graph's own arithmetic."""
    import numpy as np
    import onnxruntime as ort

    from eqcompiler.artifact import folder as am
    from eqcompiler.runtime.session import causal_feed

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused_int8
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(am.model_file(am.resolve_artifact(folder))), opts,
                                providers=["CPUExecutionProvider"], disabled_optimizers=["MatMulAddFusion"])
    ids = np.random.default_rng(1).integers(4, 500, (2, 33))
    return sess.run(["logits"], causal_feed(sess, ids))[0]


# Test tiers (Makefile): `make test` runs everything; `make test-fast` deselects "slow" (the real SmolLM2 /
# MiniLM) and "e2e" (a tiny Hugging Face model exported through torch, or the eqc CLI in a subprocess).
REAL_MODEL_FIXTURES = {"smollm2_artifact", "smollm2_stats", "smollm2_w8a8_dynamic"}
TINY_MODEL_FIXTURES = {"tiny_hf", "tiny_artifact", "tiny_llama_stats"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & REAL_MODEL_FIXTURES:  # built once per run and shared by the xdist workers (_built_once)
            item.add_marker(pytest.mark.slow)
        code = getattr(getattr(item, "function", None), "__code__", None)
        if fixtures & TINY_MODEL_FIXTURES or (code is not None and "run_eqc" in code.co_names):
            item.add_marker(pytest.mark.e2e)
    items[:] = _schedule_order(items)


def _schedule_order(items: list[pytest.Item]) -> list[pytest.Item]:
    """The order `make test`'s two workers take tests in (pytest-xdist --dist loadgroup --no-loadscope-reorder
    hands them out in collection order): first the test that needs the longest fixture chain (SmolLM2 export
    -> calibration -> w8a8-dynamic compile, about two minutes on one core), so one worker builds it while
    the other runs the browser group (one unit that cannot be split) and the synthetic tests; the other
    real-model tests last, when what they share is built and no worker waits on the other's lock."""
    def uses(item: pytest.Item, name: str) -> bool:
        return name in getattr(item, "fixturenames", ())

    chain = [i for i in items if uses(i, "smollm2_w8a8_dynamic")][:1]
    rest = [i for i in items if i not in chain]
    web = [i for i in rest if i.get_closest_marker("xdist_group")]
    synthetic = [i for i in rest if not i.get_closest_marker("xdist_group") and not i.get_closest_marker("slow")]
    real = [i for i in rest if not i.get_closest_marker("xdist_group") and i.get_closest_marker("slow")]
    return chain + web + synthetic + real


def run_eqc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `eqc` CLI as a user would; with PYTHONPATH set (a checkout run without installing),
    `python -m eqcompiler.cli`, so the subprocess runs the same eqcompiler the tests import."""
    exe = pathlib.Path(sys.executable).parent / "eqc"
    cmd = [sys.executable, "-m", "eqcompiler.cli"] if os.environ.get("PYTHONPATH") else [str(exe)]
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"eqc {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def linear_layers(artifact: pathlib.Path) -> int:
    """Linear layers of a compiled artifact whose weights are quantized (what `eqc inspect` counts), in process."""
    from eqcompiler.analysis.inspect_model import inspect

    result = inspect(artifact)
    assert result["linear_layers"] == result["quantized_matmuls"], result["linear_layers"]  # none left in float
    return result["quantized_matmuls"]


def eqc_bert_w8a8_dynamic(artifact: pathlib.Path, work: pathlib.Path) -> dict:
    """smoothing_summary of `eqc export`'s BERT compiled w8a8-dynamic (calibrated as the BERT tests calibrate)."""
    run_eqc("calibrate", artifact, "--data", WIKI_VALID, "--samples", "8", "--seq-len", "16", "--for", "w8a8-dynamic",
            "-o", work / "eqc-stats.npz")
    run_eqc("compile", artifact, "--recipe", "w8a8-dynamic", "--calib", work / "eqc-stats.npz", "-o", work / "eqc-w8a8d")
    return smoothing_summary(work / "eqc-w8a8d")


def smoothing_summary(artifact: pathlib.Path) -> dict:
    """How a w8a8-dynamic artifact treated its graph, in terms that do not depend on the exporter's node names:
    smoothed sites per kind, per-token inputs, and the lm_head (found by structure): smoothed or not, and what
    produces its input (DequantizeLinear when it is quantized per token). Foreign and eqc-export graphs of the
    same weights must agree on all of it (issue 20)."""
    import collections
    import json as _json

    import onnx_ir as ir

    from eqcompiler.compile.graph import layer_name
    from eqcompiler.compile.lm_head import is_lm_head

    report = _json.loads((artifact / "manifest.json").read_text())["quantization"]["report"]
    sites = report["smooth_quant"]["sites"]
    heads = [n for n in ir.load(str(artifact / "model.onnx")).graph if n.op_type in ("MatMul", "Gemm") and is_lm_head(n)]
    smoothed = {c for site in sites.values() for c in site["consumers"]}
    return {"sites": dict(collections.Counter(site["kind"] for site in sites.values())),
            "per_token_inputs": report["quantize_activations_dynamic"]["tensors"],
            "lm_heads": len(heads), "lm_head_smoothed": any(layer_name(h) in smoothed for h in heads),
            "lm_head_input": sorted({h.inputs[0].producer().op_type for h in heads}),
            "lm_head_weight": sorted({h.inputs[1].producer().op_type for h in heads})}


@pytest.fixture(scope="session")
def wiki_valid() -> pathlib.Path:
    return WIKI_VALID


@pytest.fixture(scope="session")
def wiki_test() -> pathlib.Path:
    return WIKI_TEST


def _tiny_hf(tmp_path_factory: pytest.TempPathFactory, family: str) -> pathlib.Path:
    from eqcompiler.models.tiny import save_tiny_model

    folder = tmp_path_factory.mktemp(f"hf-{family}")
    return save_tiny_model(family, folder, WIKI_VALID.read_text()[:200_000])


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_hf('llama') -> HF folder (cached per family)."""
    cache: dict[str, pathlib.Path] = {}

    def get(family: str) -> pathlib.Path:
        if family not in cache:
            cache[family] = _tiny_hf(tmp_path_factory, family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_artifact(tiny_hf, tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_artifact('llama') -> exported eqc artifact folder (cached per family)."""
    from eqcompiler.export.hf import export

    cache: dict[str, pathlib.Path] = {}

    def get(family: str) -> pathlib.Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"art-{family}") / "fp32"
            export(str(tiny_hf(family)), out)
            cache[family] = out
        return cache[family]

    return get


@pytest.fixture(scope="module")
def llama(tiny_artifact) -> pathlib.Path:
    """The tiny llama artifact (bad-input and hardening tests copy it before breaking it)."""
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def stats(tiny_llama_stats) -> pathlib.Path:
    return tiny_llama_stats


@pytest.fixture(scope="session")
def tiny_llama_stats(tiny_artifact, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from eqcompiler.calibration.calibrate import calibrate

    out = tmp_path_factory.mktemp("stats") / "tiny_llama.npz"
    calibrate(tiny_artifact("llama"), WIKI_VALID, samples=4, seq_len=64, out=out)
    return out


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> pathlib.Path:
    """`build(path)` run once per test run, however many pytest-xdist workers ask: the first worker builds
    under a lock in the run's shared temporary root, the others wait and reuse its result."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # popen-gwN/.. is shared by the workers of one run
    target, done = root / "built-once" / name, root / "built-once" / f"{name}.done"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            build(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The real SmolLM2-135M exported once per test run (about 40 s)."""
    from eqcompiler.export.hf import export

    return _built_once(tmp_path_factory, "smollm2-fp32", lambda out: export("smollm2", out))


@pytest.fixture(scope="session")
def smollm2_stats(smollm2_artifact, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from eqcompiler.calibration.calibrate import calibrate

    return _built_once(tmp_path_factory, "smollm2-stats.npz",
                       lambda out: calibrate(smollm2_artifact, WIKI_VALID, samples=8, seq_len=512, out=out))


@pytest.fixture(scope="session")
def smollm2_w8a8_dynamic(smollm2_artifact, smollm2_stats, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """SmolLM2 compiled with w8a8-dynamic (portable QDQ) once per test run (about 2 min)."""
    from eqcompiler.compile.pipeline import compile_model

    return _built_once(tmp_path_factory, "smollm2-w8a8-dynamic",
                       lambda out: compile_model(smollm2_artifact, "w8a8-dynamic", out, calib=str(smollm2_stats)))
