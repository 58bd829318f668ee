"""The include/exclude layer filter every layer-selecting pass shares, as one typed options piece.

A pass's Options dataclass inherits `LayerSelection` instead of re-declaring the two regexes, and asks
`options.selects(name, node)` instead of its own re.search; the recipe keys ("include", "exclude") are unchanged.
`exclude_lm_head` leaves out the lm_head found from the graph's structure (compile/lm_head.py), whatever the
exporter named it: a regex such as `^lm_head$` misses torch.onnx dynamo's `node_linear_*` names.
"""
from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from eqcompiler.compile.lm_head import is_lm_head
from eqcompiler.errors import EqcError


@dataclasses.dataclass(kw_only=True)  # keyword-only: subclasses may add fields without defaults before it
class LayerSelection:
    """Regexes on layer names (compile.graph.layer_name): `include` must match (if set), `exclude` must not;
    `exclude_lm_head`: the structural lm_head (compile.lm_head.is_lm_head) is never selected."""

    include: str | None = None
    exclude: str | None = None
    exclude_lm_head: bool = False

    def selects(self, name: str, node: ir.Node | None = None) -> bool:
        """Whether the layer `name` (its MatMul/Gemm `node`, which exclude_lm_head needs) is selected."""
        if self.exclude_lm_head and node is not None and is_lm_head(node):
            return False
        return not (self.include and not re.search(self.include, name)) and not (self.exclude and re.search(self.exclude, name))

    @property
    def filters(self) -> bool:
        """True when a regex or exclude_lm_head is set (every layer is selected otherwise)."""
        return bool(self.include or self.exclude or self.exclude_lm_head)

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
