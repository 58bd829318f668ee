"""`eqc compile`: run a recipe's passes over an artifact and write a new, self-contained artifact."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from eqcompiler.artifact import folder as art_mod
from eqcompiler.artifact.atomic import staged_dir
from eqcompiler.artifact.genai_config import write_genai_config
from eqcompiler.export.upgrade_opset import upgrade_opset
from eqcompiler.errors import EnvironmentProblem, EqcError, InternalError
from eqcompiler.compile.pass_base import CompileContext, available_passes, make_pass
from eqcompiler.compile.recipes import load_recipe
from eqcompiler.calibration.activation_rows import TakenRows
from eqcompiler.calibration.model_runs import run_model_searches
from eqcompiler.calibration.stats import CalibrationStats, recorded_tokenizer


MIN_OPSET = 21


def build_passes(recipe: dict[str, Any], context: CompileContext) -> list[ir.passes.PassBase]:
    return [make_pass(step["pass"], context, dict(step.get("options", {}))) for step in recipe["passes"]]


def override_pass_options(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe with each override set on every step whose pass has that option (e.g. reduce_range
    on quantize_weights); an override that no step takes is refused rather than silently dropped."""
    if not overrides:
        return recipe
    passes = available_passes()
    steps, taken = [], set()
    for step in recipe["passes"]:
        options_cls = passes[step["pass"]].Options if step["pass"] in passes else None
        fields = {f.name for f in dataclasses.fields(options_cls)} if options_cls else set()
        hits = {k: v for k, v in overrides.items() if k in fields}
        taken |= set(hits)
        # An override replaces the options it excludes (a --plan replaces the recipe's default --budget).
        for key in list(hits):
            for other in getattr(options_cls, "REPLACES", {}).get(key, ()):
                hits.setdefault(other, None)
        steps.append({**step, "options": {**step.get("options", {}), **hits}} if hits else step)
    unused = sorted(set(overrides) - taken)
    if unused:
        raise EqcError(f"recipe '{recipe['name']}' has no pass with option {', '.join(map(repr, unused))} "
                       f"(its passes: {', '.join(s['pass'] for s in recipe['passes'])})")
    return {**recipe, "passes": steps}


def _refuse_missing_observers(stats: CalibrationStats, recipe: dict[str, Any], recipe_name: str, calib: str,
                              model: str | pathlib.Path) -> None:
    """Statistics that lack an observer a pass cannot run without are refused before any pass runs, with
    the calibrate flag that collects everything the recipe reads."""
    from eqcompiler.compile.recipes import KV_CACHE_TARGET, recipe_observers

    missing = sorted(recipe_observers(recipe).required - set(stats.observers))
    if missing:
        kv = any(step["pass"] == "quantize_kv_cache" for step in recipe["passes"])
        for_flag = recipe_name + (f",{KV_CACHE_TARGET}" if kv else "")
        raise EqcError(f"statistics '{calib}' lack the observer{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
                       f"that recipe '{recipe['name']}' reads; recalibrate with `eqc calibrate {model} --for {for_flag} "
                       "--data TEXT -o STATS`")


def compile_model(model: str | pathlib.Path, recipe_name: str, out: pathlib.Path, calib: str | None = None,
                  overwrite: bool = False,
                  extra_steps: list[dict[str, Any]] | None = None, target: str = "portable",
                  pass_overrides: dict[str, Any] | None = None, cpu: str = "vnni",
                  run_facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile `model` with a recipe into the artifact folder `out`; returns the new manifest.

    `run_facts`, when given, receives what this run did that the artifact does not record (a KL table
    measured or read from its cache, and in how many seconds): facts for the log, not for the bytes.

    `cpu` (lowering.cpu_features.CPU_CHOICES) is the CPU class ORT's int8 kernels will run on: an explicit input,
    so the same call gives the same bytes on every host ("host" asks for this machine's).

    `target` (eqcompiler.lowering.targets) appends lowering or check passes after the recipe's own steps;
    `pass_overrides` sets options on every recipe step whose pass has them.
    """
    from eqcompiler.lowering.cpu_features import resolve_cpu
    from eqcompiler.lowering.targets import target_steps

    cpu = resolve_cpu(cpu)
    art = art_mod.resolve_artifact(model)
    model_path = art_mod.model_file(art)
    if art.manifest:  # a linked or oversized tokenizer/config file is refused before any work
        art_mod.carried_files(art.folder)
    recipe = override_pass_options(load_recipe(recipe_name), dict(pass_overrides or {}))
    # A compiled artifact can be compiled again: `--recipe none --target ort-cpu` lowers a portable QDQ
    # artifact without quantizing it again, so the target must see the passes that made the graph.
    parent = art.manifest.get("quantization")
    if parent is not None and not isinstance(parent, dict):
        raise EqcError(f"'{art.folder / art_mod.MANIFEST_FILE}': 'quantization' is not an object; re-export or "
                       "recompile that artifact")
    _refuse_requantizing(parent, recipe, model_path)
    target = _effective_target(art.manifest.get("target", "portable") if parent else "portable", target, model_path)
    target_warnings: list[str] = []
    made_by = {"passes": list((parent or {}).get("passes") or []) + list(recipe["passes"])}
    extra_steps = list(extra_steps or []) + target_steps(target, target_warnings, made_by)
    if extra_steps:
        recipe = {**recipe, "passes": list(recipe["passes"]) + list(extra_steps)}
    out = pathlib.Path(out)
    if out.resolve() == art.folder.resolve():
        raise EqcError("output folder is the input artifact; choose another -o")
    if not calib and recipe.get("requires_calibration"):
        raise EqcError(f"recipe '{recipe['name']}' needs calibration statistics: run `eqc calibrate` and pass --calib STATS")
    # -o is claimed before any work: every refusal of it (not empty, a file, a missing or read-only parent,
    # another writer) comes before statistics or weights are read, and no other writer can take it meanwhile.
    with staged_dir(out, overwrite=overwrite) as stage:
        return _compile_into(stage, art, model_path, model, recipe, recipe_name, calib, parent, target,
                             target_warnings, cpu, run_facts if run_facts is not None else {})


def _compile_into(stage: pathlib.Path, art: Any, model_path: pathlib.Path, model: str | pathlib.Path,
                  recipe: dict[str, Any], recipe_name: str, calib: str | None, parent: dict[str, Any] | None,
                  target: str, target_warnings: list[str], cpu: str, run_facts: dict[str, Any]) -> dict[str, Any]:
    """compile_model's work, inside the claimed output's staging folder `stage`; returns the manifest."""
    from eqcompiler.lowering.edge import EDGE_TARGETS, graph_ops, lay_out_for_web, refuse_unrunnable, write_ort_format
    from eqcompiler.lowering.targets import runtime_requirements

    stats = None
    if calib:
        stats = CalibrationStats.load(calib)
        stats.check_model(art_mod.model_fingerprint(model_path), f"'{model_path}'")
        _refuse_missing_observers(stats, recipe, recipe_name, calib, model)
    ir_model, upgraded_from = _load_graph(model_path)
    if upgraded_from is not None:
        target_warnings.append(f"converted from opset {upgraded_from} to {MIN_OPSET} (onnx version converter)")
    context = _context(art, stats, recipe, target, cpu, ir_model.graph)
    context.warnings.extend(target_warnings)
    passes = build_passes(recipe, context)
    # The model runs steps need and the statistics or options lack (`eqc calibrate --for`, `--plan` hold them).
    try:
        run_model_searches(ir_model, recipe, passes, context)
    except Exception as exc:
        _raise_named("model searches (calibration/model_runs.py)", exc)
    if context.precision_search is not None and context.precision_search.kl_info:
        run_facts["kl_sensitivity"] = dict(context.precision_search.kl_info)
    # ORT's contrib ops in the ONNX domain without an ONNX schema (SimplifiedLayerNormalization in graphs
    # onnxruntime-genai's builder wrote): the source brought them, so the check lets them through.
    brought = art_mod.schema_less_ops(ir_model.graph.all_nodes())
    run_passes([*passes, RemoveUnusedNodesPass(), TopologicalSortPass()], ir_model)
    edge = target in EDGE_TARGETS
    if edge:  # before anything is written: ops the edge runtime cannot run end the compile (exit 2)
        refuse_unrunnable(ir_model, target)
    art_mod.save_ir(ir_model, stage)
    art_mod.check_graph(onnx.load(str(stage / art_mod.MODEL_FILE), load_external_data=False), "compiled graph", brought)
    ort_format = write_ort_format(stage) if target == "ort-mobile" else None
    if target == "web":  # files a page fetches whole, named as the graph's external-data locations
        ort_format = {"web_files": lay_out_for_web(stage)}
    if stats is not None and not art.manifest and (tokenizer := recorded_tokenizer(stats.meta)) is not None:
        art_mod.carry_tokenizer(pathlib.Path(tokenizer), stage)  # a bare .onnx calibrated with --tokenizer
    else:  # an artifact's files, or those a bare .onnx came with (a builder or Optimum folder's tokenizer)
        art_mod.copy_carried_files(art.folder, stage)
    # Nothing about the run (its time, the host) goes into the artifact: the same inputs give the same bytes.
    manifest = {k: v for k, v in context.manifest.items() if k not in ("format", "version", "model_file")}
    if art.manifest.get("format") != art_mod.MANIFEST_FORMAT:  # a foreign graph: its kind and input names travel
        from eqcompiler.artifact.model_kind import active_input_map

        manifest.update(task=art.task, input_map=active_input_map() or {})
        if art.task == "causal-lm" and "kv_cache" not in manifest:  # what eval, bench and generate read
            from eqcompiler.artifact.kv_layout import foreign_kv_cache

            kv = foreign_kv_cache(model_path, [str(v.name) for v in ir_model.graph.inputs])
            if kv is not None:
                manifest["kv_cache"] = kv
    manifest["quantization"] = _merged_quantization(parent, recipe, stats, context, model_path)
    manifest["target"] = target
    manifest["cpu"] = cpu
    needs = runtime_requirements(target, [step["pass"] for step in manifest["quantization"]["passes"]])
    library = None
    if needs is not None:
        if edge:  # the ops and opsets the runtime must have (a reduced build includes these)
            needs = {**needs, "ops": graph_ops(ir_model), **(ort_format or {})}
        manifest["runtime_requirements"] = needs
        if "custom_op_library" in needs:
            library = _op_library(target, manifest["quantization"]["warnings"])
    art_mod.write_manifest(stage, manifest)
    write_genai_config(stage, manifest, library, source=art.folder)
    return manifest


def _load_graph(model_path: pathlib.Path) -> tuple[ir.Model, int | None]:
    """The graph passes rewrite, and the opset it was converted from (None: it was recent enough)."""
    ir_model = art_mod.load_ir(model_path)
    _refuse_cycles(ir_model.graph, model_path)
    # The QDQ forms passes emit (per-axis, blocked, int4 DequantizeLinear) need opset 21.
    return upgrade_opset(ir_model, MIN_OPSET, f"'{model_path}'")


def _context(art: Any, stats: CalibrationStats | None, recipe: dict[str, Any], target: str,
             cpu: str = "vnni", graph: ir.Graph | None = None) -> CompileContext:
    # recipe_options: what quantize_weights' reduce_range "auto" decides from, with the target: whether ORT
    # will fuse its int8 activations (static scales) into int8 GEMMs, and whether the recipe re-encodes them.
    manifest = dict(art.manifest)
    if graph is not None and art.manifest.get("format") != art_mod.MANIFEST_FORMAT and art.task == "causal-lm":
        # A foreign causal LM's cache layout (heads, head size), known to the passes as for eqc's own artifacts:
        # SmoothQuant ties o_proj's scales per KV head with it (without it those sites were skipped).
        from eqcompiler.artifact.kv_layout import foreign_kv_cache

        kv = foreign_kv_cache(art_mod.model_file(art), [str(v.name) for v in graph.inputs])
        if kv is not None:
            manifest["kv_cache"] = kv
    return CompileContext(stats=stats, manifest=manifest, target=target, cpu=cpu, source_folder=str(art.folder),
                          max_positions=art_mod.max_positions(art.folder) if art.manifest else None,
                          recipe_options={step["pass"]: dict(step.get("options") or {}) for step in recipe["passes"]})


def store_model_searches(model: str | pathlib.Path, stats_path: pathlib.Path, recipe_names: list[str],
                         taken: TakenRows | None = None) -> list[str]:
    """Run the model searches the recipes' passes need (SmoothQuant's alpha search) on the statistics in
    `stats_path` and save them there, so a compile from them runs no model; returns the keys stored.
    `taken`: rows the statistics pass kept for a search (the search checks that they fit)."""
    from eqcompiler.calibration.model_runs import run_smoothing_searches

    art = art_mod.resolve_artifact(model)
    stats = CalibrationStats.load(stats_path)
    ir_model, _ = _load_graph(art_mod.model_file(art))
    stored: list[str] = []
    for name in recipe_names:
        recipe = load_recipe(name)
        stored += run_smoothing_searches(ir_model, recipe, _context(art, stats, recipe, "portable", graph=ir_model.graph),
                                         taken)
    if stored:
        stats.save(stats_path, overwrite=True)
    return stored


def _op_library(target: str, warnings: list[str]) -> pathlib.Path | None:
    """The op library an artifact that uses eqc's ops carries, so that onnxruntime-genai loads the folder as
    it is (the CUDA build for ort-cuda, which needs no library at compile time: without it, say so)."""
    from eqcompiler.runtime import custom_ops

    try:
        return custom_ops.find_library(cuda=target == "ort-cuda")
    except custom_ops.EqcOpsError as exc:
        warnings.append(f"genai_config.json names no op library ({exc}); onnxruntime-genai cannot load this folder "
                     "until the library is copied beside the model and named in session_options.custom_ops_library")
        return None


def run_passes(passes: list[ir.passes.PassBase], model: ir.Model) -> None:
    """Run the passes in order, as onnx-ir's PassManager does with one step, so that a failure names its
    pass: an EqcError (or OSError) keeps its message and exit code, MemoryError is an environment problem
    (exit 4), anything else an internal error in the named pass (exit 1)."""
    for step in passes:
        try:
            step(model)
        except Exception as exc:
            _raise_named(getattr(step, "name", "") or type(step).__name__, exc)


def _raise_named(name: str, exc: Exception) -> None:
    failure = _pass_failure(name, exc)
    if failure is exc:
        raise exc
    if isinstance(failure, (InternalError, EnvironmentProblem)):
        raise failure from exc  # EQC_DEBUG=1 shows the original traceback
    raise failure from None


def _pass_failure(name: str, exc: Exception) -> BaseException:
    """The exception a failed pass ends the compile with: onnx-ir's wrappers (PassError of a nested pass
    manager, Pre/PostconditionError of `requires`/`ensures`) are unwrapped to the original exception."""
    cause: BaseException = exc
    while isinstance(cause, (ir.passes.PassError, ir.passes.InvariantError)) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, (EqcError, OSError)):
        return cause
    if isinstance(cause, MemoryError):
        return EnvironmentProblem(f"out of memory in pass {name}; free memory or compile on a bigger machine")
    first = (str(cause).strip().splitlines() or [""])[0]
    first = first if len(first) <= 300 else first[:297] + "..."
    return InternalError(f"internal error in pass {name}: {type(cause).__name__}" + (f": {first}" if first else ""))


def _refuse_cycles(graph: ir.Graph, model_path: pathlib.Path) -> None:
    """A graph whose nodes depend on each other in a cycle is not ONNX: refuse it before any pass runs."""
    nodes = list(graph)
    index = {node: i for i, node in enumerate(nodes)}
    waiting = [0] * len(nodes)  # inputs of each node produced by a node not yet ordered
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for value in node.inputs:
            j = index.get(value.producer()) if value is not None else None
            if j is not None:
                waiting[i] += 1
                users[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    ordered = 0
    while ready:
        j = ready.pop()
        ordered += 1
        for i in users[j]:
            waiting[i] -= 1
            if waiting[i] == 0:
                ready.append(i)
    if ordered < len(nodes):
        stuck = next(nodes[i] for i, count in enumerate(waiting) if count > 0)
        raise EqcError(f"'{model_path}' is not a valid ONNX graph: its nodes form a cycle (through node "
                       f"'{stuck.name}', {stuck.op_type}); re-export the model")


# Facts about a calibration run, not about its statistics (older statistics files kept them in the header):
# left out of the artifact, so statistics from 1 or 2 workers, or from a slower machine, compile the same bytes.
_CALIBRATION_RUN_FACTS = ("seconds", "workers", "threads_per_worker")


def _calibration_record(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _CALIBRATION_RUN_FACTS}


# Passes after which the weights are still float: a recipe may run on an artifact they made.
_WEIGHTS_STAY_FLOAT = {"quantize_kv_cache", "check_tensorrt_placement"}


def _refuse_requantizing(parent: dict[str, Any] | None, recipe: dict[str, Any], model_path: pathlib.Path) -> None:
    """A quantizing recipe on an artifact whose weights are already quantized: say so, before a pass
    trips over an int8 weight."""
    if not parent or not recipe["passes"]:
        return
    if any(step["pass"] not in _WEIGHTS_STAY_FLOAT for step in parent.get("passes") or []):
        raise EqcError(f"'{model_path}' is already quantized (recipe '{parent.get('recipe')}'): compile its fp32 "
                       f"parent with recipe '{recipe['name']}'; a compiled artifact takes only --recipe none "
                       "(with --target or --kv-bits)")


def _effective_target(parent_target: str, target: str, model_path: pathlib.Path) -> str:
    """The target of a recompiled artifact: a lowered (ort-*) artifact keeps its target and takes no other."""
    from eqcompiler.lowering.targets import TARGETS

    lowered = parent_target not in ("portable", "tensorrt")  # its graph holds runtime-specific ops
    if not lowered or target not in TARGETS or target in ("portable", parent_target):  # unknown: target_steps says so
        return parent_target if target == "portable" else target
    raise EqcError(f"'{model_path}' was compiled for --target {parent_target}; compile its portable parent "
                   f"for --target {target} instead")


def _merged_quantization(parent: dict[str, Any] | None, recipe: dict[str, Any], stats: CalibrationStats | None,
                         context: CompileContext, model_path: pathlib.Path) -> dict[str, Any]:
    """The manifest's quantization record; a recompiled artifact keeps what its parent's compile did."""
    parent = parent or {}
    name = recipe["name"]
    if parent.get("recipe") not in (None, "none"):
        name = parent["recipe"] if name == "none" else f"{parent['recipe']}+{name}"
    return {
        "recipe": name,
        "passes": list(parent.get("passes") or []) + list(recipe["passes"]),
        "calibration": _calibration_record(stats.meta) if stats is not None else parent.get("calibration"),
        "report": {**(parent.get("report") or {}), **context.report},
        "warnings": list(parent.get("warnings") or []) + list(context.warnings),
        "parent_fingerprint": art_mod.model_fingerprint(model_path),
    }
