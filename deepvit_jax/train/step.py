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

import dataclasses
import itertools
import math
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepvit_jax.models.deepvit import BatchNorm
from deepvit_jax.parallel import path_str
from deepvit_jax.train.state import ModelDef, TrainState

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


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                     weight_decay=config.weight_decay, mask=weight_decay_mask)
    if config.grad_clip_norm and config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
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


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_switch_prob: float = 0.5
    mix_prob: float = 1.0
    label_smoothing: float = 0.0
    cosine_reg_weight: float = 0.0
    cosine_reg_pairs: int = 12
    ema_decay: float = 0.0
    grad_accum_steps: int = 1


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: StepConfig,
                    mix_fn: Callable | None = None) -> Callable:
    """``train_step(state, rest, batch) -> (state, metrics)``; ``rest`` holds the model's
    dropout RNG variables (re-seeded from ``fold_in(state.rng, state.step)``)."""
    if mix_fn is None:
        from deepvit_jax.data.mix import mix_batch as mix_fn

    def train_step(state: TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        mix_key, drop_key = jax.random.split(key)
        images, targets = mix_fn(
            mix_key, batch["image"], batch["label"], num_classes=cfg.num_classes,
            mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
            switch_prob=cfg.mix_switch_prob, label_smoothing=cfg.label_smoothing,
            prob=cfg.mix_prob)

        def loss_fn(params):
            model = model_def.merge(params, state.batch_stats, rest, train=True)
            nnx.reseed(model, dropout=drop_key)
            if cfg.cosine_reg_weight:
                logits, maps = model(images, return_attention=True)
                reg = cosine_regulariser(maps, cfg.cosine_reg_pairs)
            else:
                logits, reg = model(images), jnp.zeros((), jnp.float32)
            ce = soft_target_cross_entropy(logits, targets)
            loss = ce + cfg.cosine_reg_weight * reg
            return loss, (ce, reg, nnx.state(model, nnx.BatchStat))

        (loss, (ce, reg, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        ema_params, ema_stats = state.ema_params, state.ema_batch_stats
        if cfg.ema_decay > 0:
            # One EMA update per optimizer update (not per accumulated micro-batch).
            applied = (optax.MultiSteps.has_updated(opt_state) if cfg.grad_accum_steps > 1
                       else jnp.bool_(True))
            decay = jnp.where(applied, cfg.ema_decay, 1.0)
            ema_params = ema_update(ema_params, params, decay)
            ema_stats = ema_update(ema_stats, stats, decay)

        metrics = {
            "train/loss": loss,
            "train/ce": ce,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": schedule(state.step // cfg.grad_accum_steps),
        }
        if cfg.cosine_reg_weight:
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


def average_batch_stats(bn_stats_step: Callable, params, batch_stats, rest, images) -> Any:
    """Mean over the image batches of ``bn_stats_step``'s per-batch statistics: the
    re-estimated running statistics of every BatchNorm."""
    total, n = None, 0
    for x in images:
        out = bn_stats_step(params, batch_stats, rest, x)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
        n += 1
    if total is None:
        raise ValueError("average_batch_stats: no batches")
    return jax.tree.map(lambda t: t / n, total)
