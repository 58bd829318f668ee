"""Fewer scores per site for SmoothQuant's alpha search on sampled rows (calibration/smoothing_search.py).

smooth_quant scores every alpha of `alpha_grid` on every site (SmolLM2 w8a8-dynamic: 120 sites x 15 int8
GEMMs on 2048 rows, most of `eqc calibrate --for w8a8-dynamic`'s time). The error as a function of alpha is
smooth with one valley on a real model's sites, so a coarse-to-fine search finds the grid's best alpha with
fewer scores: every other grid point first, then the unscored grid neighbours of the best one (10 scores
with the identity instead of 15). Measured on SmolLM2 w8a8-dynamic: the same alpha as the full grid on all
120 sites (tools/check_alpha_search.py; docs/benchmarks.md, Pipeline cost). A noisy curve (a tiny random-weight model on 256 rows) can hide
its best alpha between coarse points: the search then takes its coarse valley's (tests: within 3% of the
grid's best score there), and the stored choice says which alpha and score it took.

`NarrowedSmoothQuant` is smooth_quant itself with only `_choose` replaced: the same sites, scales, scores
(score_ort on the same rows), identity candidate and tie rule (the first grid point with the
lowest error wins, the identity before every alpha), so a site whose best grid alpha is among the scored
points gets exactly the full grid's scale.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from eqcompiler.calibration.smoothing_search import SmoothChoice
from eqcompiler.compile.graph import release_mapping
from eqcompiler.errors import EqcError
from eqcompiler.passes.smooth_quant import (SmoothQuantPass, _head_info, _kxn, _weight_rows_absmax, compute_scale,
                                            find_smooth_sites, score_ort)

Score = Callable[[float], float]


def coarse_to_fine(score: Score, grid: list[float]) -> dict[int, float]:
    """Errors of the grid points scored: every other point (and the last), then the best one's unscored
    neighbours. Returns {grid index: error}."""
    scored: dict[int, float] = {}
    coarse = list(range(0, len(grid), 2))
    if coarse[-1] != len(grid) - 1:
        coarse.append(len(grid) - 1)
    for i in coarse:
        scored[i] = score(grid[i])
    best = min(scored, key=lambda i: (scored[i], i))
    for i in (best - 1, best + 1):
        if 0 <= i < len(grid) and i not in scored:
            scored[i] = score(grid[i])
    return scored


def pick(scored: dict[int, float], grid: list[float], base: float, allow_identity: bool
         ) -> tuple[int | None, float]:
    """The pass's rule on the scored points: the identity (index None) unless an alpha is strictly better;
    among alphas the first in grid order of the lowest error."""
    best: tuple[int | None, float] = (None, base) if allow_identity else (None, float("inf"))
    for i in sorted(scored):
        if scored[i] < best[1]:
            best = (i, scored[i])
    return best


class NarrowedSmoothQuant(SmoothQuantPass):
    """smooth_quant whose per-site alpha search scores coarse_to_fine's points instead of the whole grid.

    `search` gives the choices alone (what calibration stores), site by site, without rewriting the graph.
    """

    def search(self, model: Any, rows: dict[str, np.ndarray]) -> dict[str, SmoothChoice]:
        """Each site's choice on its sampled `rows` [R, K] (popped from `rows` as used: memory falls as the search
        goes); `model` is not changed.

        The same choices as running the pass (`self(model)`): a site's score reads its own statistics and its
        consumers' weights, and the only weights smoothing changes are the consumers' rows (this site's, later
        read by nothing) and a fold linear's columns (v_proj, up_proj), which are consumers of an earlier site
        (their input comes first in the graph), already scored when the pass rescales them.
        """
        opts, stats = self.options, self.context.stats
        sites, _ = find_smooth_sites(model.graph, opts, _head_info(self.context.manifest))
        if not sites:
            raise EqcError("smooth_quant found no smoothable activation")
        for site in sites:
            name = site.activation.name
            t = stats.get(name)
            if t.absmax_channel is None or t.absmax_channel.shape[0] != site.channels:
                raise EqcError(f"statistics for '{name}' have no per-channel maxima of width {site.channels}")
            x = np.asarray(rows.pop(name)[:opts.search_rows], dtype=np.float32)  # as stored_samples reads them
            self.choices[name] = SmoothChoice(*self._choose_site(site, t, "sample", x))
            del x
            for linear in site.sites:
                release_mapping(linear.weight.const_value)  # pages the score touched
        return self.choices

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scores_run = 0  # int8 GEMM scores computed (the search's cost), for the report and tests
        self.scored: dict[str, list[float]] = {}  # per activation: the alphas scored

    def _choose(self, site: Any, t: Any, method: str, x: np.ndarray | None, granularity: str
                ) -> tuple[np.ndarray, float | None, float | None, float | None]:
        opts = self.options
        if method != "sample" or x is None:  # the searcher runs on sampled rows; anything else as the pass does
            return super()._choose(site, t, method, x, granularity)
        w_abs = np.max([_weight_rows_absmax(s) for s in site.sites], axis=0)
        w = np.concatenate([_kxn(s) for s in site.sites], axis=1)
        ref = x @ w

        def error(s: np.ndarray) -> float:
            return score_ort(x, w, s, t.absmax_channel, opts.weight_block_size, ref, granularity, opts.score_norm)

        grid = [float(a) for a in opts.alpha_grid]
        scales: dict[float, np.ndarray] = {}

        def score(alpha: float) -> float:
            scales[alpha] = compute_scale(t.absmax_channel, w_abs, alpha, site, opts)
            self.scores_run += 1
            return error(scales[alpha])

        ones = np.ones(site.channels, np.float32)
        base = error(ones)
        self.scores_run += 1
        scored = coarse_to_fine(score, grid)
        self.scored[site.activation.name] = [grid[i] for i in sorted(scored)]
        index, err = pick(scored, grid, base, opts.allow_identity)
        if index is None:
            return ones, None, err, base
        return scales[grid[index]], grid[index], err, base
