"""GGUF input for every family transformers reads from GGUF: each tiny family of tests/test_families.py written as an
F32 GGUF (tests/gguf_writer.py), read back by transformers to the same weights and tokens, exported by eqc to the
same logits as the Hugging Face folder it was written from, then compiled w8 and w4-rtn and scored.
A GGUF of an architecture transformers cannot read (OLMo-2), or a file that is not GGUF, is refused in one line.

The GGUF is written from a tiny model with a byte-level BPE vocabulary (a GGUF holds no word-level vocabulary),
the family's own config less what no GGUF key carries to transformers (gguf_writer.GGUF_CONFIG_OVERRIDES).
Conversions go into a per-module XDG_CACHE_HOME, never the user's cache.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import pytest

from conftest import WIKI_VALID, run_eqc
from gguf_writer import GGUF_ARCH, save_tiny_gguf_source, write_gguf

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2"]
# what config.model_type a GGUF of each family loads as: llama.cpp writes mistral as architecture "llama"
LOADS_AS = {"mistral": "llama"}
RECIPES = ["w8", "w4-rtn"]
PPL_TOKENS, PPL_WINDOW = 512, 64
PROMPT = np.random.default_rng(1).integers(4, 500, (2, 12))
TEXT_CHARS = 200_000  # the tokenizers are trained on this much of WikiText-2 valid

# Bounds, measured on these tiny models (tools/bench_gguf_families.py -> tools/results/gguf_families.md; 2-core CPU,
# ORT 1.32, torch 2.13, transformers 5.24, gguf 0.19):
# - GGUF export vs the HF-folder export: the same float32 weights through the same exporter: <= 1e-4 relative
#   (measured 0.0 on every family: the two graphs compute bit-identical logits);
# - quantized perplexity vs the GGUF fp32 artifact's own: w8 within 1% (measured -0.13%..+0.17%), w4-rtn within 5%
#   (measured -1.57%..+2.07%, phi3 the largest).
LOGITS_VS_HF = 1e-4
PPL_BOUND = {"w8": 0.01, "w4-rtn": 0.05}


@dataclasses.dataclass
class Built:
    family: str
    hf: pathlib.Path
    gguf: pathlib.Path
    fp32_hf: pathlib.Path
    fp32_gguf: pathlib.Path
    compiled: dict[str, pathlib.Path]


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory):
    """eqc converts a GGUF once into $XDG_CACHE_HOME/eqc/gguf: a fresh one for this module."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield pathlib.Path(os.environ["XDG_CACHE_HOME"])
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, gguf_cache, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """One family: HF folder -> GGUF; both exported; the GGUF's export compiled w8 and w4-rtn."""
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.export.hf import export

    family = request.param
    root = tmp_path_factory.mktemp(f"gguf-{family}")
    hf = save_tiny_gguf_source(family, root / "hf", WIKI_VALID.read_text()[:TEXT_CHARS])
    gguf = write_gguf(hf, root / f"{family}.gguf")
    export(str(hf), root / "fp32-hf")
    export(str(gguf), root / "fp32-gguf")
    compiled = {}
    for recipe in RECIPES:
        compiled[recipe] = root / recipe
        compile_model(root / "fp32-gguf", recipe, compiled[recipe])
    return Built(family, hf, gguf, root / "fp32-hf", root / "fp32-gguf", compiled)


def logits(folder: pathlib.Path, ids: np.ndarray = PROMPT) -> np.ndarray:
    from eqcompiler.runtime.session import causal_feed, make_session

    session = make_session(folder / "model.onnx")
    return session.run(["logits"], causal_feed(session, ids))[0]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.e2e
def test_the_written_gguf_reads_back_to_the_same_model(built: Built) -> None:
    """The writer's own check: transformers' GGUF loader (with the hyperparameters eqc restores) gives back the
    HF folder's tensors bit for bit and a tokenizer that encodes the text to the same ids."""
    import torch
    import transformers

    from eqcompiler.models.gguf_cache import restore_dropped_hparams

    config = transformers.AutoConfig.from_pretrained(built.gguf.parent, gguf_file=built.gguf.name)
    restore_dropped_hparams(config, built.gguf)
    assert config.model_type == LOADS_AS.get(built.family, built.family)
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(built.gguf.parent, gguf_file=built.gguf.name,
                                                                  config=config, dtype=torch.float32)
    want = transformers.AutoModelForCausalLM.from_pretrained(built.hf, dtype=torch.float32).state_dict()
    got = from_gguf.state_dict()
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not differ, differ

    text = WIKI_VALID.read_text()[:20_000]
    hf_tok = transformers.AutoTokenizer.from_pretrained(built.hf)
    gguf_tok = transformers.AutoTokenizer.from_pretrained(built.gguf.parent, gguf_file=built.gguf.name)
    ids = gguf_tok(text)["input_ids"]
    assert ids == hf_tok(text)["input_ids"] and gguf_tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were applied: not one token per byte


@pytest.mark.e2e
def test_gguf_export_matches_the_hf_folder_export(built: Built) -> None:
    import json

    from eqcompiler.data import load_tokenizer

    manifest = json.loads((built.fp32_gguf / "manifest.json").read_text())
    assert manifest["task"] == "causal-lm" and manifest["family"] == LOADS_AS.get(built.family, built.family)
    assert manifest["source"]["gguf_file"] == built.gguf.name, manifest["source"]
    assert max(manifest["parity"][case] for case in ("prompt", "decode", "padded")) < 1e-5, manifest["parity"]
    err = rel_err(logits(built.fp32_gguf), logits(built.fp32_hf))
    assert err <= LOGITS_VS_HF, (built.family, err)
    # the artifact's tokenizer (saved from the GGUF's) round-trips the text and agrees with the HF folder's
    text = WIKI_VALID.read_text()[:20_000]
    tok, hf_tok = load_tokenizer(built.fp32_gguf), load_tokenizer(built.fp32_hf)
    ids = tok(text)["input_ids"]
    assert ids == hf_tok(text)["input_ids"] and tok.decode(ids) == text
    for kind in ("bos", "eos", "pad"):
        assert manifest["tokenizer"][f"{kind}_token_id"] == {"bos": 2, "eos": 3, "pad": 1}[kind], manifest["tokenizer"]


@pytest.mark.e2e
def test_gguf_quantized_perplexity(built: Built) -> None:
    from eqcompiler.analysis.evaluate import perplexity

    def ppl(folder: pathlib.Path) -> float:
        return perplexity(folder, WIKI_VALID, max_tokens=PPL_TOKENS, window=PPL_WINDOW)["ppl"]

    base = ppl(built.fp32_gguf)
    assert np.isfinite(base) and 1 < base < 1e5, base
    # same weights, same tokens: the HF folder's artifact scores the same text the same
    assert abs(ppl(built.fp32_hf) / base - 1) <= 1e-4
    for recipe in RECIPES:
        value = ppl(built.compiled[recipe])
        assert np.isfinite(value), (recipe, value)
        assert abs(value / base - 1) <= PPL_BOUND[recipe], (built.family, recipe, value, base)
        assert rel_err(logits(built.compiled[recipe]), logits(built.fp32_gguf)) > 0  # the weights were quantized


# --- sentencepiece vocabularies (tokenizer.ggml.model "llama": scores, no merges, as llama.cpp writes them) ---

SPM_FAMILIES = ["llama", "phi3", "gemma2", "gemma3_text"]  # real GGUFs of these carry one; phi3 and gemma have
# their own builders in transformers (phi3: the prefix space from a normalizer; gemma: merges from token order)


@pytest.mark.e2e
@pytest.mark.parametrize("family", SPM_FAMILIES)
def test_sentencepiece_gguf_vocab_survives_the_conversion(family: str, gguf_cache, tmp_path: pathlib.Path) -> None:
    """eqc's artifact tokenizer is the one transformers builds from the GGUF (saved so that it reads back the
    same: the family's class would rebuild it otherwise), decodes what it encodes, and the weights come through."""
    import transformers

    from eqcompiler.data import load_tokenizer
    from eqcompiler.export.hf import export

    hf = save_tiny_gguf_source(family, tmp_path / "hf", WIKI_VALID.read_text()[:TEXT_CHARS], vocab="spm")
    gguf = write_gguf(hf, tmp_path / f"{family}.gguf")
    export(str(hf), tmp_path / "fp32-hf")
    export(str(gguf), tmp_path / "fp32-gguf")
    assert rel_err(logits(tmp_path / "fp32-gguf"), logits(tmp_path / "fp32-hf")) <= LOGITS_VS_HF

    text = WIKI_VALID.read_text()[:20_000]
    want = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    tok = load_tokenizer(tmp_path / "fp32-gguf")
    ids = tok(text)["input_ids"]
    assert ids == want(text)["input_ids"]
    assert "\u2581" in "".join(tok.convert_ids_to_tokens(ids[:50])) and len(ids) < len(text) / 1.5  # pieces, merged
    # Round trip on text without a leading space (llama's and gemma's sentencepiece drop it, as their HF
    # tokenizers do) and without WikiText's literal "<unk>" (phi3's normalizer puts a space after a special token).
    plain = text.replace(" <unk>", "").lstrip()
    assert tok.decode(tok(plain)["input_ids"]) == plain


# --- what transformers cannot read from GGUF ---

@pytest.mark.e2e
def test_an_architecture_transformers_cannot_read_is_refused_in_one_line(gguf_cache, tmp_path: pathlib.Path) -> None:
    """OLMo-2: gguf-py names its tensors, llama.cpp runs it, transformers 5.24 has no GGUF mapping for it."""
    from eqcompiler.models.gguf_cache import transformers_gguf_architectures

    assert "olmo2" not in transformers_gguf_architectures() and GGUF_ARCH["olmo2"] == "olmo2"
    hf = save_tiny_gguf_source("olmo2", tmp_path / "hf", WIKI_VALID.read_text()[:50_000])
    gguf = write_gguf(hf, tmp_path / "olmo2.gguf")
    out = tmp_path / "out"
    cached = sorted((gguf_cache / "eqc").glob("gguf/*"))
    proc = run_eqc("export", gguf, "-o", out, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: GGUF architecture 'olmo2' of '{gguf}' is not one "
                                                   "transformers"), proc.stderr
    assert "it reads: " in lines[0] and ", llama," in lines[0] and "eqc's tests cover: llama," in lines[0]
    assert not out.exists() and sorted((gguf_cache / "eqc").glob("gguf/*")) == cached  # nothing converted or left


@pytest.mark.e2e
def test_a_llama_gguf_named_mistral_exports_as_llama(gguf_cache, tmp_path: pathlib.Path) -> None:
    """transformers reads a "llama" GGUF whose general.name is exactly "mistral" as mistral, then looks up a
    "mistral" tensor-name map gguf-py 0.19 does not have (transformers 5.24: "Unknown gguf model_type: mistral");
    eqc reads it as llama, as any other mistral GGUF, to the same logits as the HF folder."""
    from eqcompiler.export.hf import export

    hf = save_tiny_gguf_source("mistral", tmp_path / "hf", WIKI_VALID.read_text()[:50_000])
    gguf = write_gguf(hf, tmp_path / "named.gguf", name="mistral")
    manifest = export(str(gguf), tmp_path / "fp32-gguf")
    assert manifest["family"] == "llama"
    export(str(hf), tmp_path / "fp32-hf")
    assert rel_err(logits(tmp_path / "fp32-gguf"), logits(tmp_path / "fp32-hf")) <= LOGITS_VS_HF


@pytest.mark.e2e
def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    proc = run_eqc("export", bad, "-o", tmp_path / "out", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot read '{bad}' as a GGUF file:"), proc.stderr
    assert not (tmp_path / "out").exists()


# --- the conversion's own checks, on metadata-only files (no model, no export: `make test-fast` runs these) ---

def metadata_only_gguf(path: pathlib.Path, arch: str, **uint32: int) -> pathlib.Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in uint32.items():
        writer.add_uint32(f"{arch}.{key.replace('__', '.')}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,readable", [("llama", True), ("gemma3", True), ("qwen2moe", True),
                                           ("olmo2", False), ("rwkv6", False)])
def test_check_architecture(tmp_path: pathlib.Path, arch: str, readable: bool) -> None:
    from eqcompiler.errors import EqcError
    from eqcompiler.models.gguf_cache import check_architecture

    path = metadata_only_gguf(tmp_path / "m.gguf", arch)
    if readable:
        assert check_architecture(path) == arch
        return
    with pytest.raises(EqcError) as info:
        check_architecture(path)
    assert str(info.value).startswith(f"GGUF architecture '{arch}' of '{path}' is not one transformers") and \
        info.value.exit_code == 2


def test_restore_dropped_hparams(tmp_path: pathlib.Path) -> None:
    """What transformers' GGUF config mapping drops is read from the file, where the config class has the field."""
    import transformers

    from eqcompiler.models.gguf_cache import restore_dropped_hparams

    qwen3 = transformers.Qwen3Config()
    assert qwen3.head_dim == 128  # the class default a GGUF load would keep
    path = metadata_only_gguf(tmp_path / "q.gguf", "qwen3", attention__key_length=16, context_length=64)
    assert restore_dropped_hparams(qwen3, path) == {"head_dim": 16} and qwen3.head_dim == 16
    gpt2 = transformers.GPT2Config()
    path = metadata_only_gguf(tmp_path / "g.gguf", "gpt2", context_length=128)
    assert restore_dropped_hparams(gpt2, path) == {"n_positions": 128} and gpt2.n_positions == 128
    assert restore_dropped_hparams(gpt2, path) == {}  # already right: nothing changed
