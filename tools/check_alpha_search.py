"""Does the coarse-to-fine alpha search (eqcompiler/calibration/alpha_search.py) pick the full grid's alpha?

Runs the SmoothQuant alpha search of RECIPE on an artifact and its statistics scoring every alpha of the grid
(as smooth_quant's own search does), then replays coarse_to_fine on each site's full curve and counts the sites
whose choice differs. The statistics file is copied, never changed.

Usage: .venv/bin/python tools/check_alpha_search.py ART STATS.npz [--recipe w8a8-dynamic]
(SmolLM2, demo_out/fp32 and 16 x 512 statistics: 120 sites, 0 differ, 9.75 grid scores per site instead of 14.)
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("stats")
    ap.add_argument("--recipe", default="w8a8-dynamic")
    args = ap.parse_args()
    from eqcompiler.calibration import alpha_search
    from eqcompiler.compile.pipeline import store_model_searches

    narrowed = alpha_search.coarse_to_fine
    curves: list[dict[int, float]] = []

    def full_grid(score, grid):  # type: ignore[no-untyped-def]
        curves.append({i: score(a) for i, a in enumerate(grid)})
        return curves[-1]

    alpha_search.coarse_to_fine = full_grid
    bases: list[float] = []
    choose = alpha_search.NarrowedSmoothQuant._choose

    def recording(self, site, t, method, x, granularity):  # type: ignore[no-untyped-def]
        result = choose(self, site, t, method, x, granularity)
        bases.append(result[3])
        return result

    alpha_search.NarrowedSmoothQuant._choose = recording
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp) / "stats.npz"
        shutil.copy(args.stats, copy)
        store_model_searches(args.artifact, copy, [args.recipe])
    differ, scored = 0, 0
    for curve, base in zip(curves, bases):
        grid = list(range(len(curve)))
        everything = alpha_search.pick(curve, grid, base, True)
        subset = narrowed(lambda i: curve[int(i)], grid)
        scored += len(subset)
        differ += alpha_search.pick(subset, grid, base, True)[0] != everything[0]
    print(f"{len(curves)} sites, {differ} differ from the full grid, {scored / max(len(curves), 1):.2f} grid scores "
          f"per site instead of {len(curves[0]) if curves else 0}")


if __name__ == "__main__":
    main()
