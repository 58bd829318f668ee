"""Export parity for every supported family, with and without past, checked in the test itself."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from eqcompiler.export.hf import causal_example, torch_reference
from eqcompiler.models.loaders import load_source
from eqcompiler.runtime.session import make_session

CAUSAL = ["llama", "gpt2", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("past", [0, 5], ids=["no_past", "with_past"])
def test_causal_parity(family: str, past: int, tiny_hf, tiny_artifact) -> None:
    art = tiny_artifact(family)
    manifest = json.loads((art / "manifest.json").read_text())
    loaded = load_source(str(tiny_hf(family)))
    session = make_session(art / "model.onnx")
    names = [i.name for i in session.get_inputs()]
    feed = causal_example(manifest["kv_cache"], loaded.model.config.vocab_size, batch=2, seq=3, past=past, seed=11)
    ort_out = session.run(None, {n: feed[n] for n in names})
    ref = torch_reference(loaded, feed, names)
    assert len(ort_out) == 1 + 2 * manifest["kv_cache"]["num_layers"]
    for got, want in zip(ort_out, ref):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # present = past + new tokens along the sequence axis
    assert ort_out[1].shape[2] == past + 3


@pytest.mark.parametrize("family", CAUSAL)
def test_manifest_describes_kv_cache(family: str, tiny_artifact) -> None:
    art = tiny_artifact(family)
    manifest = json.loads((art / "manifest.json").read_text())
    kv = manifest["kv_cache"]
    assert kv["num_layers"] == 2 and kv["head_dim"] > 0 and kv["dtype"] == "float32"
    inputs = {i["name"]: i for i in manifest["inputs"]}
    assert inputs["past_key_values.0.key"]["shape"][0] == "batch"
    assert inputs["past_key_values.0.key"]["shape"][2] == "past_sequence"
    assert manifest["parity"]["prompt"] < 1e-4 and manifest["parity"]["decode"] < 1e-4
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    onnx.checker.check_model(str(art / "model.onnx"))


def test_one_graph_serves_prefill_and_decode(tiny_artifact) -> None:
    """Prefill 6 tokens at once == prefill 5 then decode 1 through present->past."""
    from eqcompiler.runtime.session import causal_feed

    session = make_session(tiny_artifact("llama") / "model.onnx")
    ids = np.array([[5, 17, 42, 7, 99, 3]], dtype=np.int64)
    full = session.run(["logits"], causal_feed(session, ids))[0]
    names = [o.name for o in session.get_outputs()]
    outs = session.run(None, causal_feed(session, ids[:, :5]))
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs) if n.startswith("present.")}
    step = session.run(["logits"], causal_feed(session, ids[:, 5:], past=past, past_len=5))[0]
    np.testing.assert_allclose(step[0, -1], full[0, -1], atol=1e-4)


def test_encoder_parity(tiny_hf, tiny_artifact) -> None:
    art = tiny_artifact("bert")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["task"] == "encoder" and "kv_cache" not in manifest
    loaded = load_source(str(tiny_hf("bert")))
    session = make_session(art / "model.onnx")
    ids = np.random.default_rng(0).integers(5, 500, (3, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = session.run(None, feed)[0]
    want = torch_reference(loaded, feed, ["input_ids", "attention_mask", "token_type_ids"])[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_tied_lm_head_is_stored_once(tiny_artifact) -> None:
    """The tracer duplicates a tied table; export reads the embedding through a Transpose instead."""
    from eqcompiler.artifact.folder import load_ir
    from eqcompiler.compile.graph import find_linear_sites

    model = load_ir(tiny_artifact("llama"))
    sites = find_linear_sites(model.graph)
    lm_head = [s for s in sites if s.name.endswith("lm_head")]
    assert len(lm_head) == 1 and lm_head[0].transposed
    assert lm_head[0].weight.name.endswith("embed_tokens.weight")
    assert len(sites) == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + lm_head


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_weights_withheld_from_the_exporter_give_the_same_bytes(family: str, tiny_hf, tmp_path, monkeypatch) -> None:
    """The exporter serializes the graph without its weights (export/hf.py _withheld_initializers: the memory the
    serialized copies took) and they are put back: the artifact is byte for byte the one exported with them
    in the file. Also pins that the hook is taken (the raw file holds no weight), so a torch that drops it
    is noticed here, not as a memory regression."""
    import contextlib

    from eqcompiler.export import hf

    sizes: list[int] = []
    real = hf._torch_export

    def spy(module, args, path, *rest):
        withheld = real(module, args, path, *rest)
        proto = onnx.load(str(path))
        sizes.append(sum(len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * len(t.int64_data)
                         for t in proto.graph.initializer))  # the weight bytes the exporter wrote
        return withheld

    monkeypatch.setattr(hf, "_torch_export", spy)
    hf.export(str(tiny_hf(family)), tmp_path / "withheld")
    monkeypatch.setattr(hf, "_withheld_initializers", lambda withheld: contextlib.nullcontext())
    hf.export(str(tiny_hf(family)), tmp_path / "in_file")
    weights = (tmp_path / "in_file" / "model.onnx.data").stat().st_size
    assert sizes[0] == 0 and sizes[1] > weights / 2  # raw export: no weight bytes, then the weights
    for name in ("model.onnx", "model.onnx.data", "manifest.json"):
        assert (tmp_path / "withheld" / name).read_bytes() == (tmp_path / "in_file" / name).read_bytes(), name
