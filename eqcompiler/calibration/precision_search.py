"""The model runs a mixed-precision budget needs, run before the passes: measured layer sensitivity
(`sensitivity kl`: logits KL with one layer fake-quantized, eqcompiler.calibration.sensitivity) and the
perplexity search of a `ppl+X%` budget (candidate plans compiled and scored through ONNX Runtime on held-out
calibration windows). The result is data, a plan and the table it was chosen from, which apply_precision_plan
applies like a `--plan`; `eqc compile --save-plan` writes the plan, so `--plan` repeats the compile without
these runs.
"""
from __future__ import annotations

import dataclasses
import pathlib
import tempfile
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.calibration import sensitivity as sens
from eqcompiler.compile import bitwidth as bw
from eqcompiler.compile.qdq import quantize_site_weight
from eqcompiler.errors import EqcError


# Said by this search and by apply_precision_plan's own (proxy) budget alike.
NEEDS_STATS = ("a --budget needs calibration statistics: with the 'gram' observer (`eqc calibrate --observers "
               "minmax,gram`) for the proxy, or any statistics of `eqc calibrate` for sensitivity kl (their "
               "calibration text gives the held-out windows); pass --calib STATS")


@dataclasses.dataclass
class PrecisionSearch:
    """What apply_precision_plan applies instead of solving a budget itself."""

    plan: dict[str, Any]
    table: list[bw.Layer]  # the sensitivity every layer's choice was made from
    method: str  # "proxy" | "kl"
    kl_info: dict[str, Any] | None = None  # how the KL table was obtained (measured or cached, cost)


# What the plan (and so the manifest) records of a KL measurement: what it measured, not how this run got it
# (measured or read from a cache, where, in how many seconds), so a cached compile gives the same bytes.
KL_PLAN_FIELDS = ("key", "windows", "tokens", "probes")


def needs_model_run(options: Any) -> bool:
    """Whether apply_precision_plan's options (a budget without a plan) need the model run."""
    if options.plan is not None or options.budget is None:
        return False
    return options.sensitivity == "kl" or bw.parse_budget(options.budget).kind == "ppl"


def search_precision(model: ir.Model, step: Any) -> PrecisionSearch:
    """Solve the budget of the apply_precision_plan pass `step` on `model` (the graph it will see)."""
    options, context = step.options, step.context
    if context.stats is None:
        raise EqcError(NEEDS_STATS)
    by_name = step.layer_groups(model)
    budget = bw.parse_budget(options.budget)
    choices = bw.parse_choices(options.choices)
    kl_info = None
    if options.sensitivity == "kl":
        table, kl_info = kl_table(model, by_name, choices, step)
    else:
        table = step.proxy_table(by_name, choices)
    if budget.kind == "ppl":
        plan = search_ppl(model, table, budget, step)
    else:
        plan = step.solve(model, by_name, table, budget)
    plan["sensitivity"] = {"method": options.sensitivity,
                           **{k: v for k, v in (kl_info or {}).items() if k in KL_PLAN_FIELDS}}
    return PrecisionSearch(plan, table, str(options.sensitivity), kl_info)


def kl_table(model: ir.Model, by_name: dict[str, list[Any]], choices: tuple[str, ...], step: Any
             ) -> tuple[list[bw.Layer], dict[str, Any]]:
    """Measured sensitivity: mean logits KL with one layer fake-quantized (calibration.sensitivity), cached."""
    act = [c for c in choices if c in bw.ACTIVATION_QUANTIZED]
    if act:
        raise EqcError(f"sensitivity kl measures weight quantization only; drop {act[0]} from the choices "
                       "(or use sensitivity proxy)")
    options, stats = step.options, step.context.stats
    windows = int(options.kl_windows)
    ids, window, _ = heldout_tokens(step, windows)
    tokens = min(int(options.kl_tokens), window)
    wins = [ids[i * window:i * window + tokens][None, :] for i in range(windows)]
    names = list(by_name)
    key = sens.cache_key(stats.meta or {}, choices, windows, tokens)
    path = sens.cache_path(options.sensitivity_cache, key)
    record = sens.load_cached(path, key, names)
    if record is None:
        start = time.perf_counter()
        groups = {name: by_name[name][0] for name in names}
        session = sens.WeightInputSession(model, [str(s.weight.name) for s in groups.values()])

        def fake_quant(weight: str, precision: str) -> np.ndarray:
            bits, block, symmetric = bw.PRECISIONS[precision]
            site = next(s for s in groups.values() if str(s.weight.name) == weight)
            return quantize_site_weight(session.weights[weight], site.transposed, bits, symmetric, block).dequantize()

        table = sens.measure_kl(session, wins, [(n, str(groups[n].weight.name)) for n in names], choices,
                                fake_quant, sens.timed_progress("kl sensitivity"))
        del session
        record = {"key": key, "format": sens.KL_FORMAT, "choices": list(choices), "windows": windows,
                  "tokens": tokens, "table": table, "probes": len(names) * sum(c != "float" for c in choices),
                  "seconds": round(time.perf_counter() - start, 1)}
        sens.save_cached(path, record)
        cached = False
    else:
        cached = True
    info = {"key": key, "windows": windows, "tokens": tokens, "probes": record["probes"],
            "measure_seconds": record["seconds"], "cached": cached, "cache": str(path) if path else None}
    out = []
    for name in names:
        params, nbytes, entropy = step.layer_costs(by_name[name], choices)
        out.append(bw.Layer(name, params, list(choices), nbytes, [float(record["table"][name][c]) for c in choices],
                            entropy))
    return out, info


def search_ppl(model: ir.Model, table: list[bw.Layer], budget: bw.Budget, step: Any) -> dict[str, Any]:
    """Bisect the bits budget, scoring each candidate plan's compiled graph on held-out calibration text."""
    ids, window, text = heldout_tokens(step)
    ref = score(model, None, ids, window, step)
    bound = ref * (1 + budget.value / 100)
    plan, probes = bw.search_ppl(table, budget, bound, lambda p: score(model, p, ids, window, step),
                                 step.solver(), int(step.options.ppl_steps))
    plan["search"] = {"budget": budget.text, "ref_ppl": ref, "bound": bound, "probes": probes, "text": text,
                      "tokens": int(len(ids) - len(ids) // window), "window": window,
                      "windows": len(ids) // window}
    return plan


def heldout_tokens(step: Any, count: int | None = None) -> tuple[np.ndarray, int, str]:
    """Token windows of the calibration text right after the ones calibration consumed."""
    from eqcompiler.calibration.stats import recorded_text, recorded_tokenizer
    from eqcompiler.data import load_tokenizer, tokenize

    meta = step.context.stats.meta or {}
    data = meta.get("data") or {}
    source = step.context.source_folder
    if not data.get("path") or not data.get("seq_len") or source is None:
        raise EqcError("a ppl+X% budget needs statistics that record their calibration text (eqc calibrate) "
                       "and the source artifact's tokenizer")
    text, path = recorded_text(meta)
    window = int(data["seq_len"])
    if count is None:
        count = int(step.options.ppl_windows)
    if count < 1:
        raise EqcError(f"ppl windows must be >= 1, got {count}")
    skip = int(data.get("samples", 0)) * window + int(data.get("decode_steps", 0))
    ids = tokenize(load_tokenizer(pathlib.Path(source), recorded_tokenizer(meta)), text,
                   max_tokens=skip + count * window)[skip:]
    if len(ids) < count * window:
        raise EqcError(f"calibration text '{path}' has {len(ids)} tokens after the {skip} calibration "
                       f"used; {count} held-out windows of {window} are needed (lower --ppl-windows/kl_windows)")
    return ids[:count * window], window, path


def score(model: ir.Model, plan: dict[str, Any] | None, ids: np.ndarray, window: int, step: Any) -> float:
    """Perplexity of `model` with `plan` applied (None: as it is), through ONNX Runtime."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    from eqcompiler.analysis.evaluate import score_windows
    from eqcompiler.artifact.folder import MODEL_FILE, save_ir
    from eqcompiler.runtime.session import causal_feed, make_session

    probe = model.clone()
    if plan is not None:
        step.apply_probe(probe, plan)
        RemoveUnusedNodesPass()(probe)
        TopologicalSortPass()(probe)
    with tempfile.TemporaryDirectory(prefix="eqc-ppl-probe-") as tmp:
        save_ir(probe, pathlib.Path(tmp))
        del probe
        session = make_session(pathlib.Path(tmp) / MODEL_FILE)
        result = score_windows(ids, window, lambda win: session.run(["logits"], causal_feed(session, win))[0][0])
        del session
    return float(result["ppl"])
