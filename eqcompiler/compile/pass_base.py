"""The base every eqc pass derives from, the context passes share, and pass discovery.

A pass is an onnx-ir InPlacePass with typed options (a dataclass) so that a recipe, which is data,
can name it and configure it; unknown options are refused with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from typing import Any, ClassVar

import onnx_ir as ir

from eqcompiler.errors import EqcError


@dataclasses.dataclass
class CompileContext:
    """What passes may read besides the model and their own options, and where they report.

    Read-only inputs: the calibration statistics, the source manifest, the target and every step's options.
    Written: `report` and `warnings` (into the new manifest), `per_token_inputs` (smooth_quant tells
    quantize_activations which inputs it scored for per-token int8).
    """

    stats: Any = None  # eqcompiler.calibration.stats.CalibrationStats or None
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    target: str = "portable"  # eqcompiler.lowering.targets.TARGETS
    # The CPU class ORT's int8 kernels run on, resolved from `eqc compile --cpu` (lowering.cpu_features):
    # "vnni" (exact int8 dot products; the default) or "avx2" (x86 without VNNI: they saturate). Never the host.
    cpu: str = "vnni"
    recipe_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # pass name -> its options
    source_folder: str | None = None  # the artifact compiled from (its tokenizer and weights)
    max_positions: int | None = None  # the model's longest sequence (its config), for tables a lowering precomputes
    # apply_precision_plan's plan when its budget needs a model run (calibration/precision_search.py ran it)
    precision_search: Any = None
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    per_token_inputs: list[str] = dataclasses.field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@dataclasses.dataclass
class NoOptions:
    pass


@dataclasses.dataclass(frozen=True)
class ObserverNeeds:
    """Calibration observers a pass reads: `required` ones it cannot run without (compile refuses statistics
    that lack them before any pass runs), `helpful` ones it uses when present (a better result, or a
    per-layer fallback without them). `eqc calibrate --for RECIPE` collects both."""

    required: frozenset[str] = frozenset()
    helpful: frozenset[str] = frozenset()

    def __or__(self, other: "ObserverNeeds") -> "ObserverNeeds":
        return ObserverNeeds(self.required | other.required, (self.helpful | other.helpful) - (self.required | other.required))

    @property
    def all(self) -> frozenset[str]:
        return self.required | self.helpful


class EqcPass(ir.passes.InPlacePass):
    """Subclasses set `name`, `Options` (a dataclass) and implement `call(model)`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires_stats: ClassVar[bool] = False

    def __init__(self, context: CompileContext | None = None, **options: Any) -> None:
        super().__init__()
        self.context = context or CompileContext()
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise EqcError(f"pass '{self.name}' has no option {', '.join(map(repr, unknown))} "
                           f"(valid: {', '.join(sorted(valid)) or 'none'})")
        try:
            self.options = self.Options(**options)
        except (TypeError, ValueError) as exc:
            raise EqcError(f"pass '{self.name}': bad options: {exc}") from None
        _check_layer_regexes(self.name, self.options)
        check = getattr(self.options, "validate", None)
        if check is not None:
            check()
        if self.requires_stats and self.context.stats is None:
            raise EqcError(f"pass '{self.name}' needs calibration statistics: run `eqc calibrate` and pass --calib STATS")

    @classmethod
    def observers_needed(cls, options: Any) -> ObserverNeeds:
        """The calibration observers this pass reads when configured with `options` (an `Options`)."""
        return ObserverNeeds()

    def report(self, data: dict[str, Any]) -> None:
        self.context.report.setdefault(self.name, {}).update(data)


# Options every layer-selecting pass reads as regexes on layer names (compile.graph.name_selected).
LAYER_REGEX_OPTIONS = ("include", "exclude")


def _check_layer_regexes(pass_name: str, options: Any) -> None:
    """A bad include/exclude regex is refused when the recipe is read, naming the option, before any pass runs."""
    for key in LAYER_REGEX_OPTIONS:
        pattern = getattr(options, key, None)
        if pattern is None:
            continue
        if not isinstance(pattern, str):
            raise EqcError(f"pass '{pass_name}' option '{key}' must be a regex string, got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise EqcError(f"pass '{pass_name}' option '{key}' is not a valid regex ({pattern!r}: {exc})") from None


def available_passes() -> dict[str, type[EqcPass]]:
    """Every EqcPass defined in a module of eqcompiler.passes, by name."""
    import eqcompiler.passes as pkg

    found: dict[str, type[EqcPass]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, EqcPass) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return found


def make_pass(name: str, context: CompileContext, options: dict[str, Any]) -> EqcPass:
    passes = available_passes()
    if name not in passes:
        raise EqcError(f"unknown pass '{name}' (known: {', '.join(sorted(passes))})")
    return passes[name](context, **options)
