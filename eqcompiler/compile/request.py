"""`eqc compile` as one typed request: every flag checked before any work, then one compile.

The CLI parses arguments into a CompileRequest and calls `run`; what the flags mean for the recipe (which
pass options they override, which step --kv-bits appends) is decided here, not in the CLI.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

from eqcompiler.errors import EqcError


@dataclasses.dataclass(frozen=True)
class KvCacheRequest:
    bits: int  # 8 or 4
    keys: str = "auto"  # auto | channel | token
    values: str = "auto"  # auto | token | channel
    scheme: str = "auto"  # auto | asymmetric | symmetric (GroupQueryAttention's layout)


@dataclasses.dataclass(frozen=True)
class PrecisionRequest:
    """Recipe mixed: a per-layer precision budget or a saved plan, and how the budget is solved."""

    budget: str | None = None  # 6bits, 120MB, ppl+2%
    plan_file: str | None = None
    save_plan_file: pathlib.Path | None = None
    ppl_windows: int | None = None
    sensitivity: str | None = None  # proxy | kl
    solver: str | None = None  # dp | greedy | grid | entropy
    sensitivity_cache: str | None = None  # --sensitivity-cache: a folder the user chose for the KL table cache

    def given(self) -> bool:
        """A budget or a plan was asked for (the flags that need recipe mixed)."""
        return any(v is not None for v in (self.budget, self.plan_file, self.save_plan_file))


@dataclasses.dataclass(frozen=True)
class CompileRequest:
    model: str
    recipe: str
    out: pathlib.Path
    calib: str | None = None
    overwrite: bool = False
    target: str = "portable"
    reduce_range: bool | None = None  # None: the recipe's choice
    uint8_encoding: bool | None = None  # None: the recipe's choice
    kv_cache: KvCacheRequest | None = None
    precision: PrecisionRequest = PrecisionRequest()
    cpu: str | None = None  # --cpu (lowering.cpu_features); None: the default class, with a hint on a host it misfits

    @classmethod
    def from_flags(cls, model: str, out: pathlib.Path, *, recipe: str, calib: str | None = None,
                   overwrite: bool = False, target: str = "portable", reduce_range: bool | None = None,
                   cpu: str | None = None, uint8_encoding: bool | None = None, kv_bits: str | None = None,
                   kv_keys: str = "auto", kv_values: str = "auto", kv_scheme: str = "auto",
                   **precision: Any) -> "CompileRequest":
        """The request `eqc compile`'s flags describe (the mixed-precision ones: PrecisionRequest's fields,
        with --plan / --save-plan as plan_file / save_plan_file)."""
        return cls(model=model, recipe=recipe, out=out, calib=calib, overwrite=overwrite, target=target,
                   reduce_range=reduce_range, uint8_encoding=uint8_encoding, cpu=cpu,
                   kv_cache=KvCacheRequest(int(kv_bits), kv_keys, kv_values, kv_scheme) if kv_bits else None,
                   precision=PrecisionRequest(**precision))

    def pass_overrides(self) -> dict[str, Any]:
        """Recipe pass options the flags set (refused by compile when no step of the recipe has them)."""
        from eqcompiler.compile.recipes import load_recipe

        overrides: dict[str, Any] = dict(_precision_overrides(self.recipe, self.precision))
        if self.reduce_range is not None:
            overrides["reduce_range"] = self.reduce_range
        if self.uint8_encoding is not None:
            overrides["when"] = "always" if self.uint8_encoding else "never"
        elif self.reduce_range and "encode_int8_as_uint8" in {s["pass"] for s in load_recipe(self.recipe)["passes"]}:
            overrides["when"] = "never"  # 7-bit int8 weights were asked for: keep them int8
        return overrides

    def extra_steps(self) -> list[dict[str, Any]]:
        if self.kv_cache is None:
            return []
        from eqcompiler.compile.recipes import kv_step

        kv = self.kv_cache
        return [kv_step(kv.bits, kv.keys, kv.values, self.calib, scheme=kv.scheme, target=self.target)]


def _precision_overrides(recipe: str, request: PrecisionRequest) -> dict[str, Any]:
    """Check --budget/--plan/--save-plan and their companions before compiling; only recipes with
    apply_precision_plan take a budget or a plan."""
    from eqcompiler.compile import bitwidth
    from eqcompiler.compile.recipes import load_recipe

    overrides: dict[str, Any] = {}
    if request.given():
        if not any(step["pass"] == "apply_precision_plan" for step in load_recipe(recipe)["passes"]):
            raise EqcError("--budget/--plan/--save-plan apply to recipe 'mixed' (a recipe with apply_precision_plan)")
        if request.budget is not None and request.plan_file is not None:
            raise EqcError("give --budget or --plan, not both")
        if request.budget is not None:
            bitwidth.parse_budget(request.budget)
            overrides["budget"] = request.budget
        elif request.plan_file is not None:
            bitwidth.load_plan(request.plan_file)
            overrides["plan"] = request.plan_file
    if request.ppl_windows is not None:
        if request.ppl_windows < 1 or not str(request.budget or "").strip().lower().startswith("ppl"):
            raise EqcError("--ppl-windows must be >= 1 and goes with --budget ppl+X%")
        overrides["ppl_windows"] = request.ppl_windows
    for key in ("sensitivity", "solver"):
        value = getattr(request, key)
        if value is not None:
            if request.budget is None:
                raise EqcError(f"--{key} goes with --budget (recipe mixed)")
            overrides[key] = value
    if request.sensitivity_cache is not None:
        if request.sensitivity != "kl":
            raise EqcError("--sensitivity-cache goes with --sensitivity kl")
        from eqcompiler.calibration.sensitivity import grant_cache_folder

        folder = pathlib.Path(request.sensitivity_cache)
        if folder.exists() and not folder.is_dir():
            raise EqcError(f"--sensitivity-cache '{folder}' is not a folder")
        grant_cache_folder(folder)  # the user named it on the command line (a recipe may only name the user cache)
        overrides["sensitivity_cache"] = str(folder)
    return overrides


def run(request: CompileRequest) -> dict[str, Any]:
    """Compile as requested; returns the summary the CLI prints (output, recipe, size, warnings, report, and
    the seconds it took: a fact about this run, kept out of the artifact)."""
    from eqcompiler.artifact.folder import size_bytes
    from eqcompiler.compile.pipeline import compile_model

    start = time.perf_counter()
    from eqcompiler.lowering.cpu_features import DEFAULT_CPU, saturation_warning

    run_facts: dict[str, Any] = {}
    manifest = compile_model(request.model, request.recipe, request.out, calib=request.calib,
                             overwrite=request.overwrite, target=request.target, extra_steps=request.extra_steps(),
                             pass_overrides=request.pass_overrides() or None, cpu=request.cpu or DEFAULT_CPU,
                             run_facts=run_facts)
    seconds = round(time.perf_counter() - start, 1)
    # The default CPU class is not this host's: say so where it changes what ORT computes here.
    hint = saturation_warning(manifest) if request.cpu is None else None
    q = manifest["quantization"]
    if request.precision.save_plan_file is not None:
        from eqcompiler.compile.bitwidth import save_plan

        save_plan(request.precision.save_plan_file, q["report"]["apply_precision_plan"]["plan"])
    return {"output": str(request.out), "recipe": q["recipe"], "size_bytes": size_bytes(request.out),
            "warnings": q["warnings"], "report": q["report"], "seconds": seconds, "hints": [hint] if hint else [],
            "model_runs": run_facts}
