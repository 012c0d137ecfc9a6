"""Mixup / CutMix / label smoothing on device, in JAX (timm ``Mixup`` in 'batch' mode).

Per batch: with probability ``prob`` mix; if both alphas > 0 pick CutMix with probability
``switch_prob`` (else mixup); lam ~ Beta(alpha, alpha).  Mixup: x = lam x + (1 - lam) flip(x).
CutMix: a box of side sqrt(1 - lam) * (H, W) (int-truncated, centre uniform, clipped at the
edges) is pasted from flip(x), and lam is corrected to 1 - box area / image area.
Targets: lam * smooth(y) + (1 - lam) * smooth(flip(y)), smooth = one-hot with
``on = 1 - s + s / C``, ``off = s / C``.  ``flip`` reverses the batch order, as timm's
``x.flip(0)``; applied to a globally sharded batch this pairs images across devices (XLA inserts
the exchange), which is what a single-GPU timm run does.

Hand-written because no maintained JAX library provides timm's batch-mode semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, label_smoothing: float = 0.0):
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def cutmix_box(rng, lam, height: int, width: int):
    """timm ``rand_bbox``: returns (yl, yh, xl, xh) int32 and the corrected lam."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    yl = jnp.clip(cy - cut_h // 2, 0, height)
    yh = jnp.clip(cy + cut_h // 2, 0, height)
    xl = jnp.clip(cx - cut_w // 2, 0, width)
    xh = jnp.clip(cx + cut_w // 2, 0, width)
    lam = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / float(height * width)
    return (yl, yh, xl, xh), lam


def mix_batch(rng, images, labels, *, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, switch_prob: float, label_smoothing: float, prob: float):
    """-> (mixed images (B, H, W, C), soft targets float32 (B, num_classes)). The keyword
    arguments are the fields of the config's ``mix`` section (``data.config.default_mix_config``
    holds the defaults): ``mix_batch(rng, x, y, num_classes=C, **config.mix)``."""
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    no_mix = isinstance(prob, (int, float)) and prob <= 0      # prob may also be traced
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or no_mix:
        return images, targets
    k_apply, k_switch, k_lam_m, k_lam_c, k_box = jax.random.split(rng, 5)
    apply = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = (jax.random.beta(k_lam_m, mixup_alpha, mixup_alpha) if mixup_alpha > 0
                 else jnp.float32(1.0))
    lam_cutmix = (jax.random.beta(k_lam_c, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0
                  else jnp.float32(1.0))
    flipped = images[::-1]
    # mixup
    mixed_m = (lam_mixup * images + (1.0 - lam_mixup) * flipped).astype(images.dtype)
    # cutmix
    h, w = images.shape[1], images.shape[2]
    (yl, yh, xl, xh), lam_c = cutmix_box(k_box, lam_cutmix, h, w)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    box = ((rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh))[None, :, :, None]
    mixed_c = jnp.where(box, flipped, images)
    lam = jnp.where(use_cutmix, lam_c, lam_mixup)
    lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
    out = jnp.where(apply, jnp.where(use_cutmix, mixed_c, mixed_m), images)
    soft = lam * targets + (1.0 - lam) * targets[::-1]
    return out, soft
