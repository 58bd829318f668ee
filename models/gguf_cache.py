"""A GGUF file converted once into a Hugging Face folder in the user cache, then loaded from there.

transformers reads a GGUF's metadata again for the config, the weights and the tokenizer, and each read
walks every vocabulary string (about 5 s each for SmolLM2's 49k tokens), then dequantizes every tensor:
30 s per export. Converted once (config without GGUF's quantization_config, float32 safetensors, the
tokenizer with its special tokens fixed), later loads take a few seconds. The cache key is the GGUF's
bytes, the special-token fixes, the transformers version and CONVERSION_VERSION, so a changed file or
conversion is redone.

transformers' GGUF config mapping drops some hyperparameters a GGUF states (DROPPED_HPARAMS: qwen3 has no
`attention.key_length` -> head_dim, gpt2 maps `context_length` to n_ctx, which GPT2Config does not read, not to
n_positions), so such a file loads with the config class's defaults and fails on the weight shapes; they are
read back from the file's metadata here.

A "llama" GGUF whose general.name is exactly "mistral" is read by transformers as mistral, whose weights it then
cannot name (gguf-py has no "mistral" tensor map): it is read as llama, as every other mistral GGUF is (llama.cpp
writes mistral as architecture "llama", and no GGUF key carries mistral's sliding window).

The tokenizer transformers builds from a GGUF is right, but saving it names the family's tokenizer class
(GemmaTokenizer for a gemma2 file), and that class rebuilds its own normalizer and pre-tokenizer when the
folder is read again: a byte-level vocabulary in a gemma2 GGUF would come back sentencepiece-normalized, every
space an unknown token. The saved folder is read back and compared on PROBE_TEXT; where the family's class
changes it, the folder names transformers' generic class instead, which reads tokenizer.json as saved.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import pathlib
import warnings
from typing import Any, Callable

from eqcompiler.artifact.atomic import staged_dir
from eqcompiler.artifact.user_cache import cache_root
from eqcompiler.errors import EqcError

DONE_MARKER = ".eqc-converted"
CONVERSION_VERSION = 2  # 2: dropped hyperparameters restored, the tokenizer saved so that it reloads the same,
# a "llama" file named "mistral" read as llama

# family (config.model_type, or "*" for any) -> {GGUF key after "<architecture>.": config field}; applied only
# where the config class has that field and the file states the key.
DROPPED_HPARAMS: dict[str, dict[str, str]] = {
    "*": {"attention.key_length": "head_dim"},
    "gpt2": {"context_length": "n_positions"},
}
# spaces (leading, repeated), newlines, digits, punctuation, accents, CJK, an emoji, and the special-token texts
PROBE_TEXT = " Hello  world!\n\n 2024: the café's naïve résumé, 3.14 — 你好 🙂\t<s></s><unk><pad> end "
GENERIC_TOKENIZER_CLASS = "TokenizersBackend"
# GGUF general.architecture spellings transformers' loader renames before it looks an architecture up
# (load_gguf_checkpoint), so that the check below agrees with it.
FILE_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                     "minimax-m2": "minimax_m2", "t5encoder": "t5"}
# GGUF architectures eqc's tests export from a GGUF written from a tiny model (tests/test_gguf_families.py);
# a mistral GGUF is architecture "llama".
TESTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2")


def cache_key(gguf_path: pathlib.Path, special_tokens: dict[str, Any] | None) -> str:
    import transformers

    digest = hashlib.sha256()
    with open(gguf_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    digest.update(json.dumps({"special": special_tokens or {}, "transformers": transformers.__version__,
                              "conversion": CONVERSION_VERSION}, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def converted_folder(folder: pathlib.Path, gguf_file: str, special_tokens: dict[str, Any] | None,
                     fix_tokens: Callable[[Any, Any], None]) -> pathlib.Path:
    """The HF folder holding `folder/gguf_file` converted; converts it on the first call. Concurrent callers
    (parallel exports, test workers) wait on one lock: one converts, the others read its result."""
    target = cache_root() / "gguf" / cache_key(folder / gguf_file, special_tokens)
    if (target / DONE_MARKER).is_file():
        return target
    check_architecture(folder / gguf_file)  # a file transformers cannot read is refused before converting
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / DONE_MARKER).is_file():
            _convert(folder, gguf_file, fix_tokens, target)
    return target


def _convert(folder: pathlib.Path, gguf_file: str, fix_tokens: Callable[[Any, Any], None],
             target: pathlib.Path) -> None:
    import torch
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        restore_dropped_hparams(config, folder / gguf_file)
        config = llama_named_mistral(config, folder / gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, config=config,
                                                                  dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    fix_tokens(model, tokenizer)
    # transformers refuses to save a model it loaded through its GGUF quantizer: rebuild it from the config
    # without GGUF's quantization_config (the weights are float32 now) and move the weights over.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    with staged_dir(target, overwrite=True) as stage:  # a half-written folder (no marker) is replaced
        model.save_pretrained(stage)
        save_tokenizer_faithfully(tokenizer, stage)
        (stage / DONE_MARKER).write_text(json.dumps({"source": str(folder / gguf_file)}) + "\n")


def gguf_metadata(path: pathlib.Path, keys: set[str]) -> dict[str, Any]:
    """The scalar metadata values of `keys` a GGUF file states (absent keys are left out)."""
    from gguf import GGUFReader

    from gguf import GGUFValueType

    reader = GGUFReader(str(path))
    values: dict[str, Any] = {}
    for key in keys:
        field = reader.fields.get(key)  # parts/data/types: the reader's layout since gguf 0.10 (pyproject's floor)
        if field is None or len(field.data) != 1 or not field.types:
            continue
        part = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            values[key] = bytes(part).decode("utf-8")
        elif field.types[0] != GGUFValueType.ARRAY:
            values[key] = part.tolist()[0]
    return values


def restore_dropped_hparams(config: Any, path: pathlib.Path) -> dict[str, Any]:
    """Set on `config` the DROPPED_HPARAMS the GGUF at `path` states; returns what was changed."""
    family = str(config.model_type)
    wanted = {**DROPPED_HPARAMS["*"], **DROPPED_HPARAMS.get(family, {})}
    arch = gguf_metadata(path, {"general.architecture"}).get("general.architecture", "")
    stated = gguf_metadata(path, {f"{arch}.{key}" for key in wanted})
    changed = {}
    for key, field in wanted.items():
        value = stated.get(f"{arch}.{key}")
        if value is not None and hasattr(config, field) and getattr(config, field) != value:
            setattr(config, field, value)
            changed[field] = value
    return changed


def transformers_gguf_architectures() -> list[str]:
    """The GGUF architectures this transformers reads (its GGUF config mappings), in its spelling."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

    return sorted((set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}) | set(GGUF_CONFIG_ARCHS))


def check_architecture(path: pathlib.Path) -> str:
    """The file's general.architecture; EqcError (one line, exit 2) for an unreadable file or an architecture
    transformers cannot read from GGUF, naming it, what transformers reads and what eqc has tested."""
    import transformers

    try:
        arch = str(gguf_metadata(path, {"general.architecture"}).get("general.architecture") or "")
    except Exception as exc:  # gguf raises ValueError / struct errors / OSError on a file that is not GGUF
        raise EqcError(f"cannot read '{path}' as a GGUF file: {exc}") from None
    if not arch:
        raise EqcError(f"GGUF file '{path}' names no architecture (general.architecture)")
    readable = transformers_gguf_architectures()
    if arch not in readable and FILE_ARCH_RENAMES.get(arch) not in readable:
        raise EqcError(f"GGUF architecture '{arch}' of '{path}' is not one transformers {transformers.__version__} "
                       f"reads from GGUF (it reads: {', '.join(readable)}; eqc's tests cover: "
                       f"{', '.join(TESTED_ARCHITECTURES)}); export the model's Hugging Face folder instead")
    return arch


def _encodes(tokenizer: Any) -> tuple[list[int], str]:
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return ids, tokenizer.decode(ids)


def save_tokenizer_faithfully(tokenizer: Any, folder: pathlib.Path) -> None:
    """Save `tokenizer` into `folder` so that AutoTokenizer reads back one that encodes PROBE_TEXT to the same
    ids and decodes them to the same text; EqcError if neither its own class nor the generic one does."""
    import transformers

    tokenizer.save_pretrained(folder)
    want = _encodes(tokenizer)
    if _encodes(transformers.AutoTokenizer.from_pretrained(folder)) == want:
        return
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    family_class = config.get("tokenizer_class")
    config["tokenizer_class"] = GENERIC_TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if _encodes(transformers.AutoTokenizer.from_pretrained(folder)) != want:
        raise EqcError(f"the tokenizer converted from GGUF does not read back the same from a saved folder (as "
                       f"{family_class} or {GENERIC_TOKENIZER_CLASS}); this GGUF's tokenizer is not supported")


def llama_named_mistral(config: Any, path: pathlib.Path) -> Any:
    """A LlamaConfig for a "llama" GGUF transformers read as mistral (general.name "mistral"); else `config`."""
    import transformers

    if config.model_type != "mistral":
        return config
    if gguf_metadata(path, {"general.architecture"}).get("general.architecture") != "llama":
        return config
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "sliding_window", "architectures")}
    return transformers.LlamaConfig.from_dict(values)
