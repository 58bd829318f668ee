"""eqc artifacts in the browser (issue 24): tools/web/ loads an artifact with onnxruntime-web (WASM) in headless
Chromium, tokenizes in the page and decodes greedily through the KV cache; its prompt ids must equal the Python
tokenizer's and its tokens must equal `eqc generate`'s.

Needs node/npm (tools/web/node_modules is installed with `npm ci` on first use) and Debian's chromium
(apt-get install chromium); skips with the reason otherwise. Tokens/s are printed (pytest -s) and recorded
as junit properties.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

import pytest

from conftest import REPO, WIKI_VALID, run_eqc

sys.path.insert(0, str(REPO / "tools" / "web"))
import serve as web  # noqa: E402  (tools/web/serve.py: the COOP/COEP server and the Chromium driver)

# One xdist worker for the tiny-model browser tests (one server, one Chromium at a time on 2 cores).
pytestmark = pytest.mark.xdist_group("web")

TINY_PROMPT = "In 2010 , the"  # words of the tiny model's wikitext vocabulary, so no [UNK] in the prompt
SMOL_PROMPT = "The capital of France is"


def _python_prompt_ids(artifact: pathlib.Path, prompt: str) -> list[int]:
    """The ids eqc generate feeds (its tokenizer called with default special tokens)."""
    import transformers

    return list(transformers.AutoTokenizer.from_pretrained(str(artifact))(prompt)["input_ids"])


def _eqc_generate(artifact: pathlib.Path, prompt: str, max_new_tokens: int) -> dict:
    return json.loads(run_eqc("generate", artifact, "--prompt", prompt, "--max-new-tokens", max_new_tokens,
                              "--json").stdout)


@pytest.fixture(scope="module")
def browser_ready() -> None:
    if web.find_chromium() is None:
        pytest.skip("chromium not installed: apt-get install chromium (or set CHROMIUM_PATH)")
    if reason := web.npm_ready():
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tiny_web_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A tiny llama artifact, and a copy whose manifest names a token it generates as a second eos id."""
    from eqcompiler.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("web-tiny")
    # initializer_range 0.3: with the default 0.02 the random model repeats one token forever, which would not
    # notice a wrong position or cache; 0.3 gives a varied greedy sequence with clear argmax margins.
    hf = save_tiny_model("llama", root / "hf", WIKI_VALID.read_text()[:200_000], initializer_range=0.3)
    run_eqc("export", hf, "-o", root / "fp32")
    eos = root / "eos"
    shutil.copytree(root / "fp32", eos)
    return {"fp32": root / "fp32", "eos": eos}


@pytest.fixture(scope="module")
def server():
    """Serves tools/web/ and the artifacts each test mounts (server.models) with COOP/COEP headers."""
    srv, base = web.serve({})
    yield srv, base
    srv.shutdown()


def _run(server, name: str, artifact: pathlib.Path, prompt: str, max_new_tokens: int, threads: int,
         timeout_s: float) -> dict:
    srv, base = server
    srv.models[name] = artifact.resolve()
    return web.run_page(web.page_url(base, name, prompt, max_new_tokens, threads), timeout_s=timeout_s)


def _check(result: dict, ref: dict, prompt_ids: list[int], record_property, label: str) -> None:
    assert result["prompt_ids"] == prompt_ids, "the page's tokenizer disagrees with the Python tokenizer"
    assert result["tokens"] == ref["tokens"], f"browser {result['tokens']} != eqc generate {ref['tokens']}"
    assert result["stopped"] == ref["stopped"]
    assert result["text"] == ref["text"]
    assert result["tokens_per_s"] > 0
    assert result["cross_origin_isolated"], "the page was not cross-origin isolated (COOP/COEP headers)"
    record_property(f"{label}_tokens_per_s", round(result["tokens_per_s"], 2))
    print(f"\n{label}: {result['tokens_per_s']:.2f} tokens/s in the browser, prefill {result['prefill_ms']:.0f} ms, "
          f"load {result['load_ms']:.0f} ms (eqc generate: {ref['ms_per_token']} ms/token)")


@pytest.mark.e2e
@pytest.mark.parametrize("threads", [1, 2])
def test_tiny_llama_browser_tokens_equal_eqc_generate(browser_ready, tiny_web_artifacts, server, threads: int,
                                                       record_property) -> None:
    art = tiny_web_artifacts["fp32"]
    ref = _eqc_generate(art, TINY_PROMPT, 16)
    assert ref["stopped"] == "max_new_tokens" and len(set(ref["tokens"])) > 4  # a varied sequence, not one token
    result = _run(server, "tiny", art, TINY_PROMPT, 16, threads, timeout_s=120)
    _check(result, ref, _python_prompt_ids(art, TINY_PROMPT), record_property, f"tiny_llama_threads{threads}")
    assert result["threads"] == threads and result["external_data"] == ["model.onnx.data"]


@pytest.mark.e2e
def test_tiny_llama_browser_stops_at_eos_like_eqc_generate(browser_ready, tiny_web_artifacts, server,
                                                            record_property) -> None:
    """An eos id list in the manifest (here the real eos plus the 6th generated token) stops both at that token."""
    art = tiny_web_artifacts["eos"]
    first = _eqc_generate(tiny_web_artifacts["fp32"], TINY_PROMPT, 16)["tokens"]
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["tokenizer"]["eos_token_id"] = [manifest["tokenizer"]["eos_token_id"], first[5]]
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))
    ref = _eqc_generate(art, TINY_PROMPT, 16)
    assert ref["stopped"] == "eos" and ref["tokens"] == first[:first.index(first[5])]
    result = _run(server, "tiny-eos", art, TINY_PROMPT, 16, 1, timeout_s=120)
    _check(result, ref, _python_prompt_ids(art, TINY_PROMPT), record_property, "tiny_llama_eos")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp32", "w8", "w8-web"])
def test_smollm2_browser_tokens_equal_eqc_generate(browser_ready, smollm2_artifact, server, recipe: str,
                                                   tmp_path_factory, monkeypatch, record_property) -> None:
    art = smollm2_artifact
    new_tokens = 32
    if recipe == "w8":
        art = tmp_path_factory.mktemp("web-smollm2-w8") / "w8"
        run_eqc("compile", smollm2_artifact, "--recipe", "w8", "-o", art)
        new_tokens = 16  # the fp32-activation reference below is slow (~0.8 s/token on 2 cores)
        # Native ORT (1.2x+, graph optimizations on) fuses the w8 DequantizeLinear+MatMul pairs into MatMulNBits
        # with accuracy_level 4, which quantizes activations to int8 and so changes the greedy text (from the
        # 6th token on "The capital of France is"). onnxruntime-web computes the QDQ graph as written, with
        # float activations; the same arithmetic natively is accuracy_level 1, which eqc passes through.
        monkeypatch.setenv("EQC_ORT_CONFIG", "session.qdq_matmulnbits_accuracy_level=1")
    if recipe == "w8-web":  # weights folded to float at load, in the browser and natively: no reference setting
        art = tmp_path_factory.mktemp("web-smollm2-w8-web") / "w8-web"
        run_eqc("compile", smollm2_artifact, "--recipe", "w8", "--target", "web", "-o", art)
    ref = _eqc_generate(art, SMOL_PROMPT, new_tokens)
    result = _run(server, f"smollm2-{recipe}", art, SMOL_PROMPT, new_tokens, 2, timeout_s=600)
    _check(result, ref, _python_prompt_ids(art, SMOL_PROMPT), record_property, f"smollm2_{recipe}_threads2")


@pytest.fixture(scope="module")
def tiny_web_target(tiny_web_artifacts) -> pathlib.Path:
    """The tiny llama as w4-rtn --target web, its weights split over several files (as a model over the per-file
    limit is) so the page must hand each to onnxruntime-web under the location string the graph names."""
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.lowering import edge

    out = tiny_web_artifacts["fp32"].parent / "w4-web"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edge, "WEB_MAX_FILE_BYTES", 32 << 10)
        compile_model(tiny_web_artifacts["fp32"], "w4-rtn", out, target="web")
    return out


@pytest.mark.e2e
def test_tiny_web_target_browser_tokens_equal_eqc_generate(browser_ready, tiny_web_target, server,
                                                             record_property) -> None:
    """--target web folds the int4 weights to float when the session is created; the page (onnxruntime-web) and
    `eqc generate` (native ORT) both run that same artifact, so the tokens are equal."""
    art = tiny_web_target
    files = json.loads((art / "manifest.json").read_text())["runtime_requirements"]["web_files"]["external_data"]
    assert len(files) > 1
    ref = _eqc_generate(art, TINY_PROMPT, 16)
    assert ref["stopped"] == "max_new_tokens" and len(set(ref["tokens"])) > 4
    result = _run(server, "tiny-w4-web", art, TINY_PROMPT, 16, 1, timeout_s=180)
    _check(result, ref, _python_prompt_ids(art, TINY_PROMPT), record_property, "tiny_llama_w4_web")
    assert sorted(result["external_data"]) == sorted(files)
