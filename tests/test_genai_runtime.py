"""onnxruntime-genai loads eqc artifacts (genai_config.json written by export and compile, eqc's op library
carried beside the model) and generates the same greedy tokens as eqc's own runtime."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install '.[test]')")


def genai_greedy(folder: pathlib.Path, ids: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out: list[int] = []
    while not generator.is_done() and len(out) < new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def eqc_greedy(folder: pathlib.Path, ids: list[int], new_tokens: int) -> list[int]:
    """eqc's runtime, as `eqc generate` runs it (one prefill, then one token per step), from token ids."""
    from eqcompiler.runtime.decode import CacheRunner
    from eqcompiler.runtime.session import make_session

    eos = json.loads((folder / "manifest.json").read_text())["tokenizer"]["eos_token_id"]
    runner = CacheRunner(make_session(folder / "model.onnx", threads=1))
    logits = runner.step(np.array([ids], dtype=np.int64))
    out: list[int] = []
    while len(out) < new_tokens:
        out.append(int(np.argmax(logits[0, -1])))
        if out[-1] == eos:
            break
        logits = runner.step(np.array([[out[-1]]], dtype=np.int64))
    return out


def test_export_writes_a_genai_config_that_matches_the_graph(llama):
    config = json.loads((llama / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 2 and decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 16
    assert decoder["num_attention_heads"] == 4 and decoder["hidden_size"] == 64
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert config["search"]["past_present_share_buffer"] is False
    assert "custom_ops_library" not in decoder["session_options"]  # a plain ONNX graph needs no library
    assert config["model"]["context_length"] == 128 and config["model"]["vocab_size"] == 512


@pytest.mark.parametrize("recipe,target", [("none", "portable"), ("w8", "ort-cpu"), ("w4-rtn", "ort-cpu"),
                                           ("w8a8-dynamic", "ort-cpu")])
def test_genai_generates_the_tokens_eqc_generates(llama, tiny_llama_stats, recipe, target, tmp_path):
    from eqcompiler.compile.pipeline import compile_model

    out = tmp_path / recipe
    calib = str(tiny_llama_stats) if recipe == "w8a8-dynamic" else None
    manifest = compile_model(llama, recipe, out, calib=calib, target=target)
    config = json.loads((out / "genai_config.json").read_text())
    # ort-cpu fuses attention into GroupQueryAttention, the past's only reader: GenAI shares one cache buffer
    assert config["search"]["past_present_share_buffer"] is (target == "ort-cpu")
    library = config["model"]["decoder"]["session_options"].get("custom_ops_library")
    if manifest.get("runtime_requirements"):  # eqc's ops: the folder carries the library GenAI loads
        assert library == "libeqc_ops.so" and (out / library).is_file()
    else:
        assert library is None
    # moved elsewhere, the folder still loads: nothing in it points back to where it was made
    moved = shutil.copytree(out, tmp_path / "moved" / recipe)
    ids = [5, 17, 42, 99, 7, 250, 13]
    assert genai_greedy(moved, ids, 12) == eqc_greedy(out, ids, 12)


@pytest.mark.slow
def test_smollm2_genai_text_equals_eqc_generate(smollm2_w8a8_dynamic, tmp_path):
    """The real model lowered for ort-cpu (fused attention, eqc's int8 GEMM) through GenAI's own tokenizer and
    generate loop: the same text as `eqc generate`."""
    from eqcompiler.compile.pipeline import compile_model
    from eqcompiler.runtime.decode import generate

    out = tmp_path / "w8a8-dynamic-cpu"
    manifest = compile_model(smollm2_w8a8_dynamic, "none", out, target="ort-cpu")
    assert manifest["quantization"]["report"]["fuse_group_query_attention"]["fused"] == 30
    prompt = "The history of the city begins"
    ours = generate(out, prompt, max_new_tokens=24)
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    ids = list(tokenizer.encode(prompt))
    theirs = genai_greedy(out, ids, 24)
    assert theirs == ours["tokens"], (tokenizer.decode(theirs), ours["text"])
    assert len(theirs) == 24
