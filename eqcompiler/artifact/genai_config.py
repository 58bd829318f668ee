"""genai_config.json: what onnxruntime-genai needs to load a causal-LM artifact (`og.Model(folder)`).

Written from the artifact's own manifest (input/output names, KV layout, tokens) and its config.json.
eqc's portable graphs concatenate past and new keys, so `past_present_share_buffer` is false for them and
true for a fused ort-cpu graph whose attention (GroupQueryAttention) is the only reader of the past;
position_ids are an input, which GenAI feeds when the config names it.
An artifact that uses eqc's ops carries the op library (copied beside the model by the compile step) and
names it here, relative to the folder, so the folder loads as it is, wherever it is moved.
A KV cache quantized with per-token scales and zero points carries them as extra past/present tensors, which
GenAI does not feed (measured with onnxruntime-genai 0.18: "Missing Input: past_key_values.0.value_zero_point"):
such an artifact gets no genai_config.json. A cache of codes only (int8, or uint8 / packed 4-bit with frozen
scales) runs in GenAI as it is, fused into GroupQueryAttention or not (tests/test_kv_gqa.py).
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

GENAI_CONFIG_FILE = "genai_config.json"
# GenAI model types whose decoder it runs through the generic decoder-only path eqc's graphs fit.
GENAI_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "olmo", "granite",
               "smollm3", "gpt2", "phi", "nemotron", "chatglm", "ernie4_5"}


def _config_value(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            return config[key]
    return None


def _cache_names(pattern: str, kind: str) -> str:
    """The manifest's 'past_key_values.{layer}.{key|value}' as GenAI's 'past_key_values.%d.key'."""
    return pattern.replace("{layer}", "%d").replace("{key|value}", kind)


def genai_cannot_run(manifest: dict[str, Any]) -> str | None:
    """Why onnxruntime-genai cannot run this causal LM's graph, or None."""
    extra = sorted(spec["name"] for spec in manifest.get("inputs", [])
                   if str(spec.get("name", "")).startswith("past_key_values.")
                   and str(spec["name"]).endswith(("_scale", "_zero_point")))
    if extra:
        return (f"its KV cache carries per-token scales/zero points ({extra[0]}, ...) that onnxruntime-genai does not "
                "feed (compile with --kv-values channel, or --kv-scheme symmetric)")
    return None


def genai_config(manifest: dict[str, Any], hf_config: dict[str, Any], custom_ops_library: str | None) -> dict[str, Any] | None:
    """The config for a causal LM with a KV cache, else None (GenAI generates with causal LMs only)."""
    kv = manifest.get("kv_cache")
    if manifest.get("task") != "causal-lm" or not kv or genai_cannot_run(manifest):
        return None
    inputs = {spec["name"] for spec in manifest.get("inputs", [])}
    tokens = manifest.get("tokenizer") or {}
    eos = tokens.get("eos_token_id")
    bos = tokens.get("bos_token_id")
    pad = tokens.get("pad_token_id")
    heads = _config_value(hf_config, "num_attention_heads", "n_head")
    hidden = _config_value(hf_config, "hidden_size", "n_embd")
    if heads is None or hidden is None or _config_value(hf_config, "vocab_size") is None:
        return None  # a graph without an HF config.json (a builder folder): GenAI needs these numbers
    context = _config_value(hf_config, "max_position_embeddings", "n_positions") or 2048
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops_library:
        session_options["custom_ops_library"] = custom_ops_library
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask",
             "past_key_names": _cache_names(kv["past_input"], "key"),
             "past_value_names": _cache_names(kv["past_input"], "value")}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    family = str(manifest.get("family") or hf_config.get("model_type") or "llama")
    # The fused ort-cpu graph reads its past only in GroupQueryAttention, which updates a preallocated cache in
    # place: GenAI then passes one buffer as past and present (no copy of the cache per token).
    fused = ((manifest.get("quantization") or {}).get("report") or {}).get("fuse_group_query_attention") or {}
    share_buffer = fused.get("kv_buffer") == "shareable"
    decoder = {
        "session_options": session_options,
        "filename": manifest.get("model_file", "model.onnx"),
        "head_size": kv["head_dim"],
        "hidden_size": hidden,
        "inputs": names,
        "outputs": {"logits": "logits", "present_key_names": _cache_names(kv["present_output"], "key"),
                    "present_value_names": _cache_names(kv["present_output"], "value")},
        "num_attention_heads": heads,
        "num_hidden_layers": kv["num_layers"],
        "num_key_value_heads": kv["num_kv_heads"],
    }
    return {
        "model": {
            "bos_token_id": bos if bos is not None else eos,
            "context_length": context,
            "decoder": decoder,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos,
            "type": family if family in GENAI_TYPES else "llama",
            "vocab_size": _config_value(hf_config, "vocab_size"),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(folder: pathlib.Path, manifest: dict[str, Any], op_library: pathlib.Path | None = None,
                       source: pathlib.Path | None = None) -> bool:
    """Write genai_config.json into `folder` when the artifact is a causal LM; True when written.
    `op_library`: eqc's op library the graph needs; it is copied into the folder and named relative to it.
    `source`: the folder the graph came from; a graph without an HF config.json whose folder has a genai_config.json
    (onnxruntime-genai's builder wrote it) keeps that one, since compiling keeps the graph's inputs and outputs."""
    custom_ops_library = None
    if op_library is not None:
        shutil.copyfile(op_library, folder / op_library.name)
        custom_ops_library = op_library.name
    if genai_cannot_run(manifest):
        return False
    config_path = folder / "config.json"
    try:
        hf_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        hf_config = {}
    config = genai_config(manifest, hf_config if isinstance(hf_config, dict) else {}, custom_ops_library)
    if config is None and manifest.get("task") == "causal-lm" and source is not None:
        config = _source_config(source / GENAI_CONFIG_FILE, manifest, custom_ops_library)
    if config is None:
        return False
    (folder / GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def _source_config(path: pathlib.Path, manifest: dict[str, Any], custom_ops_library: str | None) -> dict[str, Any] | None:
    """The source folder's genai_config.json for the compiled graph (its file name and eqc's op library set)."""
    try:
        config = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        decoder = config["model"]["decoder"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(decoder, dict):
        return None
    decoder["filename"] = manifest.get("model_file", "model.onnx")
    options = decoder.setdefault("session_options", {})
    if isinstance(options, dict):
        options.pop("custom_ops_library", None)
        if custom_ops_library:
            options["custom_ops_library"] = custom_ops_library
    return config

