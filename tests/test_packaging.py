"""passes/ and models/ ship inside the eqcompiler namespace; no generic top-level names are claimed."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import eqcompiler


def test_passes_and_models_live_in_namespace() -> None:
    import eqcompiler.models.loaders  # noqa: F401
    import eqcompiler.passes.quantize_weights  # noqa: F401

    assert importlib.util.find_spec("passes") is None
    assert importlib.util.find_spec("models") is None


def test_installed_non_editable_when_required() -> None:
    """`make test` installs eqc as a wheel and sets EQC_REQUIRE_INSTALLED=1: the tests must use that copy."""
    if os.environ.get("EQC_REQUIRE_INSTALLED") != "1":
        return
    here = pathlib.Path(eqcompiler.__file__).resolve()
    assert "site-packages" in here.parts, here
    passes_dir = pathlib.Path(importlib.util.find_spec("eqcompiler.passes").origin).resolve().parent
    assert passes_dir.parent == here.parent, "eqcompiler.passes must be installed inside the eqcompiler package"


def test_builtin_recipes_are_packaged() -> None:
    from eqcompiler.recipes import builtin_recipes

    assert {"w8", "w8a8"} <= set(builtin_recipes())
