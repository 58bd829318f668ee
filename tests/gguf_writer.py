"""Test-side GGUF writer: a tiny random-weight Hugging Face model of a family, written as an F32 GGUF.

It writes what transformers' GGUF loader (transformers/modeling_gguf_pytorch_utils.py, integrations/ggml.py,
integrations/gguf/gguf_tokenizer_mapping.py) reads back, i.e. the inverse of each step that loader takes:
- tensor names: gguf's own HF -> GGUF name map (gguf.get_tensor_name_map), as the loader uses it in reverse;
- llama / mistral (GGUF architecture "llama"): q and k rows interleaved per head, the loader undoes it
  (reshape (heads, 2, dim/2) -> (heads, dim/2, 2));
- gemma2 / gemma3: every "*norm.weight" stored as 1 + w (the loader subtracts one);
- gpt2: Conv1D weights stored as (out, in), i.e. transposed; the loader transposes them back;
- tied embeddings: no output.weight tensor (the loader ties when output.weight is absent);
- phi3's fused qkv_proj / gate_up_proj and qwen2's biases go through as they are (plain renames).
The tokenizer, trained on a text and saved with the HF folder too, is a byte-level BPE (tokenizer.ggml.model
"gpt2": tokens in the byte alphabet, merges, token types, bos/eos/pad/unk ids; Qwen2's split for qwen2/qwen3,
tokenizer.ggml.pre "qwen2") or, with vocab="spm", a sentencepiece-style BPE ("llama": pieces, scores ranking them,
byte tokens, no merges, as llama.cpp writes such a vocabulary).

Families whose config GGUF cannot carry (transformers' GGUF config mapping has no key for them) get the
family's defaults instead in GGUF_CONFIG_OVERRIDES, so the HF folder and the GGUF describe the same model.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

# config.model_type -> GGUF general.architecture (mistral is "llama" named "mistral", as llama.cpp writes it)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2", "olmo2": "olmo2"}
NORM_PLUS_ONE = {"gemma2", "gemma3_text"}
GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
# What a tiny config of tests/test_families.py sets that no GGUF key carries to transformers (its GGUF config
# mapping has no entry), so the GGUF of that family is of the family's default for it:
# - mistral: sliding_window (mapped only for gemma2/gemma3);
# - gemma2 / gemma3: query_pre_attn_scalar (no key); gemma3: layer_types (no key; the default pattern applies),
#   rope_local_base_freq (no key).
GGUF_CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": None},
    "gemma2": {"query_pre_attn_scalar": 256},
    "gemma3_text": {"query_pre_attn_scalar": 256, "layer_types": None},
}
# families whose GGUF vocab is Qwen2's (tokenizer.ggml.pre "qwen2": transformers splits text with Qwen2's regex)
QWEN_SPLIT = {"qwen2", "qwen3"}
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]  # ids 0..3: unk, then models.tiny.TINY_TOKEN_IDS (pad 1, bos 2, eos 3)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6  # llama.cpp's token types
SPM_SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def build_bpe_tokenizer(text: str, vocab_size: int, split: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained on `text`: what a GGUF 'gpt2' vocab holds. `split`: a pre-tokenizer
    regex (Qwen2's for qwen2/qwen3, whose tokenizer class imposes it), else GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def build_spm_tokenizer(text: str, vocab_size: int) -> Any:
    """A sentencepiece-style BPE (transformers' LlamaTokenizer: "▁" for spaces, byte fallback) trained on
    `text`: what a GGUF 'llama' vocab holds. Merged tokens get ids in merge order, so scores of -id rank them as
    sentencepiece ranks its pieces."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPM_SPECIALS + BYTE_TOKENS,
                                  show_progress=False, limit_alphabet=64)
    tok.train_from_iterator([text], trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, unk_token="<unk>", pad_token="<pad>",
                          bos_token="<s>", eos_token="</s>")


def save_tiny_gguf_source(family: str, folder: pathlib.Path, text: str, seed: int = 0,
                          initializer_range: float = 0.1, vocab: str = "bpe") -> pathlib.Path:
    """A tiny random HF model of `family` (tests/test_families.py's config, less what GGUF cannot carry) with a
    byte-level BPE tokenizer (vocab "bpe") or a sentencepiece-style one (vocab "spm"), saved in `folder`."""
    import torch
    import transformers

    from eqcompiler.models.tiny import TINY_TOKEN_IDS, tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config(family, initializer_range=initializer_range, **GGUF_CONFIG_OVERRIDES.get(family, {}),
                      **TINY_TOKEN_IDS)
    if family == "gemma3_text":  # layer_types None: rebuilt from the default sliding pattern, as the GGUF load does
        cfg = type(cfg)(**{k: v for k, v in cfg.to_dict().items() if k != "layer_types"})
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if vocab == "spm":
        build_spm_tokenizer(text, cfg.vocab_size).save_pretrained(folder)
        return folder
    split = None
    if family in QWEN_SPLIT:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as split
    build_bpe_tokenizer(text, cfg.vocab_size, split).save_pretrained(folder)
    return folder


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotary halves interleaved (the inverse of the loader's)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: Any, gguf_arch: str) -> list[tuple[str, np.ndarray]]:
    import gguf

    cfg = model.config
    family = cfg.model_type
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for hf_name, value in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # absent output.weight = tied embeddings
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name} in architecture {gguf_arch}")
        name = f"{name}.{suffix}"
        w = value.detach().float().numpy().copy()
        if gguf_arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            w = _permute_qk(w, heads)
        if family in NORM_PLUS_ONE and name.endswith("norm.weight"):
            w = w + 1.0
        if gguf_arch == "gpt2" and name.endswith(GPT2_TRANSPOSED):
            w = np.ascontiguousarray(w.T)
        out.append((name, w))
    return out


def _hparams(writer: Any, cfg: Any, gguf_arch: str) -> None:
    if gguf_arch == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None) and gguf_arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg.sliding_window)


def _vocab(writer: Any, tokenizer: Any, family: str) -> None:
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids are not contiguous"
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    special = set(tokenizer.all_special_tokens)
    if model.get("byte_fallback"):  # sentencepiece: scores rank the pieces, no merges (as llama.cpp writes it)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_token_types([TOKEN_UNKNOWN if t == tokenizer.unk_token else TOKEN_CONTROL if t in special else
                                TOKEN_BYTE if t in BYTE_TOKENS else TOKEN_NORMAL for t in tokens])
        for kind in ("bos", "eos", "pad", "unk"):
            getattr(writer, f"add_{kind}_token_id")(getattr(tokenizer, f"{kind}_token_id"))
        writer.add_add_bos_token(False)  # as the tokenizer above (transformers defaults a 'llama' vocab to True)
        return
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    if family in QWEN_SPLIT:
        writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens])
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)  # the BPE tokenizer above adds no bos either


def write_gguf(src: pathlib.Path, path: pathlib.Path, name: str | None = None) -> pathlib.Path:
    """Write the HF folder `src` (a tiny model and its BPE or sentencepiece tokenizer) as an F32 GGUF at `path`;
    `name`: general.name (default "Tiny <model_type>")."""
    import gguf
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    cfg = model.config
    gguf_arch = GGUF_ARCH.get(cfg.model_type)
    if gguf_arch is None:
        raise ValueError(f"no GGUF architecture for model type {cfg.model_type}")
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    # A mistral GGUF is architecture "llama" (as llama.cpp writes it), named as real files are ("Mistral 7B
    # Instruct v0.3"): transformers reads it as llama. A file named exactly "mistral" transformers reads as mistral
    # and then fails on (gguf-py has no "mistral" tensor map); eqc reads it as llama (models/gguf_cache.py).
    writer.add_name(name or f"Tiny {cfg.model_type}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _hparams(writer, cfg, gguf_arch)
    _vocab(writer, tokenizer, cfg.model_type)
    for name, w in _tensors(model, gguf_arch):
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
