"""Calibration and evaluation text: reading, tokenizing, cutting into fixed windows."""
from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Iterator

import numpy as np

from eqcompiler.errors import EqcError

# WikiText-2 ships inside the package (CC BY-SA 3.0; licence and attribution beside the files).
BUNDLED_WIKITEXT = pathlib.Path(__file__).resolve().parent / "datasets" / "wikitext-2"


def find_wikitext(split: str) -> pathlib.Path:
    """The bundled WikiText-2 split ('valid' or 'test'); EQC_WIKITEXT names another folder holding it."""
    import os

    env = os.environ.get("EQC_WIKITEXT")
    folder = pathlib.Path(env) if env else BUNDLED_WIKITEXT
    path = folder / f"{split}.txt"
    if not path.is_file():
        where = "EQC_WIKITEXT" if env else "the installed eqc package (reinstall it)"
        raise EqcError(f"WikiText-2 '{split}.txt' not found in {folder} (from {where})")
    return path


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


def load_tokenizer(folder: pathlib.Path, tokenizer: str | pathlib.Path | None = None) -> Any:
    """The model folder's own tokenizer, or `tokenizer` (`--tokenizer`: a folder with tokenizer files, or a
    tokenizer.json) for a model that came without one (a bare .onnx)."""
    import transformers

    if tokenizer is not None:
        return _explicit_tokenizer(pathlib.Path(tokenizer))
    from eqcompiler.artifact.folder import carried_files

    carried_files(folder)  # a tokenizer file that is a link (perhaps leading outside) or oversized: refused
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise EqcError(f"no usable tokenizer in '{folder}': {type(exc).__name__}; pass --tokenizer DIR|FILE "
                       "(the model's tokenizer folder or tokenizer.json)") from None


def _explicit_tokenizer(path: pathlib.Path) -> Any:
    import transformers

    try:
        if path.is_dir():
            return transformers.AutoTokenizer.from_pretrained(str(path))
        if path.is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as exc:
        raise EqcError(f"--tokenizer '{path}' is not a usable tokenizer: {type(exc).__name__}") from None
    raise EqcError(f"--tokenizer '{path}' does not exist")


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> np.ndarray:
    """Token ids of `text` (no special tokens); stops early once `max_tokens` are certain."""
    if max_tokens:
        # ~4 characters per token; tokenize a generous prefix instead of the whole file.
        text = text[: max(4096, max_tokens * 8)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[:max_tokens] if max_tokens else ids
    _refuse_unknown_tokens(tokenizer, ids)
    return ids


# Above this share of unknown-token ids the tokenizer does not fit the text (a folder whose tokenizer files are
# missing or belong to another model): statistics or perplexity on [UNK]s would be meaningless, not just poor.
MAX_UNKNOWN_SHARE = 0.5


def _refuse_unknown_tokens(tokenizer: Any, ids: np.ndarray) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or len(ids) < 16:
        return
    share = float(np.mean(ids == unk))
    if share > MAX_UNKNOWN_SHARE:
        raise EqcError(f"the tokenizer maps {share:.0%} of the text to its unknown token "
                       f"{getattr(tokenizer, 'unk_token', unk)!r}: it is not this model's tokenizer, or the text is not "
                       "in its language; put the model's own tokenizer files in its folder")


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts around a text (BERT: [CLS] ... [SEP]), as (prefix, suffix).

    Found by tokenizing a probe with and without special tokens; ([], []) when it adds none or
    the probe's body is not a contiguous run of the framed ids.
    """
    probe = "the quick brown fox"
    framed = list(tokenizer(probe)["input_ids"])
    body = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(framed) - len(body) + 1):
        if body and framed[start:start + len(body)] == body:
            return framed[:start], framed[start + len(body):]
    return [], []


def framed_windows(ids: np.ndarray, seq_len: int, prefix: list[int], suffix: list[int]) -> np.ndarray:
    """Cut `ids` into windows of seq_len tokens that each start with prefix and end with suffix,
    concatenated, so `windows(result, seq_len)` yields inputs shaped like what an encoder sees."""
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise EqcError(f"window length {seq_len} leaves no room for text between the special tokens "
                       f"{prefix} and {suffix}")
    pre, suf = np.asarray(prefix, dtype=np.int64), np.asarray(suffix, dtype=np.int64)
    chunks = [np.concatenate([pre, ids[i:i + body], suf]) for i in range(0, len(ids) - body + 1, body)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def calibration_ids(tokenizer: Any, text: str, seq_len: int, count: int, causal: bool, extra: int = 0
                    ) -> tuple[np.ndarray, tuple[list[int], list[int]]]:
    """Token ids for `count` windows of seq_len (+ `extra` trailing tokens), and the special-token frame.

    An encoder always sees its special tokens ([CLS] ... [SEP]), whose rows carry its largest
    activations (attention sinks), so its windows are framed the same way; a causal LM's are raw text.
    """
    frame = ([], []) if causal else special_frame(tokenizer)
    ids = tokenize(tokenizer, text, max_tokens=count * seq_len + extra)
    if any(frame):
        ids = framed_windows(ids, seq_len, *frame)
    return ids, frame


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
