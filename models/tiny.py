"""Tiny random-weight models of each supported family, saved as Hugging Face folders.

Used by tests and fuzzing for export and structure checks. They carry a small word-level
tokenizer built from text, so calibrate/eval work on them exactly as on a real model.
"""
from __future__ import annotations

import collections
import pathlib
from typing import Any

from eqcompiler.errors import EqcError

TINY_VOCAB = 512
# Sliding-window attention in the tiny configs that have it: shorter than the export's parity prompt (7 tokens)
# and decode step (9 cached + 1), and than the tests' prompts, so the window's mask is exercised, not idle.
TINY_SLIDING_WINDOW = 5
# Token ids of build_tokenizer's specials, for configs whose defaults point past TINY_VOCAB (phi3's pad 32000).
TINY_TOKEN_IDS = dict(pad_token_id=1, bos_token_id=2, eos_token_id=3)


def tiny_config(family: str, **overrides: Any) -> Any:
    """A tiny random-weight config of a family, for export and structure tests (head_dim 16 everywhere, so
    ORT's fused attention can apply)."""
    import transformers

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    window = TINY_SLIDING_WINDOW
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)  # tied, like SmolLM2
    elif family == "mistral":  # sliding window on every layer
        cfg = transformers.MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=window, **common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = transformers.Phi3Config(num_key_value_heads=2, **TINY_TOKEN_IDS, **common)
    elif family == "gemma2":  # attention and final-logit soft-capping, sliding / full layers, as its defaults
        cfg = transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                        sliding_window=window, **TINY_TOKEN_IDS, **common)
    elif family == "gemma3_text":  # Gemma3ForCausalLM: q/k norms, local and global rotary bases
        cfg = transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                            sliding_window=window,
                                            layer_types=["sliding_attention", "full_attention"],
                                            **TINY_TOKEN_IDS, **common)
    elif family == "olmo2":  # q/k norms over the whole projection, norms after attention and MLP
        cfg = transformers.Olmo2Config(num_key_value_heads=2, **TINY_TOKEN_IDS, **common)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    elif family == "bert":
        cfg = transformers.BertConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128)
    else:
        raise EqcError(f"no tiny config for family '{family}'")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tokenizer(text: str, vocab_size: int = TINY_VOCAB, framed: bool = False) -> Any:
    """A word-level tokenizer over the most frequent words of `text` (id 0 = unknown); framed: it
    wraps each text in [CLS] ... [SEP] as BERT's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(text.split())
    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for w, _ in counts.most_common(vocab_size - len(specials)) if w not in specials]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if framed:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")


def save_tiny_model(family: str, folder: pathlib.Path, text: str, seed: int = 0, **overrides: Any) -> pathlib.Path:
    """Write a tiny random model of `family` plus a word-level tokenizer into `folder`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cfg._attn_implementation = "eager"
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_tokenizer(text, cfg.vocab_size, framed=family == "bert").save_pretrained(folder)
    return folder
