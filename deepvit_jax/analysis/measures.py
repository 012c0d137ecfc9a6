"""Every like-for-like collapse measure of one model over many images (docs/collapse.md,
"Measures"): :func:`analyse_collapse`.

Two kinds of map per block (:data:`MAP_KINDS`):

* ``weights``: the map that weighs the values, what ``model(images, return_attention=True)``
  returns (the paper's Eq. 2 is taken on it; in a Re-attention block it is mixed by Theta
  and normalised by BatchNorm, so its entries are signed);
* ``softmax``: the softmax map each block computes from its own queries and keys, before
  Re-attention's mixing (the same map as ``weights`` in a plain block).

On each, three forms of Eq. 2 (:func:`~deepvit_jax.analysis.similarity.pair_measures`):
``eq2`` the signed mean cosine, ``abs`` the mean |cosine|, ``aligned`` each head's mean
cosine up to its sign; plus the quantiles and histogram of the per-(image, head, token)
cosines, the mean inter-head cosine, the softmax maps' row entropy / log N, and linear CKA
of the blocks' output tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepvit_jax.analysis import similarity as sim

MAP_KINDS = ("weights", "softmax")
HISTOGRAM_BINS = 40  # over [-1, 1]


def block_outputs(model, images):
    """(logits, weights, softmax, tokens) for a batch: every block's map that weighs the
    values (what ``return_attention=True`` gives), its softmax map before any mixing, and
    its output tokens (B, N, C) float32, block by block as the model's own call runs them."""
    x = model.embed(images)
    weights, softmax, tokens = [], [], []
    for blk in model.blocks:
        softmax.append(blk.attn.softmax_maps(blk.norm1(x * blk.adjust_ratio)))
        x, attn = blk(x, return_attention=True)
        weights.append(attn)
        tokens.append(x.astype(jnp.float32))
    return model.classify(x), weights, softmax, tokens


def _trace_fn(model):
    """A jitted ``images -> {name: array}`` of one batch's sums (eval mode)."""
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, images):
        _, weights, softmax, tokens = block_outputs(nnx.merge(graphdef, state), images)
        out = {"tokens": jnp.stack(tokens), "entropy": sim.row_entropy(softmax)}
        for kind, maps in (("weights", weights), ("softmax", softmax)):
            maps = jnp.stack(maps)
            out[f"{kind}/signed"], out[f"{kind}/abs"] = sim.pair_sums(maps)
            out[f"{kind}/adjacent"] = sim.adjacent_cosines(maps)
            out[f"{kind}/heads"] = sim.inter_head_similarity(maps) * images.shape[0]
        return out

    return lambda images: stats(state, images)


def _run_batches(model, images, batch_size: int) -> tuple[dict, dict, np.ndarray, int]:
    """(sums over images, per-element adjacent cosines per kind, tokens, image count)."""
    fn = _trace_fn(model)
    sums: dict[str, np.ndarray] = {}
    adjacent: dict[str, list] = {k: [] for k in MAP_KINDS}
    tokens = []
    for s in range(0, len(images), batch_size):
        for k, v in fn(images[s:s + batch_size]).items():
            v = np.asarray(v)
            if k == "tokens":
                tokens.append(v)
            elif k.endswith("/adjacent"):
                adjacent[k.split("/")[0]].append(v)
            else:
                sums[k] = sums.get(k, 0) + v.astype(np.float64)
    if not tokens:
        raise ValueError("analyse_collapse: no images")
    cos = {k: np.concatenate(v, axis=1) for k, v in adjacent.items()}  # (D-1, B, H, N)
    return sums, cos, np.concatenate(tokens, axis=1), len(images)


def _adjacent_summary(matrix, threshold: float) -> dict:
    m = np.asarray(matrix, np.float64)
    adj = np.diagonal(m, offset=1)
    return {"adjacent": adj.tolist(),
            "mean_adjacent": float(adj.mean()) if len(adj) else float("nan"),
            "similar_blocks": int(np.sum(adj >= threshold)), "matrix": m.tolist()}


def analyse_collapse(model, images, *, threshold: float = sim.DEFAULT_THRESHOLD,
                     batch_size: int = 32) -> dict:
    """Every collapse measure of ``model`` over ``images``, JSON-ready; per map kind
    (``weights`` / ``softmax``, see the module) and measure (``eq2`` / ``abs`` /
    ``aligned``):

    * ``<kind>/<measure>``: ``adjacent`` M^{p,p+1} for p = 0..D-2, ``mean_adjacent``,
      ``similar_blocks`` (how many adjacent values are >= ``threshold``), ``matrix`` D x D;
    * ``<kind>/quantiles``: per block pair, the 5/25/50/75/95 % quantiles of the cosine
      M^{p,p+1}_{h,t} over every (image, head, token); ``<kind>/histogram``: its counts in
      40 bins over [-1, 1], every pair of the second half of the blocks together;
    * ``<kind>/inter_head``: per block, the mean cosine between two different heads;
    * ``softmax/uniformity``: per block, the mean row entropy of the softmax maps / log N;
    * ``cka``: linear CKA of the blocks' output tokens (every token of every image a
      sample), summarised like the measures above.
    """
    model.check_input(images[:1])
    cfg = model.config
    sums, cos, tokens, n = _run_batches(model, images, batch_size)
    n_tok, depth, heads = cfg.num_tokens, cfg.depth, cfg.num_heads
    result: dict = {"num_images": n, "depth": depth, "num_heads": heads,
                    "num_tokens": n_tok, "threshold": float(threshold)}
    for kind in MAP_KINDS:
        mats = sim.pair_measures(sums[f"{kind}/signed"], sums[f"{kind}/abs"], n * n_tok)
        for name, m in mats.items():
            result[f"{kind}/{name}"] = _adjacent_summary(m, threshold)
        result[f"{kind}/quantiles"] = sim.quantiles(cos[kind])
        late = cos[kind][(depth - 1) // 2:]
        result[f"{kind}/histogram"] = np.histogram(
            late, bins=HISTOGRAM_BINS, range=(-1, 1))[0].tolist()
        result[f"{kind}/inter_head"] = sim.mean_off_diagonal(sums[f"{kind}/heads"] / n).tolist()
    result["softmax/uniformity"] = (sums["entropy"] / (n * heads * n_tok)).tolist()
    cka = sim.cka_matrix(tokens.reshape(depth, -1, tokens.shape[-1]))
    result["cka"] = _adjacent_summary(cka, threshold)
    return result
