"""Attention maps out of a model, and the collapse measures over many images."""

from __future__ import annotations

import numpy as np

from deepvit_jax.analysis import similarity as sim


def _maps_fn(model):
    """A jitted ``images -> list of (B, H, N, N) maps`` for an eval-mode ``DeepViT``."""
    import jax
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, images):
        _, maps = nnx.merge(graphdef, state)(images, return_attention=True)
        return maps

    return lambda images: fwd(state, images)


def collect_maps(model, images, *, batch_size: int = 32) -> list[np.ndarray]:
    """Every block's attention map for ``images`` (preprocessed NHWC floats of the model's
    size): a list of ``depth`` float32 arrays (B, H, N, N), after Re-attention where a block
    has it (what ``model(images, return_attention=True)`` returns), as NumPy."""
    model.check_input(images[:1])
    fn = _maps_fn(model)
    chunks = [fn(images[s:s + batch_size]) for s in range(0, len(images), batch_size)]
    return [np.concatenate([np.asarray(c[p]) for c in chunks]) for p in range(len(chunks[0]))]


def _stats_fn(model, center: bool):
    """A jitted ``images -> (D x D similarity, D x H x H inter-head)`` batch means."""
    import jax
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, images):
        _, maps = nnx.merge(graphdef, state)(images, return_attention=True)
        return (sim.cross_layer_similarity(maps, center),
                sim.inter_head_similarity(maps, center))

    return lambda images: stats(state, images)


def analyse(model, images, *, k: int = 1, threshold: float = sim.DEFAULT_THRESHOLD,
            batch_size: int = 32, center: bool = False) -> dict:
    """The collapse measures of ``model`` over ``images`` (batch by batch; the maps never
    leave the device), as a JSON-ready dict:

    * ``cross_layer``: the D x D matrix of Eq. 2's M^{p,q} (mean over images, heads, tokens);
    * ``to_next``: for blocks 0..D-2, the mean M^{p,q} over the next ``k`` blocks;
    * ``similar_blocks``: how many of those are >= ``threshold``;
    * ``inter_head``: D x H x H head-to-head similarity within each block, and
      ``inter_head_mean``: its mean off the diagonal per block.

    ``center``: columns centred first (correlation instead of cosine; see
    :mod:`~deepvit_jax.analysis.similarity`).
    """
    model.check_input(images[:1])
    fn = _stats_fn(model, center)
    cross = heads = None
    n = 0
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        c, h = (np.asarray(a, np.float64) for a in fn(chunk))
        w = len(chunk)
        cross = c * w if cross is None else cross + c * w
        heads = h * w if heads is None else heads + h * w
        n += w
    if not n:
        raise ValueError("analyse: no images")
    out = summarise(cross / n, heads / n, k=k, threshold=threshold, num_images=n)
    return {**out, "centered": bool(center)}


def summarise(cross, heads, *, k: int, threshold: float, num_images: int) -> dict:
    """The JSON-ready result of :func:`analyse` from its two averaged matrices."""
    cross = np.asarray(cross, np.float64)
    heads = np.asarray(heads, np.float64)
    to_next = sim.similarity_to_next(cross, k)
    return {
        "num_images": int(num_images), "depth": int(cross.shape[0]),
        "num_heads": int(heads.shape[-1]), "k": int(k), "threshold": float(threshold),
        "cross_layer": cross.tolist(), "to_next": to_next.tolist(),
        "similar_blocks": int(np.sum(to_next >= threshold)),
        "inter_head": heads.tolist(), "inter_head_mean": sim.mean_off_diagonal(heads).tolist(),
    }
