"""The report of a collapse sweep (:mod:`~deepvit_jax.analysis.sweep`): per (model, depth)
and per width, over seeds, top-1 and every measure's similar-block count and mean adjacent
similarity (values per seed, mean, std, min, max), and its figures (matplotlib, PNG):

* ``adjacent.png``: the paper's Fig. 2 axes, block index p against M^{p,p+1} (mean over
  seeds) for every depth, one panel per (measure, model), with the threshold line;
* ``depth.png``: similar blocks against depth (mean, min-max over seeds) per measure, and
  top-1 against depth (the paper's pilot study);
* ``width.png``: the plain ViT's width sweep, similar blocks and top-1 against width;
* ``histogram.png``: the per-(image, head, token) cosines M^{p,p+1}_{h,t} of the deepest
  models (second half of the blocks, every seed), maps that weigh the values and softmax.
"""

from __future__ import annotations

import os

import numpy as np

from deepvit_jax.analysis.measures import HISTOGRAM_BINS
from deepvit_jax.analysis.plots import pyplot, save

MODELS = {"vit": "vit_16b", "deepvit": "deepvit_16b"}  # Re-attention in none / every block

# The measures the report tabulates: (result key, label).
MEASURES = (("weights/eq2", "Eq. 2, maps that weigh the values (paper)"),
            ("softmax/eq2", "Eq. 2, softmax maps before mixing"),
            ("weights/abs", "mean |cos|, maps that weigh the values"),
            ("weights/aligned", "head-sign-aligned cos, maps that weigh the values"),
            ("cka", "linear CKA of the block outputs"))


def _spread(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"values": v.tolist(), "mean": float(v.mean()), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max())}


def _summary(rs: list[dict]) -> dict:
    """One (model, depth, width) over its seeds."""
    rs = sorted(rs, key=lambda x: x["run"]["seed"])
    out = {"seeds": [x["run"]["seed"] for x in rs], "top1": _spread([x["top1"] for x in rs])}
    for key, _ in MEASURES:
        out[key] = {"similar_blocks": _spread([x[key]["similar_blocks"] for x in rs]),
                    "mean_adjacent": _spread([x[key]["mean_adjacent"] for x in rs]),
                    "adjacent_mean_over_seeds": np.mean(
                        [x[key]["adjacent"] for x in rs], axis=0).tolist()}
    for kind in ("weights", "softmax"):
        out[f"{kind}/quantiles_mean_over_pairs"] = {
            q: _spread([np.mean(x[f"{kind}/quantiles"][q]) for x in rs])
            for q in rs[0][f"{kind}/quantiles"]}
        out[f"{kind}/histogram"] = np.sum([x[f"{kind}/histogram"] for x in rs], axis=0).tolist()
    out["softmax/uniformity"] = _spread([np.mean(x["softmax/uniformity"]) for x in rs])
    return out


def make_report(settings: dict, results: dict[str, dict]) -> dict:
    """The JSON report from the runs' results (``name -> result.json``)."""
    groups: dict[tuple, list[dict]] = {}
    for res in results.values():
        r = res["run"]
        groups.setdefault((r["model"], r["depth"], r["width"]), []).append(res)
    w, wd = settings["width"], settings["width_depth"]
    depth = {m: {str(d): _summary(groups[(m, d, w)]) for d in settings["depths"]
                 if (m, d, w) in groups} for m in MODELS}
    width = {str(x): _summary(groups[("vit", wd, x)]) for x in settings["widths"]
             if ("vit", wd, x) in groups}
    return {"settings": settings, "measures": dict(MEASURES), "num_runs": len(results),
            "runs": sorted(results), "depth_sweep": depth, "width_sweep": width}


def plot_all(report: dict, out: str) -> list[str]:
    """Every figure of ``report`` into ``out``; the paths written."""
    paths = [_plot_adjacent(report, os.path.join(out, "adjacent.png")),
             _plot_depth(report, os.path.join(out, "depth.png")),
             _plot_histogram(report, os.path.join(out, "histogram.png"))]
    if report["width_sweep"]:
        paths.append(_plot_width(report, os.path.join(out, "width.png")))
    return paths


def _plot_adjacent(report: dict, path: str) -> str:
    plt = pyplot()
    thr = report["settings"]["threshold"]
    fig, axes = plt.subplots(len(MEASURES), len(MODELS), figsize=(4.5 * len(MODELS),
                             2.6 * len(MEASURES)), squeeze=False, constrained_layout=True)
    for row, (key, label) in enumerate(MEASURES):
        for col, m in enumerate(MODELS):
            ax = axes[row, col]
            for d, summ in report["depth_sweep"][m].items():
                ax.plot(summ[key]["adjacent_mean_over_seeds"], marker="o", ms=2,
                        label=f"{d} blocks")
            ax.axhline(thr, color="grey", lw=0.8, ls="--")
            ax.set(title=f"{m}: {label}", xlabel="block p", ylabel="M(p, p+1)")
            ax.title.set_fontsize(8)
            if row == 0:
                ax.legend(fontsize=6)
    save(fig, path)
    plt.close(fig)
    return path


def _errorbar(ax, xs, spreads, label):
    mean = np.array([s["mean"] for s in spreads])
    lo = mean - np.array([s["min"] for s in spreads])
    hi = np.array([s["max"] for s in spreads]) - mean
    ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", ms=3, capsize=3, label=label)


def _plot_depth(report: dict, path: str) -> str:
    plt = pyplot()
    n = len(MEASURES) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False,
                             constrained_layout=True)
    for m in MODELS:
        sweep = report["depth_sweep"][m]
        depths = [int(d) for d in sweep]
        for i, (key, label) in enumerate(MEASURES):
            _errorbar(axes[0, i], depths, [s[key]["similar_blocks"] for s in sweep.values()], m)
            axes[0, i].set(title=label, xlabel="depth", ylabel="similar blocks")
            axes[0, i].title.set_fontsize(8)
        _errorbar(axes[0, -1], depths, [s["top1"] for s in sweep.values()], m)
    axes[0, -1].set(title="test top-1 (pilot study)", xlabel="depth", ylabel="top-1 %")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.suptitle("mean and min-max over seeds", fontsize=9)
    save(fig, path)
    plt.close(fig)
    return path


def _plot_width(report: dict, path: str) -> str:
    plt = pyplot()
    sweep = report["width_sweep"]
    widths = [int(w) for w in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), constrained_layout=True)
    for key, label in MEASURES:
        _errorbar(axes[0], widths, [s[key]["similar_blocks"] for s in sweep.values()], label)
    _errorbar(axes[1], widths, [s["top1"] for s in sweep.values()], "vit")
    d = report["settings"]["width_depth"]
    axes[0].set(title=f"ViT, {d} blocks", xlabel="width", ylabel="similar blocks")
    axes[1].set(title=f"ViT, {d} blocks", xlabel="width", ylabel="top-1 %")
    axes[0].legend(fontsize=6)
    save(fig, path)
    plt.close(fig)
    return path


def _plot_histogram(report: dict, path: str) -> str:
    plt = pyplot()
    edges = np.linspace(-1, 1, HISTOGRAM_BINS + 1)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), squeeze=False, constrained_layout=True)
    for col, kind in enumerate(("weights", "softmax")):
        ax = axes[0, col]
        for m in MODELS:
            sweep = report["depth_sweep"][m]
            if not sweep:
                continue
            d = max(sweep, key=int)
            counts = np.asarray(sweep[d][f"{kind}/histogram"], np.float64)
            ax.stairs(counts / max(counts.sum(), 1), edges, label=f"{m}, {d} blocks")
        ax.set(title=f"cos M(p, p+1) per (image, head, token), {kind} maps", xlabel="cosine",
               ylabel="fraction")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    save(fig, path)
    plt.close(fig)
    return path



def _cell(s: dict) -> str:
    """'mean (min-max)' of a spread of percentages."""
    return f"{s['mean']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def _signed(s: dict) -> str:
    """'mean (min to max)', two decimals (the values may be negative)."""
    return f"{s['mean']:.2f} ({s['min']:.2f} to {s['max']:.2f})"


def _row(cells: list[str], summ: dict, depth: int) -> str:
    counts = [summ[k]["similar_blocks"] for k, _ in MEASURES]
    cells = [*cells, ",".join(map(str, summ["seeds"])), _cell(summ["top1"])]
    cells += [f"{c['mean']:.1f} ({c['min']:g}-{c['max']:g}) of {depth - 1}" for c in counts]
    cells += [_signed(summ["weights/eq2"]["mean_adjacent"]),
              _signed(summ["weights/abs"]["mean_adjacent"])]
    return "| " + " | ".join(cells) + " |"


def markdown_tables(report: dict) -> str:
    """The report's tables (GitHub markdown): per (model, depth) and per plain-ViT width,
    over seeds, top-1 and each measure's similar blocks, mean (min-max); what
    ``OUT/report.md`` holds and docs/collapse.md quotes."""
    head = (["seeds", "top-1 % mean (min-max)"] + [f"similar: {k}" for k, _ in MEASURES]
            + ["mean adjacent Eq. 2", "mean adjacent \\|cos\\|"])
    thr = report["settings"]["threshold"]
    lines = [f'"Similar" = adjacent-block value >= {thr:g}, mean (min-max) over the seeds:',
             "", "| model | blocks | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for m in MODELS:
        for d, summ in sorted(report["depth_sweep"][m].items(), key=lambda x: int(x[0])):
            lines.append(_row([m, d], summ, int(d)))
    if report["width_sweep"]:
        wd = report["settings"]["width_depth"]
        lines += ["", f"Plain-ViT width sweep at {wd} blocks:", "",
                  "| width | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for w, summ in sorted(report["width_sweep"].items(), key=lambda x: int(x[0])):
            lines.append(_row([w], summ, wd))
    return "\n".join(lines) + "\n"
