"""SmoothQuant's coarse-to-fine alpha search (calibration/alpha_search.py): the full grid's choice, fewer scores."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from eqcompiler.artifact import folder as am
from eqcompiler.calibration.alpha_search import NarrowedSmoothQuant, coarse_to_fine, pick
from eqcompiler.calibration.calibrate import calibrate
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.passes.smooth_quant import SmoothQuantPass
from eqcompiler.runtime.session import causal_feed, make_session

from conftest import WIKI_VALID

GRID = [round(0.3 + 0.05 * i, 2) for i in range(14)]  # smooth_quant's default alpha_grid


@pytest.mark.parametrize("best", [0, 5, 6, 12, 13])
def test_coarse_to_fine_finds_a_one_valley_minimum(best):
    calls: list[float] = []

    def score(alpha: float) -> float:
        calls.append(alpha)
        return (GRID.index(alpha) - best) ** 2 + 1.0

    scored = coarse_to_fine(score, GRID)
    assert pick(scored, GRID, base=100.0, allow_identity=True) == (best, 1.0)
    assert len(calls) == len(set(calls)) <= 10  # 8 coarse points (every other + the last) and 2 neighbours


def test_pick_keeps_the_pass_tie_rule():
    """The identity wins ties against every alpha, and the first grid point wins ties among alphas."""
    assert pick({2: 1.0, 4: 1.0}, GRID, base=1.0, allow_identity=True) == (None, 1.0)
    assert pick({4: 1.0, 2: 1.0}, GRID, base=2.0, allow_identity=True) == (2, 1.0)
    assert pick({3: 5.0}, GRID, base=1.0, allow_identity=False) == (3, 5.0)


def test_a_second_valley_between_coarse_points_is_missed_and_says_so():
    """What the search gives up: a minimum at an odd grid index whose neighbours are both worse than the
    coarse best elsewhere is not found; the choice is the coarse valley's, with its (higher) score."""
    curve = [5.0] * 14
    curve[2], curve[9] = 1.0, 0.5  # 9 is odd: not a coarse point; its neighbours 8 and 10 score 5.0
    scored = coarse_to_fine(lambda a: curve[GRID.index(a)], GRID)
    assert pick(scored, GRID, base=10.0, allow_identity=True) == (2, 1.0)


@pytest.fixture(scope="module")
def sampled(tiny_artifact, tmp_path_factory):
    """The tiny LLaMA and statistics with 256 sampled token rows per linear input (the searcher's rows)."""
    art = tiny_artifact("llama")
    stats = calibrate(art, WIKI_VALID, samples=4, seq_len=64,
                      observers=["minmax", "absmax_channel", "abssum", "sample"])
    return art, stats


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_narrowed_search_scores_as_the_full_grid(sampled, granularity, tmp_path):
    """On every site of a tiny LLaMA the coarse-to-fine search scores exactly as smooth_quant's full grid:
    where the grid's best alpha is among the points it scored, it stores the same alpha, score and scale;
    elsewhere (this random-weight model's curves are noisy) its score is within 5% of the grid's best. It
    costs fewer int8 scores, and the graph it smooths checks, runs in ORT and gives the float model's logits."""
    art, stats = sampled
    folder = am.resolve_artifact(art)
    options = {"search": "sample", "activation_granularity": granularity, "search_rows": 256}
    runs = {}
    for cls in (SmoothQuantPass, NarrowedSmoothQuant):
        model = am.load_ir(am.model_file(folder))
        context = CompileContext(stats=_copy(stats), manifest=dict(folder.manifest))
        step = cls(context, **options)
        step(model)
        runs[cls] = (step, model)
    (full, _), (narrow, narrow_model) = runs[SmoothQuantPass], runs[NarrowedSmoothQuant]
    assert len(full.choices) == 8 and sorted(full.choices) == sorted(narrow.choices)
    same = 0
    for name, choice in full.choices.items():
        mine = narrow.choices[name]
        assert mine.base == choice.base, name  # the identity's score: the same computation
        if choice.alpha is None or choice.alpha in narrow.scored[name]:
            assert (mine.alpha, mine.score) == (choice.alpha, choice.score), name
            assert np.array_equal(mine.scale, choice.scale), name
            same += 1
        else:
            assert choice.score <= mine.score <= 1.05 * choice.score, name
    assert same >= len(full.choices) // 2
    assert narrow.scores_run <= 11 * len(full.choices) < 15 * len(full.choices)  # the full grid: 14 + identity
    # What calibration runs: the choices alone, site by site on popped rows, the graph only read: the same as
    # the pass's, which smooths each site before scoring the next.
    model = am.load_ir(am.model_file(folder))
    nodes = len(list(model.graph))
    rows = {n: t.extra["sample_rows"] for n, t in stats.tensors.items() if "sample_rows" in t.extra}
    searched = NarrowedSmoothQuant(CompileContext(stats=_copy(stats), manifest=dict(folder.manifest)),
                                   **options).search(model, rows)
    assert len(list(model.graph)) == nodes and sorted(searched) == sorted(narrow.choices)
    assert not set(searched) & set(rows)  # each site's rows dropped once scored
    for name, choice in narrow.choices.items():
        mine = searched[name]
        assert (mine.alpha, mine.score, mine.base, mine.granularity) == (choice.alpha, choice.score, choice.base,
                                                                          choice.granularity), name
        assert np.array_equal(mine.scale, choice.scale), name
    path = am.save_ir(narrow_model, tmp_path)
    onnx.checker.check_model(str(path))
    ids = np.random.default_rng(0).integers(4, 500, (1, 24))
    logits = []
    for graph in (path, am.model_file(folder)):
        session = make_session(graph)
        logits.append(session.run(["logits"], causal_feed(session, ids))[0])
    assert np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max() < 1e-4  # smoothing is exact in float


def _copy(stats):
    from eqcompiler.calibration.stats import CalibrationStats, TensorStats

    return CalibrationStats(meta=dict(stats.meta), tensors={
        n: TensorStats(t.min, t.max, t.absmax_channel, t.count, extra=dict(t.extra)) for n, t in stats.tensors.items()})
