"""What a training run carries from step to step (and into its checkpoints).

A :class:`TrainState` is a plain pytree: the step, the model's parameters and BatchNorm
statistics (as ``nnx.State``), the optimizer state, the EMA copies of both, and the base
RNG key. Randomness of step ``s`` (dropout / drop-path, mixup / cutmix) is derived as
``fold_in(rng, s)``, so the RNG never has to be advanced and resuming at step ``s`` replays
exactly what an uninterrupted run would have drawn.

The model's graph (its structure and train/eval flags) lives outside the state, in a
:class:`ModelDef`, and is merged with the arrays inside the jitted step functions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from deepvit_jax.errors import ConfigError
from deepvit_jax.model_dir import load_model_state
from deepvit_jax.models import ModelConfig
from deepvit_jax.models.deepvit import DeepViT, pos_embed_grid, resample_pos_embed
from deepvit_jax.utils import path_str

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train_step calls done
    params: Any  # nnx.State of nnx.Param
    batch_stats: Any  # nnx.State of nnx.BatchStat (empty for models without BatchNorm)
    opt_state: Any
    ema_params: Any  # same structure as params; None when EMA is off
    ema_batch_stats: Any
    rng: jax.Array  # uint32 key data of the base key


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of the model: graph definitions in train and eval mode, and the
    non-array-state variables (dropout RNG streams, re-seeded every step)."""

    config: ModelConfig
    train_graph: Any
    eval_graph: Any

    def merge(self, params, batch_stats, rest, *, train: bool) -> DeepViT:
        # copy=True: fresh Variables owned by the current trace (the step mutates the
        # BatchNorm statistics and re-seeds the dropout streams under jax.grad).
        return nnx.merge(self.train_graph if train else self.eval_graph, params, batch_stats,
                         rest, copy=True)


def build_model(cfg: ModelConfig, seed: int) -> DeepViT:
    return DeepViT(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def split_model(model: DeepViT):
    """(graphdef, params, batch_stats, rest)."""
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def make_model_def(cfg: ModelConfig) -> ModelDef:
    abstract = nnx.eval_shape(lambda: build_model(cfg, 0))
    abstract.train()
    train_graph = split_model(abstract)[0]
    abstract.eval()
    eval_graph = split_model(abstract)[0]
    return ModelDef(cfg, train_graph, eval_graph)


def init_state(cfg: ModelConfig, tx, seed: int, *, ema: bool):
    """(TrainState, rest): a fresh model, its optimizer state, EMA copy and RNG key.
    Pure function of its arguments; jit it with out_shardings to initialise sharded."""
    model = build_model(cfg, seed)
    _, params, stats, rest = split_model(model)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (no aliasing of donated buffers)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
        opt_state=tx.init(params), ema_params=copy(params) if ema else None,
        ema_batch_stats=copy(stats) if ema else None, rng=rng)
    return state, rest


# --------------------------------------------------------------------------------------
# init_from: start from a converted / saved model
# --------------------------------------------------------------------------------------


def load_pretrained(params, batch_stats, path: str):
    """Copy the weights saved at ``path`` (deepvit_jax.checkpoint format) into freshly
    initialised ``params`` / ``batch_stats``.

    ``pos_embed`` is resized when the resolution differs (fine-tuning at 384 from 224);
    the classifier head is kept freshly initialised when the class count differs. Any
    other missing or mismatching array is an error naming it.
    """
    try:
        _, loaded = load_model_state(path)
    except FileNotFoundError as e:
        raise ConfigError(f"config.init_from={path!r}: {e}") from e
    flat_loaded = {path_str(p): np.asarray(v)
                   for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}

    def fill(tree):
        used = set()

        def one(p, v):
            key = path_str(p)
            if key not in flat_loaded:
                raise ConfigError(f"config.init_from={path!r}: the checkpoint has no {key!r}")
            new = flat_loaded[key]
            used.add(key)
            if new.shape == v.shape:
                return jnp.asarray(new, v.dtype)
            if key.endswith("pos_embed"):
                log.info("init_from: resizing pos_embed %s -> %s", new.shape, v.shape)
                return jnp.asarray(resample_pos_embed(new, pos_embed_grid(v.shape)), v.dtype)
            if key.startswith("head/"):
                log.info("init_from: %s has shape %s, the model %s: keeping a fresh head",
                         key, new.shape, v.shape)
                return v
            raise ConfigError(f"config.init_from={path!r}: {key} has shape {new.shape}, "
                              f"the model expects {v.shape}")

        return jax.tree_util.tree_map_with_path(one, tree), used

    params, used_p = fill(params)
    batch_stats, used_s = fill(batch_stats)
    unused = sorted(set(flat_loaded) - used_p - used_s)
    if unused:
        log.warning("init_from: %d arrays of %s unused, e.g. %s", len(unused), path, unused[:5])
    return params, batch_stats
