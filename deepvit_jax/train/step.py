"""One training step and one evaluation step: pure functions, jit-compiled once.

* optimizer: AdamW with the official weight-decay mask (no decay on 1-D parameters,
  ``pos_embed`` and ``cls_token``; the Re-attention matrix Theta *is* decayed), optional
  global-norm clipping, optional gradient accumulation (``optax.MultiSteps``);
* learning rate: timm's ``CosineLRScheduler`` (linear warm-up from ``warmup_lr``, cosine to
  ``min_lr`` over ``num_epochs``, then ``cooldown_epochs`` at ``min_lr``), per update;
* loss: soft-target cross-entropy on mixup / cutmix / label-smoothed targets, plus the
  cosine regulariser of the 32-block recipe;
* model EMA over the parameters *and* the BatchNorm statistics (timm ``ModelEmaV2``);
* per-batch BatchNorm statistics, for re-estimating them before an evaluation.
"""

from __future__ import annotations

import itertools
import math
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepvit_jax.data.mix import mix_batch
from deepvit_jax.models.deepvit import BatchNorm
from deepvit_jax.train.state import ModelDef, TrainState
from deepvit_jax.utils import path_str

NO_DECAY_NAMES = ("pos_embed", "cls_token")  # the official model.no_weight_decay()


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


def weight_decay_mask(params) -> Any:
    """True where weight decay applies: parameters with >= 2 dims, except pos_embed and
    cls_token (timm ``add_weight_decay`` with the model's ``no_weight_decay()`` list)."""

    def one(path, p):
        name = path_str(path).split("/")[-1]
        return p.ndim > 1 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(one, params)


def cosine_schedule(*, base_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                    decay_steps: int) -> optax.Schedule:
    """timm ``CosineLRScheduler(t_initial=decay_steps, lr_min=min_lr, warmup_t=warmup_steps,
    warmup_lr_init=warmup_lr)`` evaluated per optimizer update.

    Written out because optax's ``warmup_cosine_decay_schedule`` starts its cosine *after*
    the warm-up, while timm's cosine runs on the absolute step (the warm-up overlays its
    start) and holds ``min_lr`` afterwards (the cool-down epochs).
    """
    warmup_steps, decay_steps = int(warmup_steps), max(int(decay_steps), 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = warmup_lr + (base_lr - warmup_lr) * t / max(warmup_steps, 1)
        frac = jnp.minimum(t, decay_steps) / decay_steps
        cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(t < warmup_steps, warm, cos)

    return schedule


def make_schedule(optim, run) -> optax.Schedule:
    """The learning rate per optimizer update from the config's ``optim`` section and a
    ``train.config.RunLength``."""
    return cosine_schedule(base_lr=optim.learning_rate, warmup_lr=optim.warmup_lr,
                           min_lr=optim.min_lr, warmup_steps=run.warmup_updates,
                           decay_steps=run.decay_updates)


def make_optimizer(optim, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW from the config's ``optim`` section."""
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay, mask=weight_decay_mask)
    if optim.grad_clip_norm and optim.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    if optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
    return tx


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def soft_target_cross_entropy(logits, targets):
    """Mean over the batch of -sum(targets * log_softmax(logits)) (timm SoftTargetCE)."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def cosine_regulariser(maps, num_pairs: int = 12, eps: float = 1e-8):
    """DeepViT-32's regulariser: mean over the first ``num_pairs`` consecutive block pairs
    (l, l+1) of the cosine similarity of their attention maps along the head axis
    (``torch.nn.CosineSimilarity(dim=1)`` on (B, H, N, N) maps), averaged over (B, N, N)."""
    pairs = list(itertools.pairwise(maps[:num_pairs + 1]))
    if not pairs:
        return jnp.zeros((), jnp.float32)
    vals = []
    for a, b in pairs:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        num = jnp.sum(a * b, axis=1)
        den = jnp.sqrt(jnp.sum(a * a, axis=1) * jnp.sum(b * b, axis=1))
        vals.append(jnp.mean(num / jnp.maximum(den, eps)))
    return jnp.mean(jnp.stack(vals))


def ema_update(ema, new, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, new)


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def _ema_step(state: TrainState, params, stats, opt_state, ema_decay: float, accum: int):
    """(ema_params, ema_batch_stats) after one step: one EMA update per optimizer update (not
    per accumulated micro-batch); unchanged when the run keeps no EMA."""
    if ema_decay <= 0:
        return state.ema_params, state.ema_batch_stats
    # optax.MultiSteps.has_updated's test, on the state (it is an instance method; the
    # instance is not at hand here): the accumulated micro-batches were applied this step
    applied = (jnp.logical_and(opt_state.mini_step == 0, opt_state.gradient_step > 0)
               if accum > 1 else jnp.bool_(True))
    decay = jnp.where(applied, ema_decay, 1.0)
    return (ema_update(state.ema_params, params, decay),
            ema_update(state.ema_batch_stats, stats, decay))


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config, *, mix_fn: Callable | None = None,
                    augment_fn: Callable | None = None) -> Callable:
    """``train_step(state, rest, batch) -> (state, metrics)``; ``rest`` holds the model's
    dropout RNG variables (re-seeded from ``fold_in(state.rng, state.step)``).

    ``config`` is the training config (its ``mix``, ``loss``, ``optim.grad_accum_steps`` and
    ``ema_decay``); ``mix_fn`` replaces ``data.mix.mix_batch`` (tests); ``augment_fn(key,
    images)``, if given, augments the batch on device before mixing
    (``data.device_augment``)."""
    mix_fn = mix_fn or mix_batch
    num_classes = model_def.config.num_classes
    mix = dict(config.mix)
    reg_weight, reg_pairs = config.loss.cosine_reg_weight, config.loss.cosine_reg_pairs
    accum, ema_decay = config.optim.grad_accum_steps, config.ema_decay

    def train_step(state: TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        mix_key, drop_key = jax.random.split(key)
        images = batch["image"]
        if augment_fn is not None:
            images = augment_fn(jax.random.fold_in(key, 2), images)
        images, targets = mix_fn(mix_key, images, batch["label"], num_classes=num_classes,
                                 **mix)

        def loss_fn(params):
            model = model_def.merge(params, state.batch_stats, rest, train=True)
            nnx.reseed(model, dropout=drop_key)
            if reg_weight:
                logits, maps = model(images, return_attention=True,
                                     attention_blocks=reg_pairs + 1)
                reg = cosine_regulariser(maps, reg_pairs)
            else:
                logits, reg = model(images), jnp.zeros((), jnp.float32)
            ce = soft_target_cross_entropy(logits, targets)
            loss = ce + reg_weight * reg
            return loss, (ce, reg, nnx.state(model, nnx.BatchStat))

        (loss, (ce, reg, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        ema_params, ema_stats = _ema_step(state, params, stats, opt_state, ema_decay, accum)
        metrics = {
            "train/loss": loss,
            "train/ce": ce,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": schedule(state.step // accum),
        }
        if reg_weight:
            metrics["train/cosine_reg"] = reg
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                                  opt_state=opt_state, ema_params=ema_params,
                                  ema_batch_stats=ema_stats)
        return new_state, metrics

    return train_step


def make_eval_step(model_def: ModelDef) -> Callable:
    """``eval_step(params, batch_stats, rest, batch) -> sums`` of correct top-1 / top-5,
    cross-entropy and the number of real (unpadded) images, over the batch."""

    def eval_step(params, batch_stats, rest, batch):
        model = model_def.merge(params, batch_stats, rest, train=False)
        logits = model(batch["image"]).astype(jnp.float32)
        labels = batch["label"].astype(jnp.int32)
        mask = batch["mask"].astype(jnp.float32)
        k = min(5, logits.shape[-1])
        _, top = jax.lax.top_k(logits, k)
        hit = top == labels[:, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "top1": jnp.sum(hit[:, 0] * mask),
            "top5": jnp.sum(jnp.any(hit, axis=1) * mask),
            "loss": jnp.sum(ce * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def make_bn_stats_step(model_def: ModelDef) -> Callable:
    """``bn_stats_step(params, batch_stats, rest, images) -> batch_stats`` holding, for every
    BatchNorm, the mean and the *unbiased* variance of its input over this batch (the
    quantities PyTorch's ``running_mean`` / ``running_var`` average).

    The eval-mode model with every BatchNorm switched to batch statistics and momentum 0
    (``new = 0 * old + 1 * batch``): dropout and drop-path stay off, so the statistics
    describe the network as it is evaluated. Averaging the results over K batches is
    ``torch.optim.swa_utils.update_bn`` (cumulative average, ``momentum=None``).
    """

    def bn_stats_step(params, batch_stats, rest, images):
        model = model_def.merge(params, batch_stats, rest, train=False)
        for _, m in nnx.iter_modules(model):
            if isinstance(m, BatchNorm):
                m.use_running_average, m.momentum = False, 0.0
        model(images)
        return nnx.state(model, nnx.BatchStat)

    return bn_stats_step
