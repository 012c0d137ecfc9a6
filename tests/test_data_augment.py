"""Augmentation ops against PIL (what timm calls) and timm's RandAugment magnitude formulas."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from deepvit_jax.data import augment as A

FILL = (128, 128, 128)


@pytest.fixture(scope="module")
def img():
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((96, 64), Image.BICUBIC))


POINT_OPS = {
    "autocontrast": (ImageOps.autocontrast, A.autocontrast),
    "equalize": (ImageOps.equalize, A.equalize),
    "invert": (ImageOps.invert, A.invert),
    "posterize2": (lambda p: ImageOps.posterize(p, 2), lambda x: A.posterize(x, 2)),
    "solarize100": (lambda p: ImageOps.solarize(p, 100), lambda x: A.solarize(x, 100)),
    "solarize_add50": (lambda p: p.point([min(255, i + 50) if i < 128 else i
                                          for i in range(256)] * 3),
                       lambda x: A.solarize_add(x, 50)),
    "color0.19": (lambda p: ImageEnhance.Color(p).enhance(0.19), lambda x: A.color(x, 0.19)),
    "color1.81": (lambda p: ImageEnhance.Color(p).enhance(1.81), lambda x: A.color(x, 1.81)),
    "contrast0.19": (lambda p: ImageEnhance.Contrast(p).enhance(0.19),
                     lambda x: A.contrast(x, 0.19)),
    "contrast1.81": (lambda p: ImageEnhance.Contrast(p).enhance(1.81),
                     lambda x: A.contrast(x, 1.81)),
    "brightness0.19": (lambda p: ImageEnhance.Brightness(p).enhance(0.19),
                       lambda x: A.brightness(x, 0.19)),
    "brightness1.81": (lambda p: ImageEnhance.Brightness(p).enhance(1.81),
                       lambda x: A.brightness(x, 1.81)),
    "sharpness0.19": (lambda p: ImageEnhance.Sharpness(p).enhance(0.19),
                      lambda x: A.sharpness(x, 0.19)),
    "sharpness1.81": (lambda p: ImageEnhance.Sharpness(p).enhance(1.81),
                      lambda x: A.sharpness(x, 1.81)),
}


@pytest.mark.parametrize("name", sorted(POINT_OPS))
def test_pixel_ops_match_pil(img, name):
    pil_fn, tf_fn = POINT_OPS[name]
    ref = np.asarray(pil_fn(Image.fromarray(img))).astype(int)
    out = tf_fn(tf.constant(img)).numpy().astype(int)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1
    assert (out != ref).mean() < 0.001


def _pil_affine(p, m):
    return p.transform(p.size, Image.AFFINE, m, resample=Image.BILINEAR, fillcolor=FILL)


GEOM_OPS = {
    "rotate27": (lambda p: p.rotate(27, resample=Image.BILINEAR, fillcolor=FILL),
                 lambda x: A.rotate(x, 27.0, FILL)),
    "rotate-15": (lambda p: p.rotate(-15, resample=Image.BILINEAR, fillcolor=FILL),
                  lambda x: A.rotate(x, -15.0, FILL)),
    "shear_x0.27": (lambda p: _pil_affine(p, (1, 0.27, 0, 0, 1, 0)),
                    lambda x: A.shear_x(x, 0.27, FILL)),
    "shear_y-0.2": (lambda p: _pil_affine(p, (1, 0, 0, -0.2, 1, 0)),
                    lambda x: A.shear_y(x, -0.2, FILL)),
    "translate_x0.3": (lambda p: _pil_affine(p, (1, 0, 0.3 * 96, 0, 1, 0)),
                       lambda x: A.translate_x_rel(x, 0.3, FILL)),
    "translate_y-0.405": (lambda p: _pil_affine(p, (1, 0, 0, 0, 1, -0.405 * 64)),
                          lambda x: A.translate_y_rel(x, -0.405, FILL)),
}


@pytest.mark.parametrize("name", sorted(GEOM_OPS))
def test_geometric_ops_match_pil(img, name):
    """Same geometry and fill as PIL; only the pixels at the image/fill border differ."""
    pil_fn, tf_fn = GEOM_OPS[name]
    ref = np.asarray(pil_fn(Image.fromarray(img))).astype(int)
    out = tf_fn(tf.constant(img)).numpy().astype(int)
    d = np.abs(out - ref)
    assert d.mean() < 1.0
    assert (d > 1).mean() < 0.03                      # a thin band along the border
    assert np.median(d) == 0


def _ipt_affine(image, matrix, fill):
    """Reference warp: ImageProjectiveTransformV3 on the image plus an all-ones coverage
    channel, fill colour weighted by the uncovered share (the previous host implementation and
    ``device_augment._warp``'s definition)."""
    a, b, c, d, e, f = [float(v) for v in matrix]
    t = tf.constant([[a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5, 0, 0]],
                    tf.float32)
    x = tf.cast(image, tf.float32)
    x = tf.concat([x, tf.ones_like(x[..., :1])], -1)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=t, output_shape=tf.shape(image)[:2], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0].numpy()
    out = out[..., :3] + (1.0 - out[..., 3:]) * np.asarray(fill, np.float32)
    return np.clip(np.round(out), 0, 255).astype(int)


def _matrix(name, arg, h, w):
    if name == "Rotate":
        ang = -math.radians(arg)
        a, b, d, e = math.cos(ang), math.sin(ang), -math.sin(ang), math.cos(ang)
        return a, b, -a * w / 2 - b * h / 2 + w / 2, d, e, -d * w / 2 - e * h / 2 + h / 2
    return {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * w, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}[name]


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel"])
def test_geometric_ops_match_projective_transform(img, name):
    """The hand-written warps (fill folded into a three-channel warp; translations as slices
    and a lerp) give ImageProjectiveTransformV3's result: rare pixels one level apart (float
    rounding at .5), at several magnitudes, both signs, two fill colours, two image sizes."""
    big = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC))
    for image in (img, big):
        h, w = image.shape[:2]
        for fill in ((124, 116, 104), (0, 255, 7)):
            for level in (2.7, 6.1, 9.3):
                for neg in (False, True):
                    arg = A.level_to_arg(name, level, neg)
                    out = A.apply_op(name, tf.constant(image), arg,
                                     tf.constant(fill, tf.float32)).numpy().astype(int)
                    ref = _ipt_affine(image, _matrix(name, float(arg), h, w), fill)
                    d = np.abs(out - ref)
                    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (level, neg, fill, w)
                    assert (out == np.asarray(fill)).all(-1).mean() > 0.005   # fill visible


@pytest.mark.parametrize("shift", [-40, -1, 0, 3, 63, 200])
def test_translate_whole_pixels_is_a_shift_with_fill(img, shift):
    """A whole-pixel translation is an exact shift; vacated pixels are the fill colour."""
    fill = np.array([124, 116, 104])
    for axis, op in ((1, A.translate_x_rel), (0, A.translate_y_rel)):
        n = img.shape[axis]
        out = op(tf.constant(img), shift / n, tf.constant(fill, tf.float32)).numpy()
        ref = np.broadcast_to(fill, img.shape).copy()
        src = np.arange(n) + shift                      # output i samples input i + shift
        ok = (src >= 0) & (src < n)
        if axis == 1:
            ref[:, ok] = img[:, src[ok]]
        else:
            ref[ok] = img[src[ok]]
        np.testing.assert_array_equal(out, ref)


def test_equalize_degenerate_channels_match_pil():
    """One- and two-valued channels (PIL leaves a channel with step 0 unchanged)."""
    rng = np.random.default_rng(0)
    x = np.stack([np.full((16, 16), 3), rng.integers(0, 256, (16, 16)),
                  rng.choice([10, 200], (16, 16))], -1).astype(np.uint8)
    ref = np.asarray(ImageOps.equalize(Image.fromarray(x)))
    np.testing.assert_array_equal(A.equalize(tf.constant(x)).numpy(), ref)


def test_randaugment_layers_apply_the_drawn_ops_in_order(img):
    """The layer loop equals applying each drawn op (or nothing) in turn."""
    params = dict(A.parse_randaugment("rand-m9-mstd0.5-inc1"), num_layers=3, prob=0.8)
    fill = (124, 116, 104)
    names = params["transforms"]
    graph = tf.function(lambda x, s: A.randaugment(x, s, params, fill))   # as in tf.data
    applied = 0
    for i in range(12):
        seed = tf.constant([i, 5], tf.int64)
        out = graph(tf.constant(img), seed).numpy()
        ops, apply, level, negate = A.draw_layers(A._uniform(seed, [3, A.LAYER_UNIFORMS]),
                                                  params)
        ref = tf.constant(img)
        for j in range(3):
            if bool(apply[j]):
                name = names[int(ops[j])]
                ref = A.apply_op(name, ref, A.level_to_arg(name, level[j], negate[j]),
                                 tf.constant(fill, tf.float32))
                applied += 1
        d = np.abs(out.astype(int) - ref.numpy().astype(int))   # graph vs eager float maths:
        assert d.max() <= 1 and (d > 0).mean() < 1e-3          # a rare .5 rounds the other way
    assert applied >= 20                       # 36 layers at p = 0.8


def test_posterize_zero_bits_is_black(img):
    assert A.posterize(tf.constant(img), 0).numpy().max() == 0
    np.testing.assert_array_equal(A.posterize(tf.constant(img), 8).numpy(), img)


# timm auto_augment LEVEL_TO_ARG at magnitudes 5, 9, 10 (the published formulas evaluated by
# hand: rotate 30*m/10, shear 0.3*m/10, translate 0.45*m/10, posterize 4-int(4m/10),
# solarize 256-int(256m/10), solarize-add int(110m/10), enhance max(0.1, 1 +- 0.9m/10)).
TIMM_TABLE = {
    5: {"Rotate": 15.0, "ShearX": 0.15, "TranslateXRel": 0.225, "PosterizeIncreasing": 2,
        "SolarizeIncreasing": 128, "SolarizeAdd": 55, "ColorIncreasing": (1.45, 0.55)},
    9: {"Rotate": 27.0, "ShearX": 0.27, "TranslateXRel": 0.405, "PosterizeIncreasing": 1,
        "SolarizeIncreasing": 26, "SolarizeAdd": 99, "ColorIncreasing": (1.81, 0.19)},
    10: {"Rotate": 30.0, "ShearX": 0.3, "TranslateXRel": 0.45, "PosterizeIncreasing": 0,
         "SolarizeIncreasing": 0, "SolarizeAdd": 110, "ColorIncreasing": (1.9, 0.1)},
}


@pytest.mark.parametrize("m", sorted(TIMM_TABLE))
def test_randaugment_levels_match_timm(m):
    for name, want in TIMM_TABLE[m].items():
        pos = float(A.level_to_arg(name, m, False))
        neg = float(A.level_to_arg(name, m, True))
        if isinstance(want, tuple):
            assert pos == pytest.approx(want[0], abs=1e-5) and neg == pytest.approx(want[1],
                                                                                   abs=1e-5)
        elif name in ("Rotate", "ShearX", "TranslateXRel"):
            assert pos == pytest.approx(want, abs=1e-5) and neg == pytest.approx(-want, abs=1e-5)
        else:
            assert pos == want and neg == want


def test_parse_randaugment_spec():
    p = A.parse_randaugment("rand-m9-mstd0.5-inc1")
    assert p["magnitude"] == 9 and p["magnitude_std"] == 0.5 and p["num_layers"] == 2
    assert p["transforms"] == A.RAND_INCREASING_TRANSFORMS and len(p["transforms"]) == 15
    assert A.parse_randaugment("rand-m7-n3")["transforms"] == A.RAND_TRANSFORMS
    assert A.parse_randaugment("rand-mstd101")["magnitude_std"] == math.inf
    with pytest.raises(ValueError, match="unsupported section"):
        A.parse_randaugment("rand-m9-w0")
    with pytest.raises(ValueError, match="rand-"):
        A.parse_randaugment("augmix-m3")


def test_magnitude_noise_statistics():
    u = tf.random.stateless_uniform([4000], tf.constant([0, 7], tf.int64))
    ms = A.sample_magnitude(u, 9.0, 0.5).numpy()
    assert ms.max() <= 10.0 and ms.min() >= 0.0
    assert abs(ms.mean() - 8.996) < 0.03         # N(9, 0.5) clipped at 10: mean 8.996
    assert 0.45 < ms.std() < 0.51                # sd 0.48
    assert A.sample_magnitude(u, 9.0, math.inf).numpy().std() == pytest.approx(9 / 12**0.5,
                                                                              rel=0.05)


def test_random_erasing_rectangle_inside_image():
    size = 48
    x = tf.zeros((size, size, 3))
    erased = 0
    for i in range(120):
        out = A.random_erasing(x, tf.constant([i, 3], tf.int64), probability=0.5,
                               mode="pixel").numpy()
        mask = np.any(out != 0, axis=-1)
        if not mask.any():
            continue
        erased += 1
        rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask.sum() == h * w                         # one filled rectangle
        assert h < size and w < size                       # strictly inside, as timm
        assert 0.02 * 0.8 <= h * w / size**2 <= 1 / 3 * 1.2
        assert 0.3 * 0.7 <= h / w <= 1 / 0.3 * 1.4
        assert abs(out[mask].std() - 1.0) < 0.35           # per-pixel N(0, 1)
    assert 40 <= erased <= 80                              # p = 0.5 of 120


def test_rrc_window_follows_torchvision():
    fallbacks = 0
    for i in range(200):
        t, lf, h, w = [int(v) for v in A.rrc_window(tf.constant([i, 1], tf.int64), 60, 80)]
        assert 0 <= t and t + h <= 60 and 0 <= lf and lf + w <= 80 and h > 0 and w > 0
        area = h * w / (60 * 80)
        assert 0.07 <= area <= 1.0
        assert 0.7 <= w / h <= 1.4 or (h, w) == (60, 80)
    # a very wide image: no try fits the aspect range -> centred crop with ratio 4/3
    t, lf, h, w = [int(v) for v in A.rrc_window(tf.constant([0, 0], tf.int64), 10, 400,
                                               scale=(0.99, 1.0))]
    assert (t, h, w) == (0, 10, 13) and lf == (400 - 13) // 2
    del fallbacks


def test_train_augment_deterministic_and_switchable(img):
    from deepvit_jax.data.config import default_data_config

    cfg = default_data_config()
    enc = tf.io.encode_jpeg(tf.constant(img))
    fn = A.make_train_augment(cfg, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    a = fn(enc, tf.constant([1, 2], tf.int64)).numpy()
    b = fn(enc, tf.constant([1, 2], tf.int64)).numpy()
    c = fn(enc, tf.constant([1, 3], tf.int64)).numpy()
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
    # everything off -> plain resize + normalise
    cfg.random_resized_crop, cfg.hflip, cfg.randaugment, cfg.random_erasing = False, 0, "", 0
    cfg.train_interpolation = "bicubic"
    plain = A.make_train_augment(cfg, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    dec = tf.io.decode_jpeg(enc)
    ref = (tf.cast(tf.image.resize(dec, (32, 32), "bicubic", antialias=True), tf.float32))
    ref = (np.clip(np.round(ref.numpy()), 0, 255) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(plain(enc, tf.constant([0, 0], tf.int64)).numpy(), ref, atol=1e-6)
