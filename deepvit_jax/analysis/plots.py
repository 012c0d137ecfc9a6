"""Figures of the collapse measures and of attention maps over the image (matplotlib).

Every function returns the ``matplotlib.figure.Figure`` and, given ``path``, also writes it
(atomically; the format follows the extension, e.g. ``.png``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from deepvit_jax.analysis import similarity as sim
from deepvit_jax.utils import atomic_output


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | None, dpi: int = 120):
    """Write ``fig`` to ``path`` through a temporary file (never a half-written image)."""
    if path:
        ext = os.path.splitext(path)[1].lstrip(".") or "png"
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format=ext, dpi=dpi, bbox_inches="tight")
    return fig


def plot_similarity(results: Mapping[str, dict], path: str | None = None, *,
                    title: str | None = None):
    """Several checkpoints on one figure: the similarity of each block to its next k blocks
    against block index (the paper's Fig. 2), the inter-head similarity per block, and each
    checkpoint's D x D cross-layer matrix. ``results``: label -> :func:`analyse` result."""
    plt = pyplot()
    labels = list(results)
    n = len(labels)
    fig = plt.figure(figsize=(4.2 * max(n, 2), 7.6), constrained_layout=True)
    grid = fig.add_gridspec(2, max(n, 2))
    ax_next = fig.add_subplot(grid[0, :max(n, 2) // 2])
    ax_head = fig.add_subplot(grid[0, max(n, 2) // 2:])
    for label in labels:
        r = results[label]
        blocks = np.arange(len(r["to_next"]))
        ax_next.plot(blocks, r["to_next"], marker="o", ms=3,
                     label=f"{label} ({r['similar_blocks']} similar)")
        ax_head.plot(np.arange(r["depth"]), r["inter_head_mean"], marker="o", ms=3, label=label)
    first = results[labels[0]]
    ax_next.axhline(first["threshold"], color="grey", lw=0.8, ls="--")
    ax_next.set(xlabel="block p", ylabel=f"mean M(p, p+1..p+{first['k']})",
                title=f"similarity to the next {first['k']} block(s)")
    ax_head.set(xlabel="block", ylabel="mean cosine between heads",
                title="inter-head similarity")
    for ax in (ax_next, ax_head):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    low = min(0.0, *(float(np.min(results[label]["cross_layer"])) for label in labels))
    for i, label in enumerate(labels):
        ax = fig.add_subplot(grid[1, i])
        m = np.asarray(results[label]["cross_layer"])
        im = ax.imshow(m, vmin=low, vmax=1, cmap="viridis")  # one scale for all
        ax.set(title=f"{label}: M(p, q)", xlabel="block q", ylabel="block p")
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_attention(image: np.ndarray, maps: Sequence[np.ndarray], blocks: Sequence[int],
                   path: str | None = None, *, index: int = 0, mean=(0.5, 0.5, 0.5),
                   std=(0.5, 0.5, 0.5), title: str | None = None):
    """The class token's attention over the image (the official visualisation): one row per
    chosen block, the image, then the head-averaged map, then each head's. ``maps``: the
    list :func:`collect_maps` returns; ``image``: the preprocessed (B, S, S, 3) batch (shown
    un-normalised with ``mean`` / ``std``); ``index``: which image of the batch."""
    plt = pyplot()
    image = np.asarray(image)[index]
    shown = np.clip(image * np.asarray(std) + np.asarray(mean), 0, 1)
    heads = np.asarray(maps[0]).shape[1]
    cols = heads + 2
    fig, axes = plt.subplots(len(blocks), cols, figsize=(1.9 * cols, 1.9 * len(blocks)),
                             squeeze=False, constrained_layout=True)
    size = image.shape[0]
    for row, b in enumerate(blocks):
        if not 0 <= b < len(maps):
            raise ValueError(f"block {b}: the model has blocks 0..{len(maps) - 1}")
        cls = sim.cls_attention(np.asarray(maps[b])[index:index + 1])[0]  # (H, g, g)
        panels = [("image", None), ("mean of heads", cls.mean(axis=0))]
        panels += [(f"head {h}", cls[h]) for h in range(heads)]
        for col, (name, a) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(shown)
            if a is not None:
                ax.imshow(a, cmap="inferno", alpha=0.6, extent=(0, size, size, 0),
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(f"block {b}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, path)
