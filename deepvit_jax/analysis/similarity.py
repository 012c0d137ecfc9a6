"""The paper's attention-collapse measures (DeepViT, Zhou et al. 2021, Eq. 2), in JAX.

For blocks p and q, head h and token t, with ``A^p[h, :, t]`` the t-th *column* of head h's
map (how much token t feeds every query)::

    M^{p,q}_{h,t} = <A^p[h, :, t], A^q[h, :, t]> / (|A^p[h, :, t]| |A^q[h, :, t]|)

one cosine over the query axis per (image, head, token). Averaged over images, heads and
tokens it gives the depth x depth matrix :func:`cross_layer_similarity`; the same cosine
between two heads of one block gives :func:`inter_head_similarity`. Every function takes
the maps as a sequence of (B, H, N, N) arrays, one per block, as ``model(images,
return_attention=True)`` returns them, or as one stacked (D, B, H, N, N) array, and works
inside ``jax.jit``.

``center=True`` subtracts each column's mean over the queries first (a Pearson correlation
instead of Eq. 2's cosine): a control for comparing positive softmax maps, whose shared
uniform part alone gives a high cosine, with Re-attention's BatchNorm-normalised maps,
which are centred by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

DEFAULT_THRESHOLD = 0.9  # the level the paper's Fig. 2 calls "similar"
EPS = 1e-12  # guards all-zero columns (their cosine is taken as 0)


def _stack(maps) -> jnp.ndarray:
    if isinstance(maps, (list, tuple)):
        maps = jnp.stack([jnp.asarray(m, jnp.float32) for m in maps])
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim != 5 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"attention maps: expected (depth, batch, heads, N, N), got "
                         f"{tuple(maps.shape)}")
    return maps


def unit_columns(maps, center: bool = False) -> jnp.ndarray:
    """(D, B, H, N, N) maps with every column (query axis, -2) scaled to unit length
    (``center``: minus its mean first)."""
    maps = _stack(maps)
    if center:
        maps = maps - jnp.mean(maps, axis=-2, keepdims=True)
    norm = jnp.sqrt(jnp.sum(maps * maps, axis=-2, keepdims=True))
    return maps / jnp.maximum(norm, EPS)


def cross_layer_similarity(maps, center: bool = False) -> jnp.ndarray:
    """The (D, D) matrix of Eq. 2's M^{p,q}, averaged over images, heads and tokens."""
    u = unit_columns(maps, center)
    _, b, h, _, n = u.shape
    return jnp.einsum("pbhit,qbhit->pq", u, u) / (b * h * n)


def adjacent_similarity(maps, center: bool = False) -> jnp.ndarray:
    """(D - 1,) M^{p,p+1} only (the diagonal above the main one of
    :func:`cross_layer_similarity`), without forming the D x D matrix."""
    u = unit_columns(maps, center)
    _, b, h, _, n = u.shape
    return jnp.einsum("pbhit,pbhit->p", u[:-1], u[1:]) / (b * h * n)


def inter_head_similarity(maps, center: bool = False) -> jnp.ndarray:
    """(D, H, H): within each block, the cosine between head g's and head h's columns,
    averaged over images and tokens (the diagonal is 1 wherever the columns are non-zero)."""
    u = unit_columns(maps, center)
    _, b, _, _, n = u.shape
    return jnp.einsum("pbgit,pbhit->pgh", u, u) / (b * n)


def mean_off_diagonal(heads) -> np.ndarray:
    """(D,) the mean of each block's H x H inter-head matrix without its diagonal."""
    heads = np.asarray(heads, np.float64)
    h = heads.shape[-1]
    if h < 2:
        return np.full(heads.shape[:-2], np.nan)
    off = ~np.eye(h, dtype=bool)
    return heads[..., off].mean(axis=-1)


def similarity_to_next(matrix, k: int = 1) -> np.ndarray:
    """(D - 1,) for every block p but the last, the mean of M^{p,q} over the next k blocks
    q = p+1 .. min(p+k, D-1) (the paper's Fig. 2 plots this against p)."""
    m = np.asarray(matrix, np.float64)
    d = m.shape[0]
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    return np.array([m[p, p + 1:min(p + k, d - 1) + 1].mean() for p in range(d - 1)])


def similar_blocks(matrix, threshold: float = DEFAULT_THRESHOLD, k: int = 1) -> int:
    """How many blocks have a mean similarity to their next k blocks of at least
    ``threshold`` (:func:`similarity_to_next` >= threshold)."""
    return int(np.sum(similarity_to_next(matrix, k) >= threshold))


def cls_attention(block_maps, grid: int | None = None) -> np.ndarray:
    """(B, H, g, g): the class token's row of one block's maps (what each patch gives the
    class token), without the class token's own column, on the g x g patch grid - what the
    official visualisation draws over the image."""
    a = np.asarray(block_maps)
    n = a.shape[-1] - 1
    g = grid or round(n ** 0.5)
    if g * g != n:
        raise ValueError(f"cls_attention: {n} patch tokens do not form a square grid")
    return a[:, :, 0, 1:].reshape(a.shape[0], a.shape[1], g, g)


def check_maps(maps: Sequence) -> None:
    """Raise a ValueError naming the problem unless ``maps`` is a non-empty list of equally
    shaped (B, H, N, N) arrays."""
    if not len(maps):
        raise ValueError("attention maps: the list is empty (a model with no blocks?)")
    shapes = {tuple(np.shape(m)) for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"attention maps: blocks differ in shape {sorted(shapes)}")
    (shape,) = shapes
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"attention maps: expected (batch, heads, N, N) per block, got {shape}")


# --------------------------------------------------------------------------------------
# Like-for-like measures (docs/collapse.md, "Measures"): per-element cosines, sign-invariant
# forms, the uniformity of the softmax maps, linear CKA of the blocks' output tokens.
# --------------------------------------------------------------------------------------

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def adjacent_cosines(maps, center: bool = False) -> jnp.ndarray:
    """(D - 1, B, H, N): Eq. 2's cosine M^{p,p+1}_{h,t} for every image, head and token
    (not averaged: its distribution is what :func:`quantiles` summarises)."""
    u = unit_columns(maps, center)
    return jnp.einsum("pbhit,pbhit->pbht", u[:-1], u[1:])


def pair_sums(maps, center: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(signed, absolute), each (D, D, H): Eq. 2's cosine M^{p,q}_{h,t} and its absolute
    value, summed over images and tokens. Summed over batches and divided by
    (images x tokens) they give every measure of :func:`pair_measures`."""
    u = unit_columns(maps, center)
    cos = jnp.einsum("pbhit,qbhit->pqbht", u, u)
    return jnp.sum(cos, axis=(2, 4)), jnp.sum(jnp.abs(cos), axis=(2, 4))


def pair_measures(signed, absolute, count: int) -> dict[str, np.ndarray]:
    """Three D x D matrices from :func:`pair_sums` totals over ``count`` = images x tokens:

    * ``eq2``: the paper's mean cosine, (1/H) sum_h S_h / count;
    * ``abs``: the mean of |cosine| (a sign flip of any column does not change it);
    * ``aligned``: each head's mean cosine with its sign aligned, (1/H) sum_h |S_h| / count
      (the cosine after flipping head h of block q wherever that makes its mean positive).
    """
    s = np.asarray(signed, np.float64) / count
    a = np.asarray(absolute, np.float64) / count
    return {"eq2": s.mean(axis=-1), "abs": a.mean(axis=-1), "aligned": np.abs(s).mean(axis=-1)}


def row_entropy(maps) -> jnp.ndarray:
    """(D,) the entropy of every row of non-negative maps (softmax maps) divided by log N,
    summed over (B, H, N) per block (divide by B x H x N for the mean): 1 for uniform
    averaging over every token, 0 for one-hot attention."""
    m = _stack(maps)
    n = m.shape[-1]
    ent = -jnp.sum(jnp.where(m > 0, m * jnp.log(jnp.maximum(m, 1e-30)), 0.0), axis=-1)
    return jnp.sum(ent, axis=(1, 2, 3)) / np.log(n)


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) between two feature matrices (samples x
    features): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with columns centred; 1 for
    features equal up to an orthogonal transform and an isotropic scale."""
    return float(cka_matrix(np.stack([x, y]) if np.shape(x) == np.shape(y)
                            else _pad_pair(x, y))[0, 1])


def _pad_pair(x, y) -> np.ndarray:
    """Two (n, c) and (n, c') feature matrices zero-padded to one width (CKA is unchanged
    by constant zero columns)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    c = max(x.shape[1], y.shape[1])
    return np.stack([np.pad(a, ((0, 0), (0, c - a.shape[1]))) for a in (x, y)])


def cka_matrix(features) -> np.ndarray:
    """(D, D) linear CKA between every two blocks' features; ``features``: (D, samples, C)
    (every token of every image is a sample). 0 where a block's features are constant."""
    f = np.asarray(features, np.float64)
    if f.ndim != 3:
        raise ValueError(f"features: expected (blocks, samples, channels), got {f.shape}")
    f = f - f.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(np.einsum("pnc,pnd->pcd", f, f), axis=(1, 2))  # ||Xc^T Xc||_F
    d = f.shape[0]
    out = np.eye(d)
    for p in range(d):
        for q in range(p + 1, d):
            den = norms[p] * norms[q]
            out[p, q] = out[q, p] = np.sum((f[q].T @ f[p]) ** 2) / den if den > 0 else 0.0
    return out


def quantiles(values, qs=QUANTILES) -> dict[str, list[float]]:
    """Per block pair (first axis), the quantiles of all its other values (e.g. the
    (D - 1, B, H, N) cosines of :func:`adjacent_cosines`), keys 'q05', 'q25', ..."""
    v = np.asarray(values, np.float64).reshape(len(values), -1)
    return {f"q{round(q * 100):02d}": np.quantile(v, q, axis=1).tolist() for q in qs}
