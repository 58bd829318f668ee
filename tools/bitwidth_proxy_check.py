"""Does the Gram proxy (eqcompiler.compile.bitwidth) rank SmolLM2's layers like the real damage?

For a sample of linear layers and precisions, quantize ONE layer (round-to-nearest, as
apply_precision_plan does) in the PyTorch model, run a few WikiText-2 test windows and measure the
logits KL against the float model; compare with the proxy from the calibration Gram matrices.

    python tools/bitwidth_proxy_check.py ARTIFACT STATS.npz [--every 3] [--windows 2] [--seq 256]

Writes tools/results/bitwidth_proxy_<model>.json and prints Spearman correlations.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch

from eqcompiler.compile import bitwidth as bw
from eqcompiler.artifact.folder import load_ir, model_file, resolve_artifact
from eqcompiler.data import find_wikitext, tokenize, windows
from eqcompiler.compile.pass_base import CompileContext
from eqcompiler.passes.apply_precision_plan import ApplyPrecisionPlanPass
from eqcompiler.passes.gptq import weight_only_sites
from eqcompiler.compile.qdq import quantize_site_weight
from eqcompiler.calibration.stats import CalibrationStats
from eqcompiler.models.loaders import load_source

HERE = pathlib.Path(__file__).resolve().parent


def ranks(x: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x))).astype(np.float64)


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("stats")
    ap.add_argument("--source", default="smollm2")
    ap.add_argument("--every", type=int, default=3, help="Use decoder layers 0, every, 2*every, ...")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precisions", default="int4-g128,int8")
    args = ap.parse_args()
    torch.set_num_threads(2)

    graph = load_ir(model_file(resolve_artifact(args.artifact))).graph
    p = ApplyPrecisionPlanPass(CompileContext(stats=CalibrationStats.load(args.stats)))
    groups = [g for g in weight_only_sites(graph, None, None)
              if ".layers." in g[0].name and int(g[0].name.split(".layers.")[1].split(".")[0]) % args.every == 0]
    table = {g[0].name: p._sensitivity(g[0].name, g) for g in groups}
    del graph

    loaded = load_source(args.source)
    model, tok = loaded.model, loaded.tokenizer
    text = find_wikitext("test").read_text()
    ids = tokenize(tok, text, max_tokens=args.windows * args.seq)
    batch = torch.from_numpy(np.concatenate(list(windows(ids, args.seq, args.windows))))
    with torch.no_grad():
        ref = model(batch).logits
        modules = dict(model.named_modules())
        rows = []
        for name, layer in table.items():
            lin = modules[name]
            w0 = lin.weight.data.clone()  # [N, K]
            for precision in args.precisions.split(","):
                bits, block, sym = bw.PRECISIONS[precision]
                wq = quantize_site_weight(w0.numpy().T.copy(), False, bits, sym, block).dequantize()
                lin.weight.data = torch.from_numpy(np.ascontiguousarray(wq.T))
                rows.append({"layer": name, "precision": precision, "kl": kl(ref, model(batch).logits),
                             "proxy": layer.error[layer.choices.index(precision)]})
                lin.weight.data = w0
            print(rows[-2:], flush=True)
    result = {"layers": len(table), "rows": rows,
              "spearman_joint": spearman([r["proxy"] for r in rows], [r["kl"] for r in rows])}
    for precision in args.precisions.split(","):
        sel = [r for r in rows if r["precision"] == precision]
        result[f"spearman_{precision}"] = spearman([r["proxy"] for r in sel], [r["kl"] for r in sel])
    out = HERE / "results" / f"bitwidth_proxy_{args.source}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print({k: v for k, v in result.items() if k != "rows"})


if __name__ == "__main__":
    main()
