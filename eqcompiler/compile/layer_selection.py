"""The include/exclude layer filter every layer-selecting pass shares, as one typed options piece.

A pass's Options dataclass inherits `LayerSelection` instead of re-declaring the two regexes, and asks
`options.selects(name)` instead of its own re.search; the recipe keys ("include", "exclude") are unchanged.
"""
from __future__ import annotations

import dataclasses
import re

from eqcompiler.errors import EqcError


@dataclasses.dataclass(kw_only=True)  # keyword-only: subclasses may add fields without defaults before it
class LayerSelection:
    """Regexes on layer names (compile.graph.layer_name): `include` must match (if set), `exclude` must not."""

    include: str | None = None
    exclude: str | None = None

    def selects(self, name: str) -> bool:
        return not (self.include and not re.search(self.include, name)) and not (self.exclude and re.search(self.exclude, name))

    @property
    def filters(self) -> bool:
        """True when a regex is set (every layer is selected otherwise)."""
        return bool(self.include or self.exclude)

    def check_regexes(self, pass_name: str) -> None:
        """A bad regex is refused when the recipe is read, naming the option, before any pass runs."""
        for key in ("include", "exclude"):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            if not isinstance(pattern, str):
                raise EqcError(f"pass '{pass_name}' option '{key}' must be a regex string, got {type(pattern).__name__}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise EqcError(f"pass '{pass_name}' option '{key}' is not a valid regex ({pattern!r}: {exc})") from None


EVERY_LAYER = LayerSelection()
