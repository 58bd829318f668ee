"""Calibration and evaluation text: reading, tokenizing, cutting into fixed windows."""
from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Iterator

import numpy as np

from eqcompiler.errors import EqcError

DEFAULT_DATA_DIRS = ("../shared/data/wikitext-2", "shared/data/wikitext-2", "../../shared/data/wikitext-2")


def find_wikitext(split: str) -> pathlib.Path:
    """The bundled WikiText-2 split, searched beside the repo (EQC_WIKITEXT overrides)."""
    import os

    env = os.environ.get("EQC_WIKITEXT")
    candidates = [pathlib.Path(env)] if env else []
    here = pathlib.Path(__file__).resolve()
    for base in (pathlib.Path.cwd(), *here.parents):
        candidates += [base / d for d in DEFAULT_DATA_DIRS]
    for folder in candidates:
        if (folder / f"{split}.txt").is_file():
            return folder / f"{split}.txt"
    raise EqcError(f"WikiText-2 '{split}.txt' not found (set EQC_WIKITEXT to the folder holding it)")


def read_text(path: str | pathlib.Path) -> tuple[str, str]:
    """Return (text, sha256) of a UTF-8 text file; refuse missing, empty or non-UTF-8 files."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise EqcError(f"text file '{p}' does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EqcError(f"text file '{p}' is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise EqcError(f"text file '{p}' is empty")
    return text, hashlib.sha256(raw).hexdigest()


def load_tokenizer(folder: pathlib.Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise EqcError(f"no usable tokenizer in '{folder}': {type(exc).__name__}") from None


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of `text` (no special tokens); stops early once `max_tokens` are certain."""
    if max_tokens:
        # ~4 characters per token; tokenize a generous prefix instead of the whole file.
        text = text[: max(4096, max_tokens * 8)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    return ids[:max_tokens] if max_tokens else ids


def windows(ids: np.ndarray, seq_len: int, count: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive non-overlapping windows of exactly seq_len tokens, shape [1, seq_len]."""
    if seq_len < 2:
        raise EqcError(f"window length must be at least 2 tokens, got {seq_len}")
    total = len(ids) // seq_len
    if total == 0:
        raise EqcError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if count is not None:
        total = min(total, count)
    for i in range(total):
        yield ids[i * seq_len:(i + 1) * seq_len][None, :]
