"""Short fuzz run: random transformer-shaped graphs through every built-in recipe.

Each outcome must be a valid, ORT-loadable graph within the recipe's error bound (see
tools/fuzz_recipes.py BOUNDS) or an EqcError refusal. The long run (500 graphs) is
`tools/fuzz_recipes.py`, results in tools/results/fuzz.md.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from fuzz_recipes import ACCEPTED, fuzz_case  # noqa: E402

from eqcompiler.models.synthetic import SynthSpec  # noqa: E402


@st.composite
def specs(draw) -> SynthSpec:
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    return SynthSpec(hidden=heads * draw(st.sampled_from([8, 16, 32])), layers=draw(st.integers(1, 3)), heads=heads,
                     kv_heads=kv_heads, intermediate=draw(st.sampled_from([16, 48, 96])),
                     vocab=draw(st.sampled_from([64, 100, 256])), norm=draw(st.sampled_from(["rms", "layer"])),
                     act=draw(st.sampled_from(["silu", "gelu", "relu"])), tied=draw(st.booleans()),
                     linear=draw(st.sampled_from(["matmul", "gemm"])), dynamic=draw(st.booleans()),
                     seq_len=draw(st.sampled_from([8, 16])), kv_cache=draw(st.booleans()), bias=draw(st.booleans()),
                     weight_std=draw(st.sampled_from([0.02, 0.05, 0.2])), seed=draw(st.integers(0, 2 ** 16)))


SEEN: list[dict] = []


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), external=st.booleans())
def test_recipes_on_random_graphs(spec: SynthSpec, external: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="eqc-fuzz-") as tmp:
        rows = fuzz_case(spec, pathlib.Path(tmp), external=external)
    SEEN.extend(rows)
    bad = [r for r in rows if r["outcome"] not in ACCEPTED]
    assert not bad, f"{spec}: {bad}"
    for row in rows:
        if row["outcome"] == "ok":
            assert row["rel_error"] <= row["bound"]
        else:
            assert row["message"] and "\n" not in row["message"]


def test_fuzz_covered_every_recipe() -> None:
    """The run above compiled (not only refused) every recipe at least once, with a real error figure."""
    from eqcompiler.compile.recipes import builtin_recipes

    if not SEEN:
        pytest.skip("run together with test_recipes_on_random_graphs")
    ok = {r["recipe"] for r in SEEN if r["outcome"] == "ok"}
    assert ok == set(builtin_recipes())
    w8 = [r["rel_error"] for r in SEEN if r["recipe"] == "w8" and r["outcome"] == "ok"]
    assert 0 < max(w8) < 0.1
