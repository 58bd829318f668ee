"""The noise floor of a SmoothQuant compile: perturb the smoothing scales stored in calibration statistics.

    .venv/bin/python tools/perturb_smooth_scales.py STATS.npz OUT.npz [--rel 3e-6] [--seed 1]

Multiplies every stored `smooth_*_scale` by (1 + rel * N(0, 1)): a change far below calibration noise, of the
size float rounding makes between two exports of the same weights (issue 20: Optimum's and dynamo's SmolLM2 scales
differ from eqc export's by up to 7e-6 relative). Compile and evaluate from OUT.npz as from STATS.npz; the spread
of the perplexities is what any two equivalent graphs may differ by (docs/bring-your-own-onnx.md).
"""
from __future__ import annotations

import argparse

import numpy as np

from eqcompiler.calibration.stats import CalibrationStats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stats")
    parser.add_argument("out")
    parser.add_argument("--rel", type=float, default=3e-6)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    stats = CalibrationStats.load(args.stats)
    rng = np.random.default_rng(args.seed)
    count = 0
    for t in stats.tensors.values():
        for key in [k for k in t.extra if k.startswith("smooth_") and k.endswith("_scale")]:
            t.extra[key] = (t.extra[key] * (1 + args.rel * rng.standard_normal(t.extra[key].shape))).astype(np.float32)
            count += 1
    if not count:
        raise SystemExit(f"{args.stats} stores no smoothing scales (calibrate with --for w8a8-dynamic)")
    stats.save(args.out)
    print(f"perturbed {count} smoothing scale vectors by {args.rel:g} relative (seed {args.seed}) -> {args.out}")


if __name__ == "__main__":
    main()
