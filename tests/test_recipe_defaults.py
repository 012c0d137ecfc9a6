"""The default training recipe pinned against the official values (the DeepViT release's yaml
files on timm 0.3.2, and timm's own RandAugment tables), written out here independently of
the product's constants: changing a default fails a test."""

from __future__ import annotations

import pytest

from deepvit_jax.data import augment as A
from deepvit_jax.data.config import default_data_config, default_mix_config
from deepvit_jax.models.registry import get_config, list_models
from deepvit_jax.train.config import base_config, imagenet_config

# timm 0.3.2 timm/data/auto_augment.py: _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS.
TIMM_RAND_TRANSFORMS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel"]
TIMM_RAND_INCREASING_TRANSFORMS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel"]


def test_augmentation_defaults_are_the_official_recipe():
    d = default_data_config()
    assert d.randaugment == "rand-m9-mstd0.5-inc1"
    assert tuple(d.rrc_scale) == (0.08, 1.0)
    assert tuple(d.rrc_ratio) == pytest.approx((3 / 4, 4 / 3), rel=1e-12)
    assert (d.random_resized_crop, d.train_interpolation, d.hflip) == (True, "random", 0.5)
    assert (d.random_erasing, d.erasing_mode, d.erasing_count) == (0.25, "pixel", 1)
    m = default_mix_config()
    assert (m.mixup_alpha, m.cutmix_alpha, m.switch_prob, m.prob, m.label_smoothing) == (
        0.8, 1.0, 0.5, 1.0, 0.1)


def test_randaugment_string_means_what_timm_means():
    p = A.parse_randaugment("rand-m9-mstd0.5-inc1")
    # timm: 2 ops per image, magnitude 9 of 10 with std 0.5, the 'increasing' op table,
    # each op applied with probability 0.5
    assert (p["num_layers"], p["magnitude"], p["magnitude_std"], p["prob"]) == (2, 9, 0.5, 0.5)
    assert list(p["transforms"]) == TIMM_RAND_INCREASING_TRANSFORMS
    assert list(A.parse_randaugment("rand-m7-n3")["transforms"]) == TIMM_RAND_TRANSFORMS
    assert A.parse_randaugment("rand-m7-n3")["num_layers"] == 3


def test_optimizer_schedule_and_ema_defaults_are_official():
    c = imagenet_config("deepvit_16b")
    o = c.optim
    assert (o.learning_rate, o.warmup_lr, o.min_lr, o.weight_decay) == (5e-4, 1e-6, 1e-5, 0.05)
    assert (o.b1, o.b2, o.eps, o.grad_clip_norm, o.grad_accum_steps) == (0.9, 0.999, 1e-8,
                                                                          0.0, 1)
    assert (c.num_epochs, c.warmup_epochs, c.cooldown_epochs) == (300, 5, 10)
    assert (c.ema_decay, c.seed, c.model.drop_path_rate) == (0.99996, 42, 0.2)
    assert (c.eval.bn_recalibration_batches, c.eval.bn_recalibration_batch_size) == (50, 256)
    assert c.data.randaugment == "rand-m9-mstd0.5-inc1" and c.data.random_erasing == 0.25
    assert base_config().mix.label_smoothing == 0.1


def test_eval_transform_defaults_are_official():
    # bicubic resize to int(224 / 0.9) = 248, centre crop 224, mean = std = 0.5;
    # the 384 model: crop fraction 1.0
    for name in list_models():
        cfg = get_config(name)
        assert (cfg.mean, cfg.std, cfg.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
        assert cfg.crop_pct == (1.0 if name == "deepvit_l_384" else 0.9), name
        assert int(cfg.image_size / cfg.crop_pct) == (384 if name == "deepvit_l_384" else 248)
