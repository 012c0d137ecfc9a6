"""Attention collapse followed during training (``config.collapse_every_steps``).

:func:`make_probe` fixes a probe batch (the first images of the eval split) and compiles one
eval-mode forward pass that returns every block's similarity to the next one (Eq. 2's
M^{p,p+1}, averaged over images, heads and tokens) and the number of blocks at or above
:data:`~deepvit_jax.analysis.similarity.DEFAULT_THRESHOLD`. The training loop writes them
to metrics.jsonl and TensorBoard as ``collapse/next/<p>`` (zero-padded block index),
``collapse/mean_next`` and ``collapse/similar_blocks``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from deepvit_jax.analysis import similarity as sim

PROBE_IMAGES = 32


def probe_metrics(maps, threshold: float = sim.DEFAULT_THRESHOLD) -> dict:
    """The monitored values of one batch of maps (jit-able)."""
    nxt = sim.adjacent_similarity(maps)
    width = len(str(max(nxt.shape[0] - 1, 0)))
    out = {f"collapse/next/{p:0{width}d}": nxt[p] for p in range(nxt.shape[0])}
    out["collapse/mean_next"] = jnp.mean(nxt)
    out["collapse/similar_blocks"] = jnp.sum(nxt >= threshold).astype(jnp.float32)
    return out


def make_probe(model_def, rest, eval_batches, *, num_images: int = PROBE_IMAGES,
               threshold: float = sim.DEFAULT_THRESHOLD) -> Callable[[object], dict]:
    """``probe(train_state) -> {name: float}``: the live weights of a training state
    (``model_def.merge`` of its params and BatchNorm statistics with ``rest``) on the first
    ``num_images`` images of ``eval_batches`` (the run's eval split)."""
    if model_def.config.depth < 2:
        return lambda state: {}
    batch = next(iter(eval_batches))  # global arrays, sharded like eval
    real = getattr(eval_batches, "num_examples", batch["image"].shape[0])
    n = min(int(num_images), int(batch["image"].shape[0]), int(real))  # padding comes last

    @jax.jit
    def probe(params, batch_stats, rest, images):
        model = model_def.merge(params, batch_stats, rest, train=False)
        _, maps = model(images[:n], return_attention=True)
        return probe_metrics(maps, threshold)

    images = batch["image"]

    def run_probe(state) -> dict:
        out = jax.device_get(probe(state.params, state.batch_stats, rest, images))
        return {k: float(v) for k, v in out.items()}

    return run_probe
