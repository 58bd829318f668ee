"""Recipes: an ordered list of passes with options, written as data (JSON).

Built-in recipes live in eqcompiler/recipes/*.json; a user recipe is a JSON file of the same shape:
{"name": ..., "description": ..., "requires_calibration": bool, "passes": [{"pass": NAME, "options": {...}}]}
"""
from __future__ import annotations

import json
import pathlib
from importlib import resources
from typing import TYPE_CHECKING, Any

from eqcompiler.errors import EqcError

if TYPE_CHECKING:
    from eqcompiler.compile.pass_base import ObserverNeeds

RECIPE_KEYS = {"name", "description", "requires_calibration", "passes"}
STEP_KEYS = {"pass", "options"}


def builtin_recipes() -> dict[str, dict[str, Any]]:
    found = {}
    for entry in resources.files("eqcompiler").joinpath("recipes").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            found[data["name"]] = data
    return found


def validate_recipe(data: Any, origin: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise EqcError(f"recipe {origin} must be a JSON object")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise EqcError(f"recipe {origin} has unknown keys: {', '.join(sorted(unknown))}")
    steps = data.get("passes")
    if not isinstance(steps, list) or (not steps and data.get("name") != "none"):  # only "none" may be empty
        raise EqcError(f"recipe {origin} needs a non-empty 'passes' list")
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or "pass" not in step or set(step) - STEP_KEYS:
            raise EqcError(f"recipe {origin}: step {i} must be {{\"pass\": NAME, \"options\": {{...}}}}")
        if not isinstance(step.get("options", {}), dict):
            raise EqcError(f"recipe {origin}: step {i} options must be an object")
    data.setdefault("name", origin)
    return data


def read_json_file(path: pathlib.Path, what: str) -> Any:
    """A JSON file the user named (a recipe, a plan): missing or malformed is a one-line EqcError."""
    if not path.is_file():
        raise EqcError(f"{what} '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EqcError(f"{what} '{path}' is not valid JSON: {exc}") from None


def load_recipe(name_or_file: str) -> dict[str, Any]:
    builtins = builtin_recipes()
    if name_or_file in builtins:
        return validate_recipe(builtins[name_or_file], repr(name_or_file))
    path = pathlib.Path(name_or_file)
    if path.suffix == ".json" or path.exists():
        return _confine_paths(validate_recipe(read_json_file(path, "recipe file"), f"'{path}'"), path)
    raise EqcError(f"unknown recipe '{name_or_file}' (built-in: {', '.join(sorted(builtins))}; or give a .json file)")


# Recipe options that name a file eqc reads: (pass, option).
PATH_OPTIONS = {("smooth_quant", "data")}


def _confine_paths(recipe: dict[str, Any], recipe_path: pathlib.Path) -> dict[str, Any]:
    """A file a recipe names is taken relative to the recipe's folder and must stay inside it (links followed):
    a recipe passed around cannot make eqc read, say, a private file elsewhere as calibration text."""
    folder = recipe_path.resolve().parent
    for step in recipe["passes"]:
        options = step.get("options") or {}
        for (name, key) in PATH_OPTIONS:
            value = options.get(key) if step["pass"] == name else None
            if value is None:
                continue
            if not isinstance(value, str) or not value or "\0" in value:
                raise EqcError(f"recipe '{recipe_path}': {name} option '{key}' must be a file path, got {value!r}")
            resolved = (folder / value).resolve()
            if folder not in resolved.parents:
                raise EqcError(f"recipe '{recipe_path}': {name} option '{key}' ('{value}') leads outside the recipe's "
                               f"folder {folder}; put the file beside the recipe")
            options[key] = str(resolved)
    return recipe


KV_CACHE_TARGET = "kv"  # `eqc calibrate --for ...,kv`: the observers --kv-bits reads


def recipe_observers(recipe: dict[str, Any]) -> ObserverNeeds:
    """The calibration observers a recipe's passes read, with the options the recipe gives them."""
    from eqcompiler.compile.pass_base import ObserverNeeds, available_passes

    passes = available_passes()
    needs = ObserverNeeds(required=frozenset({"minmax"}))
    for step in recipe["passes"]:
        cls = passes.get(step["pass"])
        if cls is None:
            raise EqcError(f"recipe '{recipe.get('name')}': unknown pass '{step['pass']}' (known: {', '.join(sorted(passes))})")
        try:
            options = cls.Options(**(step.get("options") or {}))
        except (TypeError, ValueError) as exc:
            raise EqcError(f"recipe '{recipe.get('name')}': pass '{step['pass']}': bad options: {exc}") from None
        needs = needs | cls.observers_needed(options)
    return needs


def observers_for(targets: str) -> tuple[str, ...]:
    """Observers to collect so that statistics serve every recipe in `targets` ("w8a8-smooth,w4-gptq", recipe
    files too; "kv" for --kv-bits): each recipe's required and helpful observers, sorted."""
    from eqcompiler.compile.pass_base import available_passes

    wanted: set[str] = {"minmax"}
    for item in (t.strip() for t in targets.split(",")):
        if not item:
            continue
        if item == KV_CACHE_TARGET:
            kv_pass = available_passes()["quantize_kv_cache"]
            wanted |= kv_pass.observers_needed(kv_pass.Options()).all
        else:
            wanted |= recipe_observers(load_recipe(item)).all
    return tuple(sorted(wanted))


def kv_step(bits: int, keys: str = "auto", values: str = "auto", calib: str | None = None, scheme: str = "auto",
            target: str = "portable") -> dict[str, Any]:
    """The recipe step `eqc compile --kv-bits` appends.

    keys "auto" = per channel when calibration is given. values "auto" = per channel for 4 bits with
    per-channel keys (SmolLM2, 8192 test tokens: frozen per-channel values beat per-token ones at 4 bits and
    are the only way to reach 0.25x of fp16), per token otherwise (8 bits: -0.01% ppl either way).
    scheme "auto" = symmetric (the cache ORT's CPU GroupQueryAttention reads: per-channel keys and values, frozen)
    for --target ort-cpu when calibration is given and no granularity says token, so that the lowering fuses
    attention over the cache (tools/results/kv_gqa.md); asymmetric otherwise, as before.
    """
    if scheme == "auto":
        symmetric = target == "ort-cpu" and bool(calib) and "token" not in (keys, values)
        scheme = "symmetric" if symmetric else "asymmetric"
    if scheme == "symmetric":
        if "token" in (keys, values) or not calib:
            raise EqcError("--kv-scheme symmetric (GroupQueryAttention's cache) freezes per-channel key and value "
                           "scales from calibration: give --calib STATS made with --observers kv, and no --kv-keys/"
                           "--kv-values token")
        return {"pass": "quantize_kv_cache", "options": {"bits": bits, "key_granularity": "channel",
                                                         "value_granularity": "channel", "asymmetric": False}}
    if keys == "auto":
        keys = "channel" if calib else "token"
    if values == "auto":
        values = "channel" if (bits == 4 and keys == "channel") else "token"  # frozen keys = kv stats at hand
    return {"pass": "quantize_kv_cache",
            "options": {"bits": bits, "key_granularity": keys, "value_granularity": values}}
