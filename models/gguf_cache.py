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

DONE_MARKER = ".eqc-converted"
CONVERSION_VERSION = 2  # 2: the hyperparameters transformers drops are restored (DROPPED_HPARAMS)

# family (config.model_type, or "*" for any) -> {GGUF key after "<architecture>.": config field}; applied only
# where the config class has that field and the file states the key.
DROPPED_HPARAMS: dict[str, dict[str, str]] = {
    "*": {"attention.key_length": "head_dim"},
    "gpt2": {"context_length": "n_positions"},
}


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
        tokenizer.save_pretrained(stage)
        (stage / DONE_MARKER).write_text(json.dumps({"source": str(folder / gguf_file)}) + "\n")


def gguf_metadata(path: pathlib.Path, keys: set[str]) -> dict[str, Any]:
    """The scalar metadata values of `keys` a GGUF file states (absent keys are left out)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    values = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None and len(field.data) == 1:
            values[key] = field.contents()
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
