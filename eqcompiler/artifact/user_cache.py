"""The user cache folder eqc keeps reusable results in (sensitivity tables, GGUF conversions)."""
from __future__ import annotations

import os
import pathlib


def cache_root() -> pathlib.Path:
    """$XDG_CACHE_HOME/eqc (an absolute XDG_CACHE_HOME only), else ~/.cache/eqc."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        base = str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "eqc"
