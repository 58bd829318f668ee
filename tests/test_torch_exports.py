"""Bring your own ONNX from torch.onnx: the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, opset 20, weights
in model.onnx.data beside the graph) of tiny LLaMA-, GPT-2- and BERT-shaped models, and the TorchScript exporter
(dynamo=False) of a GPT-2, each taken through calibrate, compile (w8, w8a8 / w8a8-dynamic, w4-rtn) and eval, and
compared with `eqc export` of the same weights."""
from __future__ import annotations

import json
import pathlib
import warnings

import onnx
import pytest

from conftest import WIKI_TEST, WIKI_VALID, eqc_bert_w8a8_dynamic, linear_layers, run_eqc, smoothing_summary

PPL = ["--ppl", WIKI_TEST, "--max-tokens", "512", "--window", "64", "--no-latency", "--json"]
LINEAR = {"llama": 15, "gpt2": 9, "bert": 12}  # 2 layers x (7 llama, 4 gpt2, 6 bert) + lm_head (none for bert)
# Foreign w8a8-dynamic vs eqc export's on the tiny models (504 tokens): measured LLaMA dynamo 456.17133 vs eqc
# export's 456.17135 (5e-8).
W8A8_DYNAMIC_VS_EQC = 1e-5



def torch_export(hf: pathlib.Path, family: str, path: pathlib.Path, dynamo: bool) -> pathlib.Path:
    """What a user's export script does: the HF model behind a module with positional inputs, dynamic batch and
    sequence, no KV cache (use_cache=False) for the causal LMs."""
    import torch
    import transformers

    encoder = family == "bert"
    model = (transformers.AutoModel if encoder else transformers.AutoModelForCausalLM).from_pretrained(hf).eval()

    class Causal(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    class Encoder(Causal):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    ids = torch.randint(5, 100, (2, 16))
    args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if encoder else ())
    names = ["input_ids", "attention_mask"] + ["token_type_ids"] * encoder
    output = "last_hidden_state" if encoder else "logits"
    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        axes = {"dynamic_shapes": {n: {0: batch, 1: seq} for n in names}}
    else:
        axes = {"dynamic_axes": {n: {0: "batch", 1: "sequence"} for n in [*names, output]}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export((Encoder if encoder else Causal)().eval(), args, str(path), input_names=names,
                          output_names=[output], dynamo=dynamo, **axes)
    return path


@pytest.fixture(scope="module")
def eqc_ppl(tiny_artifact, tmp_path_factory):
    """Factory: `eqc export` of the same weights: perplexity float, w8 and w8a8-dynamic (calibrated as the foreign
    graph is), and how w8a8-dynamic treated the graph (smoothing_summary), cached per family."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            art = tiny_artifact(family)
            work = tmp_path_factory.mktemp(f"eqc-{family}")
            run_eqc("compile", art, "--recipe", "w8", "-o", work / "w8")
            run_eqc("calibrate", art, "--data", WIKI_VALID, "--samples", "4", "--seq-len", "64", "--for", "w8a8-dynamic",
                    "-o", work / "stats.npz")
            run_eqc("compile", art, "--recipe", "w8a8-dynamic", "--calib", work / "stats.npz", "-o", work / "w8a8-dynamic")
            cache[family] = {m: json.loads(run_eqc("eval", p, *PPL).stdout)["ppl"]
                             for m, p in (("fp32", art), ("w8", work / "w8"), ("w8a8-dynamic", work / "w8a8-dynamic"))}
            cache[family]["summary"] = smoothing_summary(work / "w8a8-dynamic")
        return cache[family]

    return get


@pytest.mark.parametrize("family,dynamo", [("llama", True), ("gpt2", True), ("gpt2", False)])
def test_torch_exported_causal_lm_matches_eqc_export(tiny_hf, eqc_ppl, tmp_path, family, dynamo):
    hf = tiny_hf(family)
    graph = torch_export(hf, family, tmp_path / "src" / "model.onnx", dynamo)
    proto = onnx.load(str(graph), load_external_data=False)
    # dynamo: opset 20 with the weights in model.onnx.data (eqc runs from another folder: the opset conversion
    # must keep them readable); TorchScript: opset 20 too, weights inside the graph.
    assert proto.opset_import[0].version == 20 and (graph.parent / "model.onnx.data").is_file() == dynamo
    assert json.loads(run_eqc("inspect", graph, "--json").stdout)["kind"]["kind"] == "causal-lm-nocache"
    stats = tmp_path / "stats.npz"
    run_eqc("calibrate", graph, "--data", WIKI_VALID, "--samples", "4", "--seq-len", "64", "--tokenizer", hf,
            "--for", "w8a8-dynamic", "-o", stats)
    for recipe in ("w8", "w8a8-dynamic", "w4-rtn"):
        run_eqc("compile", graph, "--recipe", recipe, "--calib", stats, "-o", tmp_path / recipe)
        assert linear_layers(tmp_path / recipe) == LINEAR[family], recipe
    ppl = {"fp32": json.loads(run_eqc("eval", graph, *PPL, "--tokenizer", hf).stdout)["ppl"]}
    ppl.update({r: json.loads(run_eqc("eval", tmp_path / r, *PPL).stdout)["ppl"] for r in ("w8", "w8a8-dynamic", "w4-rtn")})
    ref = eqc_ppl(family)
    # Measured (torch 2.13, ORT 1.32, 504 tokens): fp32 llama 456.278 and gpt2 479.187, the same as eqc export's;
    # w8 llama 456.098 (eqc export 456.102), gpt2 479.245 / 479.240 (dynamo / TorchScript); w8a8-dynamic within
    # 0.06% of fp32, w4-rtn within 0.3%.
    assert ppl["fp32"] == pytest.approx(ref["fp32"], rel=1e-5)
    assert ppl["w8"] != ppl["fp32"] and ppl["w8"] == pytest.approx(ref["w8"], rel=2e-4)
    assert ppl["w8a8-dynamic"] == pytest.approx(ppl["fp32"], rel=2e-3)
    # w8a8-dynamic treats the foreign graph as eqc export's (issue 20): the same smoothed sites per kind (dynamo's
    # o_proj sites were skipped when the v projection was looked up by name), the same per-token inputs, and the
    # lm_head (dynamo: node_linear_*, missed by `^lm_head$`) neither smoothed nor quantized per token.
    summary = smoothing_summary(tmp_path / "w8a8-dynamic")
    assert summary == ref["summary"] and summary["lm_heads"] == 1 and not summary["lm_head_smoothed"], summary
    assert summary["lm_head_input"] != ["DequantizeLinear"]
    assert ppl["w8a8-dynamic"] == pytest.approx(ref["w8a8-dynamic"], rel=W8A8_DYNAMIC_VS_EQC)
    assert ppl["w4-rtn"] != ppl["w8"] and ppl["w4-rtn"] == pytest.approx(ppl["fp32"], rel=1e-2)


def test_dynamo_exported_bert_matches_eqc_export(tiny_hf, tiny_artifact, tmp_path):
    hf, ref = tiny_hf("bert"), tiny_artifact("bert")
    graph = torch_export(hf, "bert", tmp_path / "src" / "model.onnx", dynamo=True)
    kind = json.loads(run_eqc("inspect", graph, "--json").stdout)["kind"]
    assert kind["kind"] == "encoder" and "token_type_ids" in kind["why"]
    stats = tmp_path / "stats.npz"
    run_eqc("calibrate", graph, "--data", WIKI_VALID, "--samples", "8", "--seq-len", "16", "--tokenizer", hf,
            "--for", "w8a8-dynamic", "-o", stats)
    cosine = {}
    for recipe in ("fp32", "w8", "w8a8", "w8a8-dynamic", "w4-rtn"):
        model = graph
        if recipe != "fp32":
            model = tmp_path / recipe
            run_eqc("compile", graph, "--recipe", recipe, "--calib", stats, "-o", model)
            assert linear_layers(model) == LINEAR["bert"], recipe
        cosine[recipe] = json.loads(run_eqc("eval", model, "--embed-ref", ref, "--tokenizer", hf, "--sentences", "40",
                                            "--no-latency", "--json").stdout)["embedding"]["min_cosine"]
    # Measured against eqc export's float graph: fp32 1.0000000, w8 0.999997, w8a8 0.999997, w4-rtn 0.99997.
    assert cosine["fp32"] > 1 - 1e-6
    assert 0.9999 < cosine["w8"] < cosine["fp32"] and 0.9999 < cosine["w8a8"] < cosine["fp32"]
    assert 0.999 < cosine["w4-rtn"] < min(cosine["w8"], cosine["w8a8"])
    # SmoothQuant finds the same sites as on eqc export's BERT: the attention-output dense through its value
    # projection (found by the probs x V path; before, by 'value' in a name, and dynamo names it node_MatMul_*:
    # "found no smoothable activation"). The post-LN inputs also feed the residual, on every graph.
    summary = smoothing_summary(tmp_path / "w8a8-dynamic")
    assert summary == eqc_bert_w8a8_dynamic(ref, tmp_path) and summary["sites"] == {"attn": 2}, summary
    assert 0.9999 < cosine["w8a8-dynamic"] < cosine["fp32"]


def torch_export_with_cache(hf: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """torch.onnx dynamo of a LLaMA forward with its KV cache: past_key_values.{i}.key|value in (a DynamicCache
    filled from them), logits and present.{i}.key|value out; batch, sequence and past length dynamic."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    cfg = model.config
    layers, kv_heads, head = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
            cache = transformers.DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    ids = torch.randint(5, 100, (2, 5))
    past = [torch.randn(2, kv_heads, 3, head) for _ in range(2 * layers)]
    kv = [f"{i}.{t}" for i in range(layers) for t in ("key", "value")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithPast().eval(), (ids, torch.ones(2, 8, dtype=torch.int64), torch.arange(3, 8).expand(2, 5),
                                              *past), str(path),
                          input_names=["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
                          output_names=["logits"] + [f"present.{n}" for n in kv], dynamo=True,
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                                          tuple({0: batch, 2: past_len} for _ in kv)))
    return path


def test_dynamo_exported_llama_with_kv_cache_matches_eqc_export(tiny_hf, tiny_artifact, eqc_ppl, tmp_path):
    """Issue 20 (a): torch 2.13's dynamo exports the forward with a DynamicCache filled from past inputs; eqc detects
    a causal LM with a cache, reads the KV layout from the declared past shapes (no config.json beside the graph),
    and calibrate / compile / eval give eqc export's numbers."""
    hf = tiny_hf("llama")
    graph = torch_export_with_cache(hf, tmp_path / "src" / "model.onnx")
    kind = json.loads(run_eqc("inspect", graph, "--json").stdout)["kind"]
    assert kind["kind"] == "causal-lm" and "4 past_key_values" in kind["why"], kind
    stats = tmp_path / "stats.npz"
    run_eqc("calibrate", graph, "--data", WIKI_VALID, "--samples", "4", "--seq-len", "64", "--tokenizer", hf,
            "--for", "w8a8-dynamic", "-o", stats)
    eqc_kv = json.loads((tiny_artifact("llama") / "manifest.json").read_text())["kv_cache"]
    for recipe in ("w8", "w8a8-dynamic"):
        run_eqc("compile", graph, "--recipe", recipe, "--calib", stats, "-o", tmp_path / recipe)
        assert linear_layers(tmp_path / recipe) == LINEAR["llama"], recipe
        kv = json.loads((tmp_path / recipe / "manifest.json").read_text())["kv_cache"]
        assert (kv["num_kv_heads"], kv["head_dim"], kv["num_layers"]) == (eqc_kv["num_kv_heads"], eqc_kv["head_dim"], 2)
    ppl = {"fp32": json.loads(run_eqc("eval", graph, *PPL, "--tokenizer", hf).stdout)["ppl"]}
    ppl.update({r: json.loads(run_eqc("eval", tmp_path / r, *PPL).stdout)["ppl"] for r in ("w8", "w8a8-dynamic")})
    ref = eqc_ppl("llama")
    # Measured (504 tokens): fp32 456.27836, w8 456.09786, w8a8-dynamic 456.17133 (eqc export: 456.27836, 456.09787,
    # 456.17135), as the dynamo graph without cache gives.
    assert ppl["fp32"] == pytest.approx(ref["fp32"], rel=1e-5)
    assert ppl["w8"] != ppl["fp32"] and ppl["w8"] == pytest.approx(ref["w8"], rel=2e-4)
    assert ppl["w8a8-dynamic"] == pytest.approx(ref["w8a8-dynamic"], rel=W8A8_DYNAMIC_VS_EQC)
    assert smoothing_summary(tmp_path / "w8a8-dynamic") == ref["summary"]
    # The cache loop runs on it: greedy generation through past/present.
    assert "tokens" in run_eqc("generate", tmp_path / "w8", "--prompt", "The history of", "--max-new-tokens", "4").stdout
