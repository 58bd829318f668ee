"""Per-layer bitwidth assignment: a sensitivity table, solvers under a size budget, plan files.

Sensitivity is a PROXY, not a measurement of the model's loss: for a linear layer y = x W and a
candidate precision p, the damage is the relative output error over the calibration tokens,

    err_p = trace(dW^T G dW) / trace(W^T G W),   dW = dequant(quant_p(W)) - W,  G = sum x^T x,

which needs the 'gram' calibration observer. It ignores how an error in one layer propagates
through the rest of the network (and how errors interact), so summing it over layers only ranks
plans; tests/test_bitwidth.py checks on the tiny llama that it ranks layers like the measured
logits KL when one layer at a time is quantized.

Solvers pick one precision per layer to minimise the summed proxy error under a budget on
average bits per planned linear weight ("6bits"), or the bytes of ALL stored weights
("120MB": model.onnx.data, embeddings included; the graph and tokenizer files are not counted):
- greedy: start at the most precise choice, repeatedly take the downgrade with the least error
  added per bit saved until the budget holds (fast, not always optimal);
- dp: exact multiple-choice knapsack over costs discretised into integer units (costs are rounded
  up, so the plan always meets the budget; optimal up to that rounding);
- grid: exhaustive search, only for tiny problems; tests use it to prove the DP optimal;
- entropy: the LLMEasyQuant-style heuristic: bits follow each layer's weight-value entropy (more
  entropy, more bits), ignoring the error table (solve_entropy).

Measured sensitivity (option sensitivity "kl", eqcompiler.calibration.sensitivity) replaces the proxy in the
table by the mean logits KL with one layer quantized at a time, which sees error propagation.

W8A8 (int8 weights per channel + static int8 per-tensor quantization of the layer's INPUT) is a
candidate when asked for (choices=...). Its proxy adds the activation rounding noise to the int8
weight error: with the calibrated symmetric scale s = max|x| / 127 the rounding error e of each
input element is ~uniform on [-s/2, s/2] (variance s^2/12, independent of x), so over the T
calibration tokens it adds E||e Wq||^2 = T * s^2/12 * ||Wq||_F^2 to the output error. It stores
the same bytes as int8, so a size budget alone never prefers it: it is for plans that want int8
GEMMs (choices "int4-g128,int4-g64,w8a8,float") and for plans written by hand.

A perplexity budget ("ppl+2%") is met by measurement, not by the proxy: search_ppl bisects the
average-bits budget (log scale) and scores each candidate plan's compiled model through ONNX
Runtime (apply_precision_plan does the scoring, on held-out calibration windows), returning the
smallest plan measured within the bound. Because every bound walks the same bisection grid, a
looser bound never returns a bigger budget.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import re
from typing import Any, Callable, Sequence

import numpy as np

from eqcompiler.artifact.atomic import staged_file
from eqcompiler.errors import EqcError
from eqcompiler.compile.recipes import read_json_file

# name -> (bits, block_size, symmetric); None = keep the float weight.
PRECISIONS: dict[str, tuple[int, int, bool] | None] = {
    "int4-g128": (4, 128, False),  # as the w4-rtn recipe: uint4 asymmetric blocks of 128
    "int4-g64": (4, 64, False),
    "int8": (8, 0, True),  # as the w8 recipe: int8 symmetric per output channel
    "float": None,
    "w8a8": (8, 0, True),  # int8 weights as above + static int8 per-tensor input (ACTIVATION_QUANTIZED)
}
ACTIVATION_QUANTIZED = frozenset({"w8a8"})
PRECISIONS_ORDER = {name: i for i, name in enumerate(PRECISIONS)}  # precisions that also quantize the layer's input
DEFAULT_CHOICES = ("int4-g128", "int4-g64", "int8", "float")  # w8a8 costs int8's bytes: opt in
PLAN_VERSION = 1
PPL_WINDOWS = 4  # held-out calibration windows each perplexity probe scores (default)
PPL_STEPS = 7  # bisection steps of the perplexity search: at most 2 + PPL_STEPS compiled probes
GRID_LIMIT = 4 ** 10  # exhaustive search is refused above this many combinations
ENTROPY_SPREAD = 2.0  # solver "entropy": bits of target per standard deviation of weight entropy
SENSITIVITIES = ("proxy", "kl")  # Gram proxy (default) or measured logits KL (eqcompiler.calibration.sensitivity)


def stored_bytes(precision: str, k: int, n: int, float_bytes: int = 4) -> int:
    """Bytes a [K, N] weight takes at `precision` (values + scales + zero points), as written."""
    spec = PRECISIONS[precision]
    if spec is None:
        return k * n * float_bytes
    bits, block, _ = spec
    groups = n * (-(-k // block)) if block else n
    # 4-bit values pack two per byte; zero points have the values' width; scales are float32.
    return math.ceil(k * n * bits / 8) + groups * 4 + math.ceil(groups * bits / 8)


@dataclasses.dataclass
class Budget:
    kind: str  # "bits" (average bits per planned linear weight), "bytes" (whole artifact) or "ppl" (% rise)
    value: float
    text: str


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_budget(text: str) -> Budget:
    """'6bits' / '4.5bits' -> average bits; '120MB' / '1.2GiB' -> bytes; 'ppl+2%' -> perplexity rise."""
    s = str(text).strip().lower().replace(" ", "")
    if s.startswith("ppl"):
        m = re.fullmatch(r"ppl\+([0-9]*\.?[0-9]+)%", s)
        if not m:
            raise EqcError(f"budget '{text}' not understood: a perplexity budget reads ppl+X% (e.g. ppl+2%)")
        rise = float(m.group(1))
        if rise > 1000:
            raise EqcError(f"budget '{text}': a perplexity rise above 1000% is not a useful bound")
        return Budget("ppl", rise, text)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bits?|b|kb|mb|gb|kib|mib|gib)", s)
    if not m:
        raise EqcError(f"budget '{text}' not understood: use e.g. 6bits, 120MB, 1.2GiB or ppl+2%")
    value, unit = float(m.group(1)), m.group(2)
    if unit.startswith("bit"):
        if not 4.0 <= value <= 32.0:
            raise EqcError(f"budget '{text}': average bits must be between 4 and 32")
        return Budget("bits", value, text)
    if value <= 0:
        raise EqcError(f"budget '{text}' must be positive")
    return Budget("bytes", value * _UNITS[unit], text)


@dataclasses.dataclass
class Layer:
    """One planned linear layer: its choices' stored bytes and proxy errors (same order)."""

    name: str
    params: int
    choices: list[str]
    nbytes: list[int]
    error: list[float]  # proxy error, or measured logits KL (sensitivity "kl")
    entropy: float = 0.0  # weight-value entropy in bits (eqcompiler.calibration.sensitivity.weight_entropy); solver "entropy"


def parse_choices(text: str | Sequence[str]) -> tuple[str, ...]:
    """'int4-g128,int8,float' -> the candidate precisions, validated, in the given order."""
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text) if c.strip()]
    bad = [c for c in names if c not in PRECISIONS]
    if bad or not names:
        what = f"precision choices {text!r}: unknown {bad[0]!r}" if bad else "no precision choices given"
        raise EqcError(f"{what} (valid: {', '.join(PRECISIONS)})")
    return tuple(dict.fromkeys(names))


def layer_sensitivity(name: str, w: np.ndarray, gram: np.ndarray, choices: Sequence[str] = DEFAULT_CHOICES,
                      act_noise: float | None = None) -> Layer:
    """Proxy error of each precision for a [K, N] weight, relative to the layer's output energy.

    `act_noise` = sum over the layer's inputs of T * s^2 / 12 (T calibration tokens, s the int8
    activation scale); needed only when a choice quantizes the activation (w8a8).
    """
    from eqcompiler.compile.qdq import output_error, quantize_site_weight

    k, n = w.shape
    ref = output_error(w, gram)
    errors, sizes = [], []
    for p in choices:
        spec = PRECISIONS[p]
        sizes.append(stored_bytes(p, k, n))
        if spec is None:
            errors.append(0.0)
            continue
        bits, block, sym = spec
        wq = quantize_site_weight(w, False, bits, sym, block).dequantize()
        err = output_error(wq - w, gram)
        if p in ACTIVATION_QUANTIZED:
            if act_noise is None:
                raise EqcError(f"layer '{name}': precision {p} needs the input's calibrated range (minmax statistics)")
            err += act_noise * float(np.square(wq, dtype=np.float64).sum())
        errors.append(err / ref if ref > 0 else 0.0)
    return Layer(name, k * n, list(choices), sizes, errors)


def budget_capacity(layers: Sequence[Layer], budget: Budget, fixed_bytes: int = 0) -> float:
    """The bytes the planned layers may take: bits budget over their weights, or bytes minus the rest."""
    if budget.kind == "bits":
        return budget.value * sum(l.params for l in layers) / 8
    return budget.value - fixed_bytes


def plan_cost(layers: Sequence[Layer], picks: Sequence[int]) -> tuple[int, float]:
    return (sum(l.nbytes[i] for l, i in zip(layers, picks)), sum(l.error[i] for l, i in zip(layers, picks)))


def _infeasible(layers: Sequence[Layer], capacity: float) -> EqcError:
    smallest = sum(min(l.nbytes) for l in layers)
    return EqcError(f"budget too small: the smallest plan needs {smallest / 1e6:.3f} MB of linear weights "
                    f"({8 * smallest / max(sum(l.params for l in layers), 1):.2f} bits on average), "
                    f"the budget leaves {capacity / 1e6:.3f} MB")


def solve_greedy(layers: Sequence[Layer], capacity: float) -> list[int]:
    """Downgrade by least error added per byte saved until the plan fits."""
    picks = [int(np.argmax(l.nbytes)) for l in layers]
    total = sum(l.nbytes[i] for l, i in zip(layers, picks))
    while total > capacity:
        best: tuple[float, int, int] | None = None
        for li, layer in enumerate(layers):
            cur = picks[li]
            for ci in range(len(layer.choices)):
                saved = layer.nbytes[cur] - layer.nbytes[ci]
                if saved <= 0:
                    continue
                rate = (layer.error[ci] - layer.error[cur]) / saved
                if best is None or rate < best[0]:
                    best = (rate, li, ci)
        if best is None:
            raise _infeasible(layers, capacity)
        _, li, ci = best
        total -= layers[li].nbytes[picks[li]] - layers[li].nbytes[ci]
        picks[li] = ci
    return picks


def solve_dp(layers: Sequence[Layer], capacity: float, resolution: int | None = None) -> list[int]:
    """Multiple-choice knapsack: min summed error with costs in integer units (rounded up).

    Each layer's cost is rounded up by less than one unit, so up to len(layers) units of the budget
    can go unused: the default resolution (200 units per layer) bounds that loss to 0.5%.
    """
    if capacity < sum(min(l.nbytes) for l in layers):
        raise _infeasible(layers, capacity)
    if resolution is None:
        resolution = max(4000, 200 * len(layers))
    unit = max(capacity / resolution, 1.0)
    cap = int(math.floor(capacity / unit + 1e-9))
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0  # best[j]: min error of the layers so far using exactly j units
    choice = np.zeros((len(layers), cap + 1), dtype=np.int16)
    for li, layer in enumerate(layers):
        new = np.full(cap + 1, inf)
        for ci, (nb, err) in enumerate(zip(layer.nbytes, layer.error)):
            c = int(math.ceil(nb / unit - 1e-9))
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = best[:cap + 1 - c] + err
            better = cand < new
            new[better] = cand[better]
            choice[li, better] = ci
        best = new
    if not np.isfinite(best).any():
        raise _infeasible(layers, capacity)
    j = int(np.argmin(best))  # ties: the fewest units (argmin takes the first)
    picks = [0] * len(layers)
    for li in range(len(layers) - 1, -1, -1):
        ci = int(choice[li, j])
        picks[li] = ci
        j -= int(math.ceil(layers[li].nbytes[ci] / unit - 1e-9))
    return picks


def solve_grid(layers: Sequence[Layer], capacity: float) -> list[int]:
    """Exhaustive search (tiny problems only): the true optimum, for checking the other solvers."""
    combos = math.prod(len(l.choices) for l in layers)
    if combos > GRID_LIMIT:
        raise EqcError(f"grid search over {combos} plans refused (limit {GRID_LIMIT}); use solver dp")
    cost = np.zeros(1)
    err = np.zeros(1)
    for layer in layers:  # row-major over layers, so unravel_index recovers the picks
        cost = np.add.outer(cost, np.asarray(layer.nbytes, dtype=np.float64)).ravel()
        err = np.add.outer(err, np.asarray(layer.error, dtype=np.float64)).ravel()
    err = np.where(cost <= capacity, err, np.inf)
    if not np.isfinite(err).any():
        raise _infeasible(layers, capacity)
    flat = int(np.argmin(err))
    return [int(i) for i in np.unravel_index(flat, [len(l.choices) for l in layers])]


def solve_entropy(layers: Sequence[Layer], capacity: float, spread: float = ENTROPY_SPREAD) -> list[int]:
    """The entropy heuristic (LLMEasyQuant-style): layers whose weights carry more information get more bits.

    Each layer's target is t + spread * z (z: its weight entropy's z-score over the layers, spread in
    bits per standard deviation); it takes the largest choice whose bits per weight stay within the
    target (the cheapest if none). t is bisected to the largest value whose plan fits: raising t
    never lowers a pick, so the plan's bytes grow monotonically with t. The error table is NOT used:
    the heuristic needs no calibration, which is its point and its weakness.
    """
    if capacity < sum(min(l.nbytes) for l in layers):
        raise _infeasible(layers, capacity)
    h = np.array([l.entropy for l in layers], dtype=np.float64)
    z = (h - h.mean()) / (h.std() if h.std() > 0 else 1.0)
    orders = [sorted(range(len(l.choices)), key=lambda i, l=l: (l.nbytes[i], i)) for l in layers]

    def picks_at(t: float) -> list[int]:
        picks = []
        for layer, order, zi in zip(layers, orders, z):
            target = t + spread * zi
            fits = [i for i in order if 8 * layer.nbytes[i] / layer.params <= target]
            picks.append(fits[-1] if fits else order[0])
        return picks

    lo, hi = -64.0, 64.0  # t: bits; beyond +-64 every layer is at its cheapest / dearest choice
    best = picks_at(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        picks = picks_at(mid)
        if plan_cost(layers, picks)[0] <= capacity:
            lo, best = mid, picks
        else:
            hi = mid
    return best


SOLVERS = {"greedy": solve_greedy, "dp": solve_dp, "grid": solve_grid, "entropy": solve_entropy}


def make_plan(layers: Sequence[Layer], budget: Budget, solver: str = "dp", fixed_bytes: int = 0) -> dict[str, Any]:
    """Solve and describe the plan as the plan-file object."""
    if solver not in SOLVERS:
        raise EqcError(f"unknown solver '{solver}' (known: {', '.join(SOLVERS)})")
    if not layers:
        raise EqcError("no linear layer to plan")
    capacity = budget_capacity(layers, budget, fixed_bytes)
    return plan_from_picks(layers, SOLVERS[solver](layers, capacity), budget, solver, fixed_bytes)


def plan_from_picks(layers: Sequence[Layer], picks: Sequence[int], budget: Budget, solver: str,
                    fixed_bytes: int = 0) -> dict[str, Any]:
    """The plan-file object for one pick per layer."""
    nbytes, err = plan_cost(layers, picks)
    params = sum(l.params for l in layers)
    return {
        "version": PLAN_VERSION,
        "layers": {l.name: l.choices[i] for l, i in zip(layers, picks)},
        "budget": {"text": budget.text, "kind": budget.kind, "value": budget.value, "solver": solver},
        "estimated": {"proxy_error_sum": err, "linear_bytes": int(nbytes), "fixed_bytes": int(fixed_bytes),
                      "average_bits": 8 * nbytes / params,
                      "counts": {p: sum(1 for l, i in zip(layers, picks) if l.choices[i] == p) for p in PRECISIONS}},
    }


def search_ppl(layers: Sequence[Layer], budget: Budget, bound: float, score: Callable[[dict[str, Any]], float],
               solver: str = "dp", steps: int = PPL_STEPS, tolerance: float = 0.01) -> tuple[dict[str, Any], list[dict]]:
    """The smallest plan whose measured perplexity (`score(plan)`) is <= `bound`.

    Probes: the all-cheapest plan first (returned at once if it passes), then `steps` bisection
    steps on log(average bits) between it and the all-most-precise plan, whose solved plans are
    scored; the most precise plan itself is scored only if no bisection probe passed. Then each
    uniform plan (every layer at one choice) smaller than the best passing plan is scored too, as
    the proxy can misjudge layers (on SmolLM2 it trades int4 MLPs for float v_proj layers). The
    passing probe with the fewest bytes wins. Unreachable bounds raise EqcError with the best
    perplexity measured.
    """
    if solver not in SOLVERS:
        raise EqcError(f"unknown solver '{solver}' (known: {', '.join(SOLVERS)})")
    if not layers:
        raise EqcError("no linear layer to plan")
    params = sum(l.params for l in layers)
    cheapest = [int(np.argmin(l.nbytes)) for l in layers]
    dearest = [int(np.argmax(l.nbytes)) for l in layers]
    probes: list[dict[str, Any]] = []
    scored: dict[tuple, float] = {}
    passing: list[tuple[int, int, dict[str, Any]]] = []

    def probe(bits: float, picks: Sequence[int] | None = None) -> bool:
        if picks is None:
            try:
                plan = make_plan(layers, Budget("bits", bits, f"{bits:.4f}bits"), solver)
            except EqcError:  # the DP rounds costs up: just above the cheapest plan it may find none
                probes.append({"bits_budget": bits, "feasible": False, "ok": False})
                return False
        else:
            plan = plan_from_picks(layers, picks, Budget("bits", bits, f"{bits:.4f}bits"), solver)
        key = tuple(sorted(plan["layers"].items()))
        if key not in scored:
            scored[key] = float(score(plan))
        ok = scored[key] <= bound
        est = plan["estimated"]
        probes.append({"bits_budget": round(bits, 4), "average_bits": est["average_bits"],
                       "linear_bytes": est["linear_bytes"], "ppl": scored[key], "ok": ok})
        if ok:
            passing.append((est["linear_bytes"], len(passing), plan))
        return ok

    lo, hi = 8 * plan_cost(layers, cheapest)[0] / params, 8 * plan_cost(layers, dearest)[0] / params
    if not probe(lo, cheapest):
        for _ in range(steps):
            if hi <= lo * (1 + tolerance):
                break
            mid = math.sqrt(lo * hi)
            if probe(mid):
                hi = mid
            else:
                lo = mid
        if not passing and not probe(hi, dearest):
            best = min(p["ppl"] for p in probes if "ppl" in p)
            raise EqcError(f"budget '{budget.text}' unreachable: even the most precise plan (every linear layer at "
                           f"its most precise choice) measures perplexity {best:.4f} > bound {bound:.4f}")
        for choice in sorted(set.intersection(*(set(l.choices) for l in layers)), key=lambda c: PRECISIONS_ORDER[c]):
            picks = [l.choices.index(choice) for l in layers]
            nbytes = plan_cost(layers, picks)[0]
            if nbytes < min(passing)[0] and picks not in (cheapest, dearest):
                probe(8 * nbytes / params, picks)
    plan = min(passing, key=lambda t: t[:2])[2]
    plan["budget"] = {"text": budget.text, "kind": budget.kind, "value": budget.value, "solver": solver}
    return plan, probes


def plan_table(report: dict[str, Any]) -> list[str]:
    """Text lines of apply_precision_plan's report: the per-layer table and any perplexity probes."""
    head = "logits KL" if report.get("sensitivity") == "kl" else "proxy error"
    lines = [f"{'layer':<48} {'precision':<10} {'bits':>6} {head:>12}"]
    for row in report.get("table", []):
        proxy = "-" if row["proxy"] is None else f"{row['proxy']:.3e}"
        lines.append(f"{row['layer']:<48} {row['precision']:<10} {row['bits']:>6.2f} {proxy:>12}")
    lines.append(f"average {report['average_bits']:.2f} bits per linear weight, {report['linear_bytes'] / 1e6:.2f} MB")
    search = report["plan"].get("search")
    if search:
        lines.append(f"perplexity search ({search['budget']}): float {search['ref_ppl']:.4f} -> bound "
                     f"{search['bound']:.4f} on {search['tokens']} held-out tokens of {search['text']}")
        for p in search["probes"]:
            if "ppl" in p:
                lines.append(f"  probe {p['bits_budget']:>7.3f} bits budget: {p['average_bits']:.2f} bits, "
                             f"{p['linear_bytes'] / 1e6:.2f} MB, ppl {p['ppl']:.4f} {'ok' if p['ok'] else 'over'}")
            else:
                lines.append(f"  probe {p['bits_budget']:>7.3f} bits budget: no plan fits")
    return lines


def validate_plan(plan: Any, origin: str) -> dict[str, Any]:
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or not isinstance(plan.get("layers"), dict):
        raise EqcError(f"plan {origin} is not an eqc plan (expected {{\"version\": {PLAN_VERSION}, \"layers\": {{...}}}})")
    bad = {k: v for k, v in plan["layers"].items() if v not in PRECISIONS}
    if bad:
        name, value = next(iter(bad.items()))
        raise EqcError(f"plan {origin}: layer '{name}' has precision {value!r} (valid: {', '.join(PRECISIONS)})")
    return plan


def save_plan(path: str | pathlib.Path, plan: dict[str, Any]) -> None:
    validate_plan(plan, f"for '{path}'")
    with staged_file(pathlib.Path(path)) as tmp:
        tmp.write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")


def load_plan(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    return validate_plan(read_json_file(path, "plan file"), f"'{path}'")


def all_plans(layers: Sequence[Layer]) -> itertools.product:
    """Every pick vector (for tests on tiny tables)."""
    return itertools.product(*[range(len(l.choices)) for l in layers])
