"""`eqc report`: one self-contained HTML page comparing artifacts (figures embedded as base64 PNG).

Sections: an accuracy / size / speed table; weight histograms of chosen layers (fp32 vs dequantized,
log-scale counts); per-layer relative Frobenius error of the dequantized weights and their bitwidth;
calibration ranges per channel with outlier channels marked (from a --calib statistics file).
matplotlib (Agg backend, no display) draws the figures; nothing is fetched from the network.
"""
from __future__ import annotations

import base64
import html
import io
import pathlib
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from eqcompiler.artifact import folder as art_mod
from eqcompiler.artifact.atomic import check_output_file, staged_file
from eqcompiler.errors import EqcError
from eqcompiler.compile.graph import const_array, find_linear_sites
from eqcompiler.compile.qdq import QuantizedWeight

DEFAULT_LAYERS = (r"layers\.0\.self_attn\.q_proj$", r"layers\.0\.mlp\.down_proj$", r"lm_head$")
OUTLIER_FACTOR = 6.0  # a channel whose absmax exceeds 6x the tensor's median channel absmax


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EqcError("eqc report needs matplotlib (pip install matplotlib)", exit_code=4) from None
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def layer_weights(model: str | pathlib.Path) -> dict[str, tuple[np.ndarray, int]]:
    """{layer: (weight as float32 in stored orientation (dequantized if quantized), bits)} for every linear site."""
    graph = art_mod.load_ir(model).graph
    out: dict[str, tuple[np.ndarray, int]] = {}
    for site in find_linear_sites(graph):
        if not site.quantized:
            out[site.name] = (site.weight.const_value.numpy().astype(np.float32), 32)
            continue
        dq = site.node.inputs[1].producer()
        if dq.op_type == "Transpose":
            dq = dq.inputs[0].producer()
        q = const_array(dq.inputs[0])
        scale = const_array(dq.inputs[1])
        zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 else None
        if zp is None:
            zp = np.zeros_like(scale, dtype=q.dtype)
        bits = 4 if dq.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.UINT4) else 8
        axis = dq.attributes.get_int("axis", 1) % q.ndim
        qw = QuantizedWeight(q=q, scale=scale, zero_point=zp, axis=axis, block_size=dq.attributes.get_int("block_size", 0),
                             bits=bits, signed=q.dtype == np.int8)
        out[site.name] = (qw.dequantize(), bits)
    return out


def _label(model: str | pathlib.Path) -> str:
    art = art_mod.resolve_artifact(model)
    recipe = (art.manifest.get("quantization") or {}).get("recipe", "fp32")
    target = art.manifest.get("target", "portable")
    return recipe + ("" if target == "portable" else f" [{target}]")


def _metrics(models: list[str], ppl_text: str | None, ppl_tokens: int, speed: bool, prefill: int, past: int,
             runs: int) -> list[dict[str, Any]]:
    from eqcompiler.analysis import evaluate
    from eqcompiler.analysis.bench import bench

    rows = []
    speeds = bench(models, prefill=prefill, past=past, warmup=1, runs=runs) if speed else [None] * len(models)
    for model, sp in zip(models, speeds):
        art = art_mod.resolve_artifact(model)
        row: dict[str, Any] = {"model": str(model), "label": _label(model),
                               "size_bytes": art_mod.size_bytes(art_mod.model_file(art))}
        if ppl_text and art.task in ("causal-lm", "causal-lm-nocache"):  # an encoder's row has no perplexity
            row["ppl"] = evaluate.perplexity(model, ppl_text, max_tokens=ppl_tokens, window=min(512, ppl_tokens))["ppl"]
        if sp and "decode" in sp:
            row.update(prefill_ms=sp["prefill"]["median_ms"], decode_ms=sp["decode"]["median_ms"],
                       peak_rss_mb=sp["peak_rss_mb"], kv_bytes_per_token=(sp["kv_cache"] or {}).get("bytes_per_token"))
        elif sp:  # encoders and graphs without a cache: one forward of batch 1 x --prefill tokens (bench)
            row.update(forward_ms=sp["forward"][0]["median_ms"], peak_rss_mb=sp["peak_rss_mb"])
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]
    cols = [("label", "model"), ("size_bytes", "size (MB)"), ("ppl", "perplexity"), ("prefill_ms", "prefill (ms)"),
            ("decode_ms", "decode step (ms)"), ("forward_ms", "forward (ms)"), ("peak_rss_mb", "peak RSS (MB)"), ("kv_bytes_per_token", "KV bytes/token")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = []
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if v is None:
                cells.append("<td>-</td>")
            elif key == "label":
                cells.append(f"<td title='{html.escape(r['model'])}'>{html.escape(v)}</td>")
            elif key == "size_bytes":
                cells.append(f"<td>{v / 1e6:.1f} <span class=r>({v / ref['size_bytes']:.2f}x)</span></td>")
            elif key in ("prefill_ms", "decode_ms", "forward_ms") and ref.get(key):
                cells.append(f"<td>{v:.1f} <span class=r>({v / ref[key]:.2f}x)</span></td>")
            elif key == "ppl":
                cells.append(f"<td>{v:.3f}</td>")
            else:
                cells.append(f"<td>{v:.0f}</td>" if isinstance(v, (int, float)) else f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _histograms(ref: dict, quants: list[tuple[str, dict]], patterns: tuple[str, ...]) -> list[tuple[str, str]]:
    plt = _plt()
    figs = []
    for pat in patterns:
        name = next((n for n in ref if re.search(pat, n)), None)
        if name is None:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.2))
        w = ref[name][0].ravel()
        lim = float(np.abs(w).max())
        bins = np.linspace(-lim, lim, 161)
        ax.hist(w, bins=bins, histtype="stepfilled", alpha=0.35, color="tab:gray", label="fp32")
        for i, ((label, weights), color) in enumerate(zip(quants, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange"))):
            if name in weights and weights[name][1] < 32:
                # later models dashed so identical weights (e.g. w8 vs w8a8) stay visible
                ax.hist(weights[name][0].ravel(), bins=bins, histtype="step", lw=1.2, color=color, ls=("-", "--", ":", "-.")[i % 4],
                        label=f"{label} (int{weights[name][1]}, dequantized)")
        ax.set_yscale("log")
        ax.set_xlabel("weight value")
        ax.set_ylabel("count (log)")
        ax.set_title(f"{name}  {list(ref[name][0].shape)}", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        figs.append((name, _png(fig)))
    return figs


def _errors(ref: dict, quants: list[tuple[str, dict]]) -> tuple[str, list[dict[str, Any]]]:
    plt = _plt()
    names = [n for n in ref]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    table = []
    for i, ((label, weights), color) in enumerate(zip(quants, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange"))):
        errs, bits = [], []
        for n in names:
            if n in weights and weights[n][1] < 32:
                w = ref[n][0]
                errs.append(float(np.linalg.norm(weights[n][0] - w) / (np.linalg.norm(w) + 1e-30)))
                bits.append(weights[n][1])
            else:
                errs.append(np.nan)
                bits.append(32)
        ax.plot(range(len(names)), errs, ".", ls=("-", "--", ":", "-.")[i % 4], ms=3, lw=0.8, color=color, label=label)
        ax2.step(range(len(names)), bits, where="mid", color=color, lw=1, label=label)
        valid = [e for e in errs if np.isfinite(e)]
        if valid:
            worst = names[int(np.nanargmax(errs))]
            table.append({"model": label, "mean": float(np.mean(valid)), "max": float(np.max(valid)), "worst": worst})
    ax.set_yscale("log")
    ax.set_ylabel("relative Frobenius error")
    ax.set_title("per-layer weight quantization error ||W_dq - W|| / ||W||", fontsize=10)
    ax.legend(fontsize=8)
    ax2.set_ylabel("bits")
    ax2.set_yticks([4, 8, 16, 32])
    step = max(1, len(names) // 30)
    ax2.set_xticks(range(0, len(names), step))
    ax2.set_xticklabels([names[i].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                         for i in range(0, len(names), step)], rotation=70, fontsize=7)
    return _png(fig), table


def _calibration(stats_path: str, tensors: str | None) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    from eqcompiler.calibration.stats import CalibrationStats

    plt = _plt()
    stats = CalibrationStats.load(stats_path)
    names = [n for n, t in stats.tensors.items() if t.absmax_channel is not None]
    if not names:
        raise EqcError(f"'{stats_path}' has no per-channel absmax statistics")
    summary = []
    for n in names:
        a = stats.tensors[n].absmax_channel
        med = float(np.median(a)) or 1e-12
        out = np.flatnonzero(a > OUTLIER_FACTOR * med)
        summary.append({"tensor": n, "absmax": float(a.max()), "median_channel": med, "outliers": out.tolist()})
    figs = []
    # overview: per-tensor max and median channel absmax across the model
    fig, ax = plt.subplots(figsize=(12, 3.4))
    x = np.arange(len(summary))
    ax.semilogy(x, [s["absmax"] for s in summary], ".-", lw=0.8, ms=3, label="max channel |x|")
    ax.semilogy(x, [s["median_channel"] for s in summary], ".-", lw=0.8, ms=3, label="median channel |x|")
    hot = [i for i, s in enumerate(summary) if s["outliers"]]
    ax.semilogy(hot, [summary[i]["absmax"] for i in hot], "o", mfc="none", color="red", ms=6,
                label=f"tensors with outlier channels (>{OUTLIER_FACTOR:g}x median)")
    ax.set_xlabel("linear-layer input (graph order of names)")
    ax.set_ylabel("|x| (log)")
    ax.set_title("calibration ranges per tensor", fontsize=10)
    ax.legend(fontsize=8)
    figs.append(("overview", _png(fig)))
    picked = [n for n in names if tensors and re.search(tensors, n)] if tensors else \
        [s["tensor"] for s in sorted(summary, key=lambda s: -s["absmax"] / s["median_channel"])[:2]]
    for n in picked[:4]:
        a = stats.tensors[n].absmax_channel
        med = float(np.median(a))
        fig, ax = plt.subplots(figsize=(12, 3.0))
        ax.bar(np.arange(len(a)), a, width=1.0, color="tab:blue")
        out = np.flatnonzero(a > OUTLIER_FACTOR * med)
        ax.bar(out, a[out], width=1.0, color="red", label=f"outlier channels: {len(out)} (>{OUTLIER_FACTOR:g}x median {med:.3g})")
        ax.axhline(OUTLIER_FACTOR * med, color="red", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("channel")
        ax.set_ylabel("absmax |x| (log)")
        ax.set_title(n, fontsize=9)
        ax.legend(fontsize=8)
        figs.append((n, _png(fig)))
    return figs, summary


_PRECISION_COLORS = {"int4-g128": "tab:red", "int4-g64": "tab:orange", "int8": "tab:blue", "w8a8": "tab:purple",
                     "float": "tab:gray"}


def _precision_plans(models: list[str], labels: list[str]) -> tuple[list[str], int]:
    """Recipe mixed: per model with a plan in its manifest, a plot (layer vs bits vs proxy) and the table."""
    plt = _plt()
    parts: list[str] = []
    for model, label in zip(models, labels):
        entry = ((art_mod.resolve_artifact(model).manifest.get("quantization") or {}).get("report") or {}).get(
            "apply_precision_plan") or {}
        table = entry.get("table")
        if not table:
            continue
        x = np.arange(len(table))
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 5.2), sharex=True, gridspec_kw={"height_ratios": [1, 1.4]})
        for precision, color in _PRECISION_COLORS.items():
            idx = [i for i, r in enumerate(table) if r["precision"] == precision]
            if not idx:
                continue
            ax.bar(idx, [table[i]["bits"] for i in idx], width=1.0, color=color, label=f"{precision} ({len(idx)})")
            proxy = [(i, table[i]["proxy"]) for i in idx if table[i]["proxy"]]
            if proxy:
                ax2.semilogy([i for i, _ in proxy], [v for _, v in proxy], "o", ms=3, color=color, label=precision)
        ax.set_ylabel("bits / weight")
        ax.set_title(f"{label}: per-layer precision ({entry['average_bits']:.2f} bits on average)", fontsize=10)
        ax.legend(fontsize=8, ncol=5, loc="upper right")
        ax2.set_ylabel("proxy error at chosen precision")
        ax2.set_xlabel("linear layer (graph order)")
        step = max(1, len(table) // 30)
        ax2.set_xticks(x[::step])
        ax2.set_xticklabels([table[i]["layer"].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                             for i in x[::step]], rotation=70, fontsize=7)
        search = entry.get("plan", {}).get("search")
        note = (f"budget {html.escape(search['budget'])}: float ppl {search['ref_ppl']:.3f}, bound {search['bound']:.3f} on "
                f"{search['tokens']} held-out calibration tokens, {len(search['probes'])} probes") if search else \
            f"budget {html.escape(str((entry.get('plan', {}).get('budget') or {}).get('text', 'from a plan file')))}"
        rows = "".join(f"<tr><td>{html.escape(r['layer'])}</td><td>{html.escape(r['precision'])}</td><td>{r['bits']:.2f}</td>"
                       f"<td>{'-' if r['proxy'] is None else format(r['proxy'], '.3e')}</td></tr>" for r in table)
        parts += [f"<h3>{html.escape(label)}</h3><p class=note>{note}</p><img alt='plan' src='{_png(fig)}'>",
                  "<details><summary>per-layer table</summary><table><tr><th>layer</th><th>precision</th><th>bits</th>"
                  f"<th>proxy error</th></tr>{rows}</table></details>"]
    if parts:
        parts.insert(0, "<h2>Mixed-precision plans</h2><p class=note>bits stored per weight (scales and zero points "
                        "included) and the Gram proxy of each layer at its chosen precision (eqcompiler/compile/bitwidth.py)</p>")
    return parts, sum(1 for p in parts if "<img" in p)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1250px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.r{color:#777;font-size:11px}
img{max-width:100%;display:block;margin:6px 0}.grid{display:grid;grid-template-columns:1fr 1fr;gap:8px}
.note{color:#555;font-size:12px}code{background:#f4f4f4;padding:0 3px}"""


def build_report(out: pathlib.Path, models: list[str], ppl_text: str | None = None, ppl_tokens: int = 2048,
                 calib: str | None = None, layers: tuple[str, ...] = DEFAULT_LAYERS, tensors: str | None = None,
                 speed: bool = True, prefill: int = 128, past: int = 128, runs: int = 3,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write the HTML report; returns a summary (figures, rows)."""
    if not models:
        raise EqcError("give at least one artifact with --models")
    out = pathlib.Path(out)
    check_output_file(out, overwrite)  # exists, a folder, missing or read-only folder: before any work
    _plt()
    rows = _metrics(models, ppl_text, ppl_tokens, speed, prefill, past, runs)
    weights = [(row["label"], layer_weights(m)) for row, m in zip(rows, models)]
    ref_i = next((i for i, (_, w) in enumerate(weights) if w and all(b == 32 for _, b in w.values())), None)
    parts = [f"<h1>eqc report</h1><p class=note>models: {', '.join(html.escape(r['label']) for r in rows)}</p>",
             "<h2>Accuracy, size and speed</h2>", _table(rows)]
    notes = []
    if ppl_text:
        notes.append(f"perplexity on <code>{html.escape(str(ppl_text))}</code>, first {ppl_tokens} tokens, windows of {min(512, ppl_tokens)}")
    if speed:
        notes.append(f"speed: ONNX Runtime CPU, 2 threads, prefill {prefill} tokens, decode 1 token with {past} cached "
                     f"(encoders: one forward of 1 x {prefill} tokens), "
                     f"median of {runs} runs after 1 warm-up, each model in its own process; ratios vs the first row")
    parts.append("<p class=note>" + "<br>".join(notes) + "</p>")
    figures = 0
    if ref_i is None:
        parts.append("<p class=note>no fp32 artifact among --models: weight histograms and errors need one</p>")
    else:
        ref = weights[ref_i][1]
        quants = [(label, w) for i, (label, w) in enumerate(weights) if i != ref_i and any(b < 32 for _, b in w.values())]
        hists = _histograms(ref, quants, layers)
        parts.append("<h2>Weight histograms (fp32 vs dequantized)</h2><div class=grid>")
        parts += [f"<div><img alt='{html.escape(n)}' src='{src}'></div>" for n, src in hists]
        parts.append("</div>")
        figures += len(hists)
        if quants:
            src, err_rows = _errors(ref, quants)
            parts.append(f"<h2>Per-layer quantization error and bitwidth</h2><img alt='errors' src='{src}'>")
            parts.append("<table><tr><th>model</th><th>mean rel. error</th><th>max rel. error</th><th>worst layer</th></tr>"
                         + "".join(f"<tr><td>{html.escape(r['model'])}</td><td>{r['mean']:.4f}</td><td>{r['max']:.4f}</td>"
                                   f"<td>{html.escape(r['worst'])}</td></tr>" for r in err_rows) + "</table>")
            figures += 1
        lowered = [label for label, w in weights if not w]
        if lowered:
            parts.append(f"<p class=note>{', '.join(map(html.escape, lowered))}: weights live inside lowered ORT kernels; not plotted</p>")
    plan_parts, plan_figures = _precision_plans(models, [r["label"] for r in rows])
    parts += plan_parts
    figures += plan_figures
    outlier_tensors = 0
    if calib:
        figs, summary = _calibration(calib, tensors)
        outlier_tensors = sum(1 for s in summary if s["outliers"])
        parts.append(f"<h2>Calibration ranges</h2><p class=note>{html.escape(str(calib))}: {len(summary)} tensors, "
                     f"{outlier_tensors} with outlier channels (absmax &gt; {OUTLIER_FACTOR:g}x the median channel), marked red</p>")
        parts += [f"<img alt='{html.escape(n)}' src='{src}'>" for n, src in figs]
        figures += len(figs)
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>eqc report</title><style>{CSS}</style></head>"
           f"<body>{''.join(parts)}</body></html>")
    with staged_file(out, overwrite=overwrite) as tmp:
        pathlib.Path(tmp).write_text(doc)
    return {"output": str(out), "rows": rows, "figures": figures, "outlier_tensors": outlier_tensors,
            "bytes": out.stat().st_size}
