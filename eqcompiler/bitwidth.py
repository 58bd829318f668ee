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
- grid: exhaustive search, only for tiny problems; tests use it to prove the DP optimal.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from eqcompiler.atomic import staged_file
from eqcompiler.errors import EqcError

# name -> (bits, block_size, symmetric); None = keep the float weight.
PRECISIONS: dict[str, tuple[int, int, bool] | None] = {
    "int4-g128": (4, 128, False),  # as the w4-rtn recipe: uint4 asymmetric blocks of 128
    "int4-g64": (4, 64, False),
    "int8": (8, 0, True),  # as the w8 recipe: int8 symmetric per output channel
    "float": None,
}
PLAN_VERSION = 1
GRID_LIMIT = 4 ** 10  # exhaustive search is refused above this many combinations


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
    kind: str  # "bits" (average bits per planned linear weight) or "bytes" (whole artifact)
    value: float
    text: str


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_budget(text: str) -> Budget:
    """'6bits' / '4.5bits' -> average bits; '120MB' / '1.2GiB' -> bytes; 'ppl+2%' -> refused for now."""
    s = str(text).strip().lower().replace(" ", "")
    if s.startswith("ppl"):
        raise EqcError(f"budget '{text}': perplexity budgets (ppl+X%) are not supported yet; "
                       "use an average bitwidth (e.g. 6bits) or a size (e.g. 120MB)")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bits?|b|kb|mb|gb|kib|mib|gib)", s)
    if not m:
        raise EqcError(f"budget '{text}' not understood: use e.g. 6bits, 120MB or 1.2GiB")
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
    error: list[float]


def layer_sensitivity(name: str, w: np.ndarray, gram: np.ndarray,
                      choices: Sequence[str] = tuple(PRECISIONS)) -> Layer:
    """Proxy error of each precision for a [K, N] weight, relative to the layer's output energy."""
    from eqcompiler.passes.gptq import output_error
    from eqcompiler.passes.quantize_weights import quantize_site_weight

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
        dw = quantize_site_weight(w, False, bits, sym, block).dequantize() - w
        errors.append(output_error(dw, gram) / ref if ref > 0 else 0.0)
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


def solve_dp(layers: Sequence[Layer], capacity: float, resolution: int = 4000) -> list[int]:
    """Multiple-choice knapsack: min summed error with costs in integer units (rounded up)."""
    if capacity < sum(min(l.nbytes) for l in layers):
        raise _infeasible(layers, capacity)
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


SOLVERS = {"greedy": solve_greedy, "dp": solve_dp, "grid": solve_grid}


def make_plan(layers: Sequence[Layer], budget: Budget, solver: str = "dp", fixed_bytes: int = 0) -> dict[str, Any]:
    """Solve and describe the plan as the plan-file object."""
    if solver not in SOLVERS:
        raise EqcError(f"unknown solver '{solver}' (known: {', '.join(SOLVERS)})")
    if not layers:
        raise EqcError("no linear layer to plan")
    capacity = budget_capacity(layers, budget, fixed_bytes)
    picks = SOLVERS[solver](layers, capacity)
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
    if not path.is_file():
        raise EqcError(f"plan file '{path}' does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EqcError(f"plan file '{path}' is not valid JSON: {exc}") from None
    return validate_plan(data, f"'{path}'")


def all_plans(layers: Sequence[Layer]) -> itertools.product:
    """Every pick vector (for tests on tiny tables)."""
    return itertools.product(*[range(len(l.choices)) for l in layers])
