"""Recipes: an ordered list of passes with options, written as data (JSON).

Built-in recipes live in eqcompiler/recipes/*.json; a user recipe is a JSON file of the same shape:
{"name": ..., "description": ..., "requires_calibration": bool, "passes": [{"pass": NAME, "options": {...}}]}
"""
from __future__ import annotations

import json
import pathlib
from importlib import resources
from typing import Any

from eqcompiler.errors import EqcError

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
        return validate_recipe(read_json_file(path, "recipe file"), f"'{path}'")
    raise EqcError(f"unknown recipe '{name_or_file}' (built-in: {', '.join(sorted(builtins))}; or give a .json file)")
