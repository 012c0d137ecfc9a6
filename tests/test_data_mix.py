"""Mixup / CutMix / label smoothing maths (timm Mixup, batch mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepvit_jax.data.mix import mix_batch

C = 10


def _batch(b=8, s=16):
    imgs = jax.random.normal(jax.random.key(1), (b, s, s, 3))
    labels = jnp.arange(b) % C
    return imgs, labels


def test_no_mixing_gives_smoothed_one_hot():
    imgs, labels = _batch()
    out, t = mix_batch(jax.random.key(0), imgs, labels, num_classes=C, mixup_alpha=0.0,
                       cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.1, prob=1.0)
    np.testing.assert_array_equal(out, imgs)
    want = np.full((8, C), 0.01, np.float32)
    want[np.arange(8), np.asarray(labels)] = 0.91
    np.testing.assert_allclose(t, want, atol=1e-7)


def test_mixup_images_and_targets_agree():
    imgs, labels = _batch()
    f = jax.jit(lambda r: mix_batch(r, imgs, labels, num_classes=C, mixup_alpha=0.8,
                                    cutmix_alpha=0.0, switch_prob=0.5,
label_smoothing=0.0, prob=1.0))
    for seed in range(5):
        out, t = f(jax.random.key(seed))
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        lam = float(t[0, labels[0]])            # labels[0] != labels[-1]
        np.testing.assert_allclose(out, lam * imgs + (1 - lam) * imgs[::-1], atol=1e-5)
        assert 0.0 <= lam <= 1.0


def test_cutmix_area_ratio_is_lam():
    imgs, labels = _batch(s=32)
    f = jax.jit(lambda r: mix_batch(r, imgs, labels, num_classes=C, mixup_alpha=0.0,
                                    cutmix_alpha=1.0, switch_prob=0.5,
label_smoothing=0.1, prob=1.0))
    for seed in range(8):
        out, t = f(jax.random.key(seed))
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        pasted = np.all(np.asarray(out[0]) == np.asarray(imgs[-1]), axis=-1)   # (H, W)
        kept = np.all(np.asarray(out[0]) == np.asarray(imgs[0]), axis=-1)
        assert np.all(pasted | kept)
        frac = pasted.mean()
        # soft target of the own class: lam * 0.91 + (1 - lam) * 0.01  ->  lam
        lam = (float(t[0, labels[0]]) - 0.01) / 0.9
        assert frac == pytest.approx(1.0 - lam, abs=1e-5)
        if pasted.any():                                      # the pasted region is a box
            r, c = np.where(pasted.any(1))[0], np.where(pasted.any(0))[0]
            assert pasted.sum() == (r[-1] - r[0] + 1) * (c[-1] - c[0] + 1)


def test_switch_prob_and_prob():
    imgs, labels = _batch()
    f = jax.jit(lambda r, p: mix_batch(r, imgs, labels, num_classes=C, mixup_alpha=0.8,
                                       cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                                       prob=p))
    cut = 0
    n = 60
    for seed in range(n):
        out, t = f(jax.random.key(seed), 1.0)
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        same = np.all(np.asarray(out) == np.asarray(imgs), axis=-1)
        cut += bool(same.mean() > 0.3)       # cutmix keeps unchanged pixels; mixup none
    assert 0.3 * n < cut < 0.7 * n
    out, t = f(jax.random.key(0), 0.0)
    np.testing.assert_array_equal(out, imgs)
    assert float(t.max()) == pytest.approx(0.91)
