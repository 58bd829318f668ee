"""Bring your own ONNX from Optimum: graphs written by `optimum-cli export onnx` (optimum-onnx 0.1.0 in its own
environment, .venv-optimum: it needs transformers <4.58, eqc's .venv has 5.x) from tiny random-weight models saved
locally (nothing from a hub). eqc detects each kind, calibrates, compiles and evaluates them, and the numbers match
what `eqc export` of the same weights gives. Optimum's merged decoder (use_cache_branch + If) is refused in one line.

`make test` builds .venv-optimum first (`make optimum-env`); without it these tests skip, naming the target."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import onnx
import pytest

from conftest import REPO, WIKI_TEST, WIKI_VALID, eqc_bert_w8a8_dynamic, linear_layers, run_eqc, smoothing_summary

sys.path.insert(0, str(REPO / "tools"))
from bench_byo_exporters import transformers4_folder  # noqa: E402  (the folder as Optimum's transformers 4.57 reads it)

OPTIMUM_BIN = REPO / ".venv-optimum" / "bin"
PPL = ["--ppl", WIKI_TEST, "--max-tokens", "512", "--window", "64", "--no-latency", "--json"]
# Optimum's w8a8-dynamic vs eqc export's on the tiny LLaMA (504 tokens): measured 456.17135 both (with past).
W8A8_DYNAMIC_VS_EQC = 1e-5


@pytest.fixture(scope="module")
def optimum_bin() -> pathlib.Path:
    if not (OPTIMUM_BIN / "optimum-cli").is_file():
        if os.environ.get("EQC_REQUIRE_INSTALLED"):  # make test: the environment is a prerequisite, never skipped
            pytest.fail(f"{OPTIMUM_BIN.parent} is missing: make test builds it with `make optimum-env`")
        pytest.skip("the Optimum environment is not built: `make optimum-env`")
    return OPTIMUM_BIN


def _optimum(bin_dir: pathlib.Path, *args: str) -> None:
    """A command of the Optimum environment, away from eqc's PYTHONPATH (its own transformers 4.57)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([*map(str, args)], capture_output=True, text=True, env=env, cwd=bin_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _export(bin_dir: pathlib.Path, hf: pathlib.Path, task: str, out: pathlib.Path) -> pathlib.Path:
    _optimum(bin_dir, bin_dir / "optimum-cli", "export", "onnx", "-m", hf, "--task", task, out)
    assert (out / "tokenizer.json").is_file()  # Optimum copies the tokenizer: eqc reads it from the graph's folder
    return out / "model.onnx"


@pytest.fixture(scope="module")
def optimum_graphs(optimum_bin, tiny_hf, tmp_path_factory) -> dict[str, pathlib.Path]:
    """The three exports the issue names: LLaMA with and without past, BERT feature extraction."""
    root = tmp_path_factory.mktemp("optimum")
    llama, bert = (transformers4_folder(tiny_hf(f), root / f"hf-{f}") for f in ("llama", "bert"))
    return {"llama-past": _export(optimum_bin, llama, "text-generation-with-past", root / "llama-past"),
            "llama": _export(optimum_bin, llama, "text-generation", root / "llama"),
            "bert": _export(optimum_bin, bert, "feature-extraction", root / "bert")}


def _ppl(model: pathlib.Path, *extra: object) -> float:
    return json.loads(run_eqc("eval", model, *PPL, *extra).stdout)["ppl"]


@pytest.fixture(scope="module")
def eqc_llama(tiny_artifact, tmp_path_factory) -> dict:
    """`eqc export` of the same weights: perplexity float, w8 and w8a8-dynamic (calibrated as the Optimum graphs
    are), and how w8a8-dynamic treated the graph (smoothing_summary): what the Optimum graphs must give."""
    art = tiny_artifact("llama")
    work = tmp_path_factory.mktemp("eqc-llama")
    run_eqc("compile", art, "--recipe", "w8", "-o", work / "w8")
    run_eqc("calibrate", art, "--data", WIKI_VALID, "--samples", "4", "--seq-len", "64", "--for", "w8a8-dynamic",
            "-o", work / "stats.npz")
    run_eqc("compile", art, "--recipe", "w8a8-dynamic", "--calib", work / "stats.npz", "-o", work / "w8a8-dynamic")
    return {"fp32": _ppl(art), "w8": _ppl(work / "w8"), "w8a8-dynamic": _ppl(work / "w8a8-dynamic"),
            "summary": smoothing_summary(work / "w8a8-dynamic")}


@pytest.mark.parametrize("name,kind,past", [("llama-past", "causal-lm", 4), ("llama", "causal-lm-nocache", 0)])
def test_optimum_llama_through_calibrate_compile_eval(optimum_graphs, eqc_llama, tmp_path, name, kind, past):
    graph = optimum_graphs[name]
    proto = onnx.load(str(graph), load_external_data=False)
    assert proto.opset_import[0].version == 18  # Optimum's default: eqc converts it to 21
    assert sum(i.name.startswith("past_key_values.") for i in proto.graph.input) == past
    inspected = json.loads(run_eqc("inspect", graph, "--json").stdout)["kind"]
    assert (inspected["kind"], inspected["source"]) == (kind, "detected")
    stats = tmp_path / "stats.npz"
    # The tokenizer Optimum copied beside the graph is read from there; the compiled artifacts carry it.
    run_eqc("calibrate", graph, "--data", WIKI_VALID, "--samples", "4", "--seq-len", "64",
            "--for", "w8a8-dynamic", "-o", stats)
    for recipe in ("w8", "w8a8-dynamic"):
        run_eqc("compile", graph, "--recipe", recipe, "--calib", stats, "-o", tmp_path / recipe)
        manifest = json.loads((tmp_path / recipe / "manifest.json").read_text())
        assert manifest["task"] == kind and (tmp_path / recipe / "tokenizer.json").is_file()
        assert linear_layers(tmp_path / recipe) == 15, recipe  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    # With a cache, the KV layout is read from the graph before the passes run: SmoothQuant ties o_proj's scales
    # per KV head instead of skipping those sites ("GQA without known head_dim").
    smooth = json.loads((tmp_path / "w8a8-dynamic" / "manifest.json").read_text())["quantization"]["report"]["smooth_quant"]
    assert not any("head_dim" in why for why in smooth.get("skipped", {}).values()) or not past, smooth["skipped"]
    ppl = {"fp32": _ppl(graph), "w8": _ppl(tmp_path / "w8"),
           "w8a8-dynamic": _ppl(tmp_path / "w8a8-dynamic")}
    # Measured (torch 2.13, ORT 1.32, 504 tokens): fp32 456.278 both; w8 456.102 (Optimum) vs 456.102 (eqc export);
    # w8a8-dynamic 456.005 vs fp32. The same float model to float rounding; int8 weights move ppl by ~0.04%.
    assert ppl["fp32"] == pytest.approx(eqc_llama["fp32"], rel=1e-5)
    assert ppl["w8"] != ppl["fp32"] and ppl["w8"] == pytest.approx(eqc_llama["w8"], rel=2e-4)
    assert ppl["w8a8-dynamic"] != ppl["w8"] and ppl["w8a8-dynamic"] == pytest.approx(ppl["fp32"], rel=2e-3)
    # The same treatment as eqc export's graph (issue 20): tie_lm_head ties Optimum's untied copy of the lm_head back
    # to the embedding table (ORT ran the copy with int8 activation blocks), which is then neither smoothed nor
    # quantized per token; the same smoothed sites per kind and per-token inputs.
    report = json.loads((tmp_path / "w8a8-dynamic" / "manifest.json").read_text())["quantization"]["report"]
    assert list(report["tie_lm_head"]["tied"]) == ["lm_head"]
    summary = smoothing_summary(tmp_path / "w8a8-dynamic")
    assert summary == eqc_llama["summary"] and summary["lm_head_weight"] == ["Transpose"], summary
    assert not summary["lm_head_smoothed"] and summary["lm_head_input"] != ["DequantizeLinear"]
    assert ppl["w8a8-dynamic"] == pytest.approx(eqc_llama["w8a8-dynamic"], rel=W8A8_DYNAMIC_VS_EQC)


def test_optimum_bert_through_calibrate_compile_eval(optimum_graphs, tiny_artifact, tmp_path):
    graph, ref = optimum_graphs["bert"], tiny_artifact("bert")
    inspected = json.loads(run_eqc("inspect", graph, "--json").stdout)["kind"]
    assert inspected["kind"] == "encoder" and "token_type_ids" in inspected["why"]
    stats = tmp_path / "stats.npz"
    run_eqc("calibrate", graph, "--data", WIKI_VALID, "--samples", "8", "--seq-len", "16", "--for", "w8a8-dynamic",
            "-o", stats)
    cosine = {}
    for recipe in ("fp32", "w8", "w8a8", "w8a8-dynamic"):
        model = graph
        if recipe != "fp32":
            model = tmp_path / recipe
            run_eqc("compile", graph, "--recipe", recipe, "--calib", stats, "-o", model)
            assert linear_layers(model) == 12, recipe  # 2 layers x (q, k, v, o, up, down)
        # Scored against `eqc export` of the same weights: the float graphs agree, the quantized ones are close.
        result = json.loads(run_eqc("eval", model, "--embed-ref", ref, "--sentences", "40", "--no-latency",
                                    "--json").stdout)["embedding"]
        cosine[recipe] = result["min_cosine"]
    # Measured: fp32 1.0000000 (to float rounding), w8 and w8a8 min cosine 0.999997.
    assert cosine["fp32"] > 1 - 1e-6
    assert 0.9999 < cosine["w8"] < cosine["fp32"] and 0.9999 < cosine["w8a8"] < cosine["fp32"]
    # SmoothQuant finds the same sites as on eqc export's BERT (the attention-output dense through its value
    # projection), also where Optimum hands v's bias through an Identity of a de-duplicated initializer (every
    # all-zero bias of the random BERT is one tensor): it was "found no smoothable activation", exit 2.
    summary = smoothing_summary(tmp_path / "w8a8-dynamic")
    assert summary == eqc_bert_w8a8_dynamic(ref, tmp_path) and summary["sites"] == {"attn": 2}, summary
    assert 0.9999 < cosine["w8a8-dynamic"] < cosine["fp32"]


def _refused(proc: subprocess.CompletedProcess, said: str) -> None:
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and said in line and "Traceback" not in proc.stderr, proc.stderr


def test_optimum_merged_decoder_is_refused_in_one_line(optimum_bin, optimum_graphs, tiny_hf, tmp_path):
    """optimum-onnx 0.1.0 writes one decoder with past; its own merge_decoders still builds the merged form older
    Optimum wrote (decoder_model_merged.onnx: use_cache_branch picks a subgraph of an If node). Every command refuses
    it in one line naming what it found, and writes nothing."""
    src = optimum_graphs["llama-past"]
    merged = tmp_path / "merged" / "decoder_model_merged.onnx"
    merged.parent.mkdir()
    _optimum(optimum_bin, optimum_bin / "python", "-c", "import sys; from optimum.onnx import merge_decoders; "
             "merge_decoders(sys.argv[1], sys.argv[1], save_path=sys.argv[2])", src, merged)
    proto = onnx.load(str(merged), load_external_data=False)
    assert [n.op_type for n in proto.graph.node] == ["If"] and "use_cache_branch" in [i.name for i in proto.graph.input]
    said = "Optimum's merged decoder (a use_cache_branch input selects the decoder without or with past inside an If"
    _refused(run_eqc("inspect", merged, check=False), said)
    _refused(run_eqc("compile", merged, "--recipe", "w8", "-o", tmp_path / "w8", check=False), said)
    _refused(run_eqc("compile", merged, "--kind", "generic", "--recipe", "w8", "-o", tmp_path / "w8", check=False), said)
    _refused(run_eqc("calibrate", merged, "--data", WIKI_VALID, "--tokenizer", tiny_hf("llama"), "-o",
                     tmp_path / "s.npz", check=False), said)
    assert not (tmp_path / "w8").exists() and not (tmp_path / "s.npz").exists()
    # The folder Optimum wrote has no model.onnx: the line names the graphs it holds.
    _refused(run_eqc("inspect", merged.parent, check=False), "(it holds decoder_model_merged.onnx: pass the .onnx file")
