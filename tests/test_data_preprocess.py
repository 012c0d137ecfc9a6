"""Official eval transform against PIL + torchvision's Resize/CenterCrop arithmetic."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from deepvit_jax.data.preprocess import eval_preprocess, eval_resize_crop


def _pil_reference(img, size, crop_pct):
    pil = Image.fromarray(img)
    w, h = pil.size
    s = int(size / crop_pct)
    if w <= h:
        nw, nh = s, int(s * h / w)
    else:
        nh, nw = s, int(s * w / h)
    r = np.asarray(pil.resize((nw, nh), Image.BICUBIC)).astype(np.float64)
    top, left = round((nh - size) / 2), round((nw - size) / 2)
    return r[top:top + size, left:left + size]


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("size,crop_pct", [(224, 0.9), (64, 0.875), (96, 1.0)])
def test_eval_resize_crop_matches_pil(name, size, crop_pct):
    img = getattr(skimage.data, name)()
    ref = _pil_reference(img, size, crop_pct)
    out = eval_resize_crop(img, image_size=size, crop_pct=crop_pct).numpy().astype(np.float64)
    d = np.abs(out - ref)
    assert out.shape == (size, size, 3)
    assert d.mean() < 0.3 and np.percentile(d, 99) <= 1.0


def test_eval_preprocess_normalises_and_handles_grey():
    img = skimage.data.chelsea()
    x = eval_preprocess(img, image_size=64, crop_pct=0.9, mean=(0.5,) * 3, std=(0.5,) * 3)
    ref = (_pil_reference(img, 64, 0.9) / 255.0 - 0.5) / 0.5
    assert x.dtype.name == "float32" and x.shape == (64, 64, 3)
    assert np.abs(x.numpy() - ref).mean() < 0.3 / 127.5
    grey = skimage.data.camera()[:, :, None]
    g = eval_preprocess(grey, image_size=32, crop_pct=1.0, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225)).numpy()
    assert g.shape == (32, 32, 3)
    # the three channels come from the same grey values, normalised per channel
    raw = g * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
    np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)


def test_eval_preprocess_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        eval_preprocess(np.zeros((8, 8, 3), np.float32), image_size=8, crop_pct=1.0,
                        mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="crop_pct"):
        eval_preprocess(np.zeros((8, 8, 3), np.uint8), image_size=8, crop_pct=1.5,
                        mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_matches_tf_scale_and_translate(interpolation):
    """The banded-matrix resize uses ScaleAndTranslate's weights: after rounding to uint8 it
    equals tf.image.resize(antialias=True) except for rare pixels one grey level apart (the
    float sums run in another order)."""
    import tensorflow as tf

    from deepvit_jax.data.preprocess import resize_uint8

    img = skimage.data.coffee()                                   # 400 x 600
    for size in [(224, 224), (248, 330), (300, 500), (31, 17), (500, 700)]:
        ref = tf.image.resize(tf.cast(img, tf.float32), size, interpolation, antialias=True)
        ref = np.clip(np.round(ref.numpy()), 0, 255).astype(int)
        out = resize_uint8(img, size, interpolation).numpy().astype(int)
        assert out.shape == (*size, 3)
        d = np.abs(out - ref)
        assert d.max() <= 1 and (d > 0).mean() < 0.003, (size, d.max(), (d > 0).mean())
    crop = img[13:50, 7:57]                                       # upsampling a small crop
    ref = tf.image.resize(tf.cast(crop, tf.float32), (224, 224), interpolation, antialias=True)
    d = np.abs(resize_uint8(crop, (224, 224), interpolation).numpy().astype(int)
               - np.clip(np.round(ref.numpy()), 0, 255))
    assert d.max() <= 1 and (d > 0).mean() < 0.003


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
@pytest.mark.parametrize("size,crop_pct", [(224, 0.9), (64, 0.875), (96, 1.0)])
def test_eval_crop_window_is_resize_then_crop(name, size, crop_pct):
    """Eval resizes only the centre crop's pixels: today's resize-then-crop with the same
    kernel up to rounding (a value at x.5 may round either way when the float sums run in
    another order: at most one grey level on a handful of pixels), and within one grey level
    of tf.image.resize, the pre-issue-13 transform."""
    import tensorflow as tf

    from deepvit_jax.data.preprocess import center_crop, resize_shorter_side

    img = getattr(skimage.data, name)()
    s = int(size / crop_pct)
    direct = eval_resize_crop(img, image_size=size, crop_pct=crop_pct).numpy()
    two_step = center_crop(resize_shorter_side(tf.constant(img), s), size).numpy()
    d = np.abs(direct.astype(int) - two_step)
    assert d.max() <= 1 and (d > 0).sum() <= 3, (d.max(), (d > 0).sum())
    h, w = img.shape[:2]
    nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    old = tf.image.resize(tf.cast(img, tf.float32), (nh, nw), "bicubic", antialias=True)
    old = center_crop(tf.cast(tf.clip_by_value(tf.round(old), 0, 255), tf.uint8), size).numpy()
    d = np.abs(direct.astype(int) - old)
    assert d.max() <= 1 and (d > 0).mean() < 1e-3


def test_normalize_is_the_plain_formula():
    import tensorflow as tf

    from deepvit_jax.data.preprocess import normalize

    x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = (tf.cast(x, tf.float32) / 255.0 - tf.constant(mean)) / tf.constant(std)
    np.testing.assert_array_equal(normalize(x, mean, std).numpy(), ref.numpy())
    np.testing.assert_array_equal(normalize(x[1], mean, std).numpy(), ref.numpy()[1])
