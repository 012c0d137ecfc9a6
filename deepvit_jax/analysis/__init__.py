"""Attention collapse, measured: the paper's cross-layer similarity (Eq. 2), inter-head
similarity, similar-block counts and attention maps over the image.

  python -m deepvit_jax.analysis --checkpoint runs/collapse_vit --checkpoint runs/collapse_deepvit \
      --out analysis/

Python API (``from deepvit_jax import analysis``):

* maps: :func:`collect_maps(model, images) <collect_maps>` -> list of (B, H, N, N) NumPy
  arrays, one per block (``model(images, return_attention=True)`` batch by batch);
  :func:`load_images(...) <load_images>` -> the first N preprocessed images of a split.
* measures, on such a list (or a stacked (D, B, H, N, N) array; JAX, jit-able):
  :func:`cross_layer_similarity` (D x D, Eq. 2 averaged over images, heads and tokens),
  :func:`adjacent_similarity` (M^{p,p+1}), :func:`inter_head_similarity` (D x H x H);
  on a D x D matrix: :func:`similarity_to_next(M, k) <similarity_to_next>` and
  :func:`similar_blocks(M, threshold, k) <similar_blocks>`.
* over many images without keeping the maps: :func:`analyse(model, images, k=...,
  threshold=...) <analyse>` -> JSON-ready dict; for a checkpoint path (model directory,
  training workdir or checkpoint, as ``deepvit_jax.saved_run`` reads them):
  :func:`analyse_checkpoint`.
* every like-for-like measure at once (softmax maps before mixing, |cos|, sign-aligned
  cosine, quantiles, row entropy, linear CKA of the block outputs; docs/collapse.md):
  :func:`analyse_collapse(model, images) <analyse_collapse>`; the study over depths and
  seeds: ``python -m deepvit_jax.analysis sweep`` (``deepvit_jax.analysis.sweep``).
* figures (matplotlib, PNG): :func:`plot_similarity` (several checkpoints on one figure),
  :func:`plot_attention` (class-token attention of chosen blocks over the image, head-averaged
  and per head).
* during training: :func:`make_probe` (``config.collapse_every_steps``; see
  ``deepvit_jax.analysis.monitor``).
"""

from deepvit_jax.analysis.collect import analyse, collect_maps, summarise
from deepvit_jax.analysis.measures import analyse_collapse, block_outputs
from deepvit_jax.analysis.monitor import make_probe, probe_metrics
from deepvit_jax.analysis.plots import plot_attention, plot_similarity
from deepvit_jax.analysis.similarity import (
    DEFAULT_THRESHOLD,
    adjacent_cosines,
    adjacent_similarity,
    cka_matrix,
    cls_attention,
    cross_layer_similarity,
    inter_head_similarity,
    linear_cka,
    mean_off_diagonal,
    pair_measures,
    pair_sums,
    quantiles,
    row_entropy,
    similar_blocks,
    similarity_to_next,
    unit_columns,
)
from deepvit_jax.analysis.checkpoint_analysis import analyse_checkpoint, load_images

__all__ = [
    "DEFAULT_THRESHOLD", "adjacent_cosines", "adjacent_similarity", "analyse",
    "analyse_checkpoint", "analyse_collapse", "block_outputs", "cka_matrix", "cls_attention",
    "collect_maps", "cross_layer_similarity", "inter_head_similarity", "linear_cka",
    "load_images", "make_probe", "mean_off_diagonal", "pair_measures", "pair_sums",
    "plot_attention", "plot_similarity", "probe_metrics", "quantiles", "row_entropy",
    "similar_blocks", "similarity_to_next", "summarise", "unit_columns",
]
