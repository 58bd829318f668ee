"""The base every eqc pass derives from, the context passes share, and pass discovery.

A pass is an onnx-ir InPlacePass with typed options (a dataclass) so that a recipe, which is data,
can name it and configure it; unknown options are refused with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from typing import Any, ClassVar

import onnx_ir as ir

from eqcompiler.compile.layer_selection import LayerSelection
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
        check_option_types(self.name, self.Options, options)
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


def check_option_types(pass_name: str, options_class: type, values: dict[str, Any]) -> None:
    """Refuse a recipe value of the wrong JSON type, naming the pass, the option and the type its Options
    dataclass declares ("bits": "8" or "symmetric": "yes" would otherwise fail deep in a pass, or be taken
    as true)."""
    hints = typing.get_type_hints(options_class)
    for key, value in values.items():
        expected = hints.get(key)
        if expected is not None and not _conforms(value, expected):
            shown = repr(value)
            raise EqcError(f"pass '{pass_name}' option '{key}' must be {_described(expected)}, got "
                           f"{shown if len(shown) <= 60 else shown[:57] + '...'}")


def _conforms(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if expected is list or origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value) if args else isinstance(value, list)
    if expected is dict or origin is dict:
        return isinstance(value, dict)
    return True  # a type the recipe format has no word for: the pass checks it


def _described(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_described(arg) for arg in args)
    if origin is list:
        return f"a list of {_described(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(expected, str(expected))


def _check_layer_regexes(pass_name: str, options: Any) -> None:
    if isinstance(options, LayerSelection):
        options.check_regexes(pass_name)


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
