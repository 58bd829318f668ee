"""passes/ and models/ ship inside the eqcompiler namespace; no generic top-level names are claimed."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

import eqcompiler


def test_passes_and_models_live_in_namespace() -> None:
    import eqcompiler.models.loaders  # noqa: F401
    import eqcompiler.passes.quantize_weights  # noqa: F401

    assert importlib.util.find_spec("passes") is None
    assert importlib.util.find_spec("models") is None


def test_installed_non_editable_when_required() -> None:
    """`make test` installs eqc as a wheel and sets EQC_REQUIRE_INSTALLED=1: the tests must use that copy."""
    if os.environ.get("EQC_REQUIRE_INSTALLED") != "1":
        pytest.skip("EQC_REQUIRE_INSTALLED is not 1: run through `make test`, which installs eqc non-editable")
    here = pathlib.Path(eqcompiler.__file__).resolve()
    assert "site-packages" in here.parts, here
    passes_dir = pathlib.Path(importlib.util.find_spec("eqcompiler.passes").origin).resolve().parent
    assert passes_dir.parent == here.parent, "eqcompiler.passes must be installed inside the eqcompiler package"


def test_builtin_recipes_are_packaged() -> None:
    from eqcompiler.compile.recipes import builtin_recipes

    assert {"w8", "w8a8"} <= set(builtin_recipes())


def test_wheel_ships_the_op_libraries_and_falls_back_to_them(monkeypatch) -> None:
    """`make install` builds the wheel after `make ops`: the installed package carries the libraries it was
    built with, and an install away from any checkout (no build/cuda_ops above it) finds and runs them."""
    if os.environ.get("EQC_REQUIRE_INSTALLED") != "1":
        pytest.skip("EQC_REQUIRE_INSTALLED is not 1: only `make install` copies the op libraries into the package")
    import numpy as np

    from eqcompiler.runtime import custom_ops
    from test_cuda_ops import BUILD, cpu_session, fused_model
    from op_reference import random_problem, reference

    built = sorted(p.name for p in BUILD.glob("libeqc_ops*.so"))
    shipped = sorted(p.name for p in custom_ops.bundled_library_dir().glob("libeqc_ops*.so"))
    assert "site-packages" in custom_ops.bundled_library_dir().parts
    assert shipped == built and custom_ops.CPU_LIBRARY in shipped, (shipped, built)
    for name in shipped:
        assert (custom_ops.bundled_library_dir() / name).read_bytes() == (BUILD / name).read_bytes(), name
    monkeypatch.delenv(custom_ops.ENV_VAR, raising=False)
    monkeypatch.setattr(custom_ops, "_repo_build_dirs", lambda: iter(()))  # as if installed elsewhere
    lib = custom_ops.find_library()
    assert lib == custom_ops.bundled_library_dir() / custom_ops.CPU_LIBRARY
    a, b, scale, bias = random_problem(np.random.default_rng(11), (4, 19), 6)
    (y,) = cpu_session(fused_model(19, 6, bias=True), lib).run(None, {"A": a, "B": b, "B_scale": scale, "bias": bias})
    np.testing.assert_array_equal(y, reference(a, b, scale, bias))


def test_installed_modules_are_exactly_the_sources() -> None:
    """The wheel carries every source module and no stale one (setuptools reuses build/lib between builds, so
    a module moved or deleted in the checkout could otherwise still ship, and still be imported)."""
    if os.environ.get("EQC_REQUIRE_INSTALLED") != "1":
        pytest.skip("EQC_REQUIRE_INSTALLED is not 1: the package is not the installed wheel")
    repo = pathlib.Path(__file__).resolve().parents[1]
    roots = {"eqcompiler": repo / "eqcompiler", "eqcompiler/passes": repo / "passes", "eqcompiler/models": repo / "models"}

    def source_of(relative: pathlib.PurePosixPath) -> pathlib.Path:
        for prefix in ("eqcompiler/passes", "eqcompiler/models"):
            if str(relative).startswith(prefix + "/"):
                return roots[prefix] / relative.relative_to(prefix)
        return repo / relative

    installed_root = pathlib.Path(eqcompiler.__file__).resolve().parent
    installed = {pathlib.PurePosixPath("eqcompiler") / p.relative_to(installed_root).as_posix()
                 for p in installed_root.rglob("*.py") if "__pycache__" not in p.parts}
    stale = sorted(str(p) for p in installed if not source_of(p).is_file())
    expected = {pathlib.PurePosixPath("eqcompiler") / p.relative_to(repo / "eqcompiler").as_posix()
                for p in (repo / "eqcompiler").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(p) for p in expected - installed)
    assert stale == [] and missing == [], (stale, missing)
