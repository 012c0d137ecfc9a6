"""Host-side training augmentation in tf.data, following timm's recipe (the official DeepViT
training script calls timm's ``create_transform``).

Order (as timm's ``create_transform(is_training=True)``): random-resized crop (+ random
bilinear/bicubic resize) -> horizontal flip -> RandAugment (uint8) -> normalise -> random
erasing.  All randomness is *stateless*: every op takes a seed derived from the per-example
seed, so the stream is reproducible under any tf.data parallelism and resumable.

Why hand-written instead of Keras / keras_cv / tf-models-official layers:
* ``tf.image.sample_distorted_bounding_box`` samples the aspect ratio linearly and has a
  different fallback than torchvision's ``RandomResizedCrop`` (log-uniform ratio, 10 tries,
  centre-crop fallback), which the recipe uses; we sample the torchvision way, then use TF's
  own ``decode_and_crop_jpeg`` (decode only the crop) and ``tf.image.resize``.
* Keras' RandAugment / keras_cv's RandAugment and tf-models-official's ``RandAugment`` use other
  op sets and magnitude scales than timm's ``rand-m9-mstd0.5-inc1`` (increasing ops, per-op
  probability 0.5, Gaussian magnitude noise, translate 45 % of the size, fill = mean colour),
  use stateful RNGs (not resumable), and tf-models-official is a heavy install.  The ops below
  follow PIL's definitions (what timm calls) and are tested against PIL and timm's magnitude
  formulas (tests/test_data_augment.py).
* Random erasing has no TF library version with timm's semantics.
Deviation: the affine ops (rotate/shear/translate) use bilinear sampling only (TF's projective
transform has no bicubic); timm picks bilinear or bicubic at random.

Cost (``benchmarks/data_profile.py``, one core): rotate and shear run TF's
``ImageProjectiveTransformV3`` on the three colour channels with the fill folded in (not on an
extra coverage channel), the translations are hand-written as two slices and a lerp, equalize
is one 768-bin histogram, random erasing splices the box in with slices; the RandAugment layers
share one graph (a ``tf.while_loop``), which halves the per-iterator set-up of the map
function.  Results equal the straightforward forms (tests/test_data_augment.py).

RandAugment is table-driven as timm's ``auto_augment``: ``LEVEL_TO_ARG`` (name -> magnitude
formula, shared with the on-device version in ``device_augment.py``) and ``NAME_TO_OP`` (name
-> TF op).  With ``data.device_augment`` the host stops after crop + resize + flip and hands
uint8 images to ``device_augment.make_device_augment`` (RandAugment, normalise, erasing in the
jitted train step).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import tensorflow as tf

from deepvit_jax.data import preprocess

# ----------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------


def split_seed(seed, num: int):
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval,
                                       dtype=tf.float32)


# ----------------------------------------------------------------------------------------
# random-resized crop (torchvision RandomResizedCrop.get_params semantics)
# ----------------------------------------------------------------------------------------


def rrc_window(seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """(top, left, h, w) as torchvision: area ~ U(scale) * H * W, log-ratio ~ U(log ratio),
    w = round(sqrt(a r)), h = round(sqrt(a / r)); first of 10 tries that fits, else a centre
    crop with the ratio clamped to the range."""
    s = split_seed(seed, 4)
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    area = h_f * w_f
    target = _uniform(s[0], [attempts], scale[0], scale[1]) * area
    logr = _uniform(s[1], [attempts], math.log(ratio[0]), math.log(ratio[1]))
    r = tf.exp(logr)
    cw = tf.cast(tf.round(tf.sqrt(target * r)), tf.int32)
    ch = tf.cast(tf.round(tf.sqrt(target / r)), tf.int32)
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    k = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
    any_ok = tf.reduce_any(ok)
    ch_k, cw_k = ch[k], cw[k]
    u = _uniform(s[2], [2])
    top = tf.minimum(tf.cast(tf.floor(u[0] * tf.cast(height - ch_k + 1, tf.float32)), tf.int32),
                     height - ch_k)
    left = tf.minimum(tf.cast(tf.floor(u[1] * tf.cast(width - cw_k + 1, tf.float32)), tf.int32),
                      width - cw_k)
    # fallback: whole image, ratio clamped, centred (int((H - h) / 2) as torchvision)
    in_ratio = w_f / h_f
    fw = tf.where(in_ratio < ratio[0], width,
                  tf.where(in_ratio > ratio[1],
                           tf.cast(tf.round(h_f * ratio[1]), tf.int32), width))
    fh = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
    ftop = (height - fh) // 2
    fleft = (width - fw) // 2
    return (tf.where(any_ok, top, ftop), tf.where(any_ok, left, fleft),
            tf.where(any_ok, ch_k, fh), tf.where(any_ok, cw_k, fw))


def _image_shape(encoded):
    """(H, W) from the header for JPEG (cheap), else by decoding."""
    return tf.cond(tf.io.is_jpeg(encoded),
                   lambda: tf.io.extract_jpeg_shape(encoded)[:2],
                   lambda: tf.shape(preprocess.decode_image(encoded))[:2])


def decode_random_crop(encoded, seed, scale, ratio):
    """Decode only the random-resized-crop window (``decode_and_crop_jpeg`` for JPEG)."""
    shape = _image_shape(encoded)
    top, left, h, w = rrc_window(seed, shape[0], shape[1], scale, ratio)
    window = tf.stack([top, left, h, w])

    def jpeg():
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        img = preprocess.decode_image(encoded)
        return tf.image.crop_to_bounding_box(img, top, left, h, w)

    img = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    img.set_shape([None, None, 3])
    return img


def random_interp_resize(image, size: int, interpolation: str, seed):
    if interpolation == "random":
        pick = _uniform(seed) < 0.5
        return tf.cond(pick, lambda: preprocess.resize_uint8(image, (size, size), "bilinear"),
                       lambda: preprocess.resize_uint8(image, (size, size), "bicubic"))
    return preprocess.resize_uint8(image, (size, size), interpolation)


# ----------------------------------------------------------------------------------------
# PIL-semantics image ops on uint8 (H, W, 3)
# ----------------------------------------------------------------------------------------


def _to_u8(x):
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _blend(degenerate, image, factor):
    """PIL Image.blend(degenerate, image, factor) on uint8: float maths, clipped, truncated
    (PIL's ``CLIP8(in1 + alpha * (in2 - in1))`` assigned to UINT8)."""
    d = tf.cast(degenerate, tf.float32)
    x = tf.cast(image, tf.float32)
    return tf.cast(tf.clip_by_value(tf.floor(d + factor * (x - d)), 0.0, 255.0), tf.uint8)


def grayscale_l(image):
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16."""
    x = tf.cast(image, tf.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def autocontrast(image):
    """ImageOps.autocontrast (cutoff 0): per channel, stretch [lo, hi] to [0, 255]."""
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    y = tf.clip_by_value(tf.floor(x * scale - lo * scale), 0.0, 255.0)
    # PIL's int() truncates towards zero: for negative values clip gives 0 either way.
    return tf.where(hi > lo, tf.cast(y, tf.uint8), image)


def equalize(image):
    """ImageOps.equalize, per channel: one 768-bin histogram (channel c counts value v in bin
    256 c + v) and one table lookup for the three channels (per-channel slices, histograms and
    lookups cost twice as much and triple the graph)."""
    v = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    hist = tf.reshape(tf.math.bincount(tf.reshape(v, [-1]), minlength=768, maxlength=768),
                      [3, 256])
    bins = tf.range(256)
    last = tf.reduce_max(tf.where(hist > 0, bins, -1), axis=1)           # last non-empty bin
    step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, last, batch_dims=1)) // 255
    lut = (step[:, None] // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // tf.maximum(
        step, 1)[:, None]
    # a channel with step 0 (one or two values) is left unchanged, as PIL
    lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), bins)
    return tf.gather(tf.cast(tf.reshape(lut, [-1]), tf.uint8), v)


def invert(image):
    return 255 - image


def posterize(image, bits):
    """Keep the ``bits`` most significant bits (bits >= 8: unchanged)."""
    bits = tf.cast(bits, tf.int32)
    mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - tf.minimum(bits, 8)) - 1)
    out = tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)
    return tf.where(bits >= 8, image, out)


def solarize(image, threshold):
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, add, threshold=128):
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < threshold, tf.minimum(x + tf.cast(add, tf.int32), 255), x),
                   tf.uint8)


def color(image, factor):
    g = tf.cast(grayscale_l(image), tf.uint8)
    return _blend(tf.stack([g, g, g], axis=-1), image, factor)


def contrast(image, factor):
    mean = tf.floor(tf.reduce_mean(tf.cast(grayscale_l(image), tf.float32)) + 0.5)
    return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13,
    border pixels unchanged)."""
    x = tf.cast(image, tf.float32)[None]
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    shape = tf.shape(image)
    inner = tf.pad(tf.ones(shape[:2] - 2, tf.bool), [[1, 1], [1, 1]])[..., None]
    degenerate = tf.where(inner, smooth, tf.cast(image, tf.float32))
    return _blend(degenerate, image, factor)


def pil_affine(image, matrix, fill):
    """PIL ``Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill)``: output pixel
    (x, y) samples the input at (a x + b y + c, d x + e y + f) with PIL's half-pixel centres;
    a neighbour outside the image reads as the fill colour (as ``device_augment._warp``)."""
    a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
    c2 = c + 0.5 * (a + b) - 0.5
    f2 = f + 0.5 * (d + e) - 0.5
    transform = tf.stack([a, b, c2, d, e, f2, 0.0, 0.0])[None]
    shape = tf.shape(image)
    # ImageProjectiveTransform fills with one scalar: warp ``image - fill`` with fill 0 and add
    # the fill back (the bilinear weights sum to one, so each neighbour outside the image
    # contributes the fill colour).  Three channels, not the image plus an all-ones coverage
    # channel: the op's cost is per output element (2.8 ms -> 1.4 ms per 224^2 image).
    fill = tf.cast(fill, tf.float32)
    x = tf.cast(image, tf.float32) - fill
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform, output_shape=shape[:2], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return _to_u8(out + fill)


def _translate(image, pixels, fill, axis: int):
    """``pil_affine`` of a pure translation along ``axis`` (0: rows, 1: columns) by
    ``pixels``: output[i] samples input[i + pixels].  Every output pixel blends the same two
    neighbours (offsets k = floor(pixels) and k + 1, weight frac(pixels)), so it is two slices
    of the image framed by the fill colour and one lerp -- hand-written because
    ImageProjectiveTransformV3 costs ~2.7 ms per 224^2 image and this ~0.3 ms."""
    pixels = tf.cast(pixels, tf.float32)
    shape = tf.shape(image)
    n = shape[axis]
    k0 = tf.floor(pixels)
    frac = pixels - k0
    # beyond n + 1 pixels every neighbour is fill: clip so the slices stay in the frame
    k = tf.cast(tf.clip_by_value(k0, -tf.cast(n + 2, tf.float32), tf.cast(n + 1, tf.float32)),
                tf.int32)
    block_shape = tf.stack([n + 2, shape[1], 3] if axis == 0 else [shape[0], n + 2, 3])
    block = tf.broadcast_to(tf.cast(tf.round(tf.cast(fill, tf.float32)), tf.uint8), block_shape)
    framed = tf.concat([block, image, block], axis)       # framed[j] = input[j - (n + 2)]
    start = n + 2 + k
    if axis == 0:
        lo, hi = framed[start:start + n], framed[start + 1:start + 1 + n]
    else:
        lo, hi = framed[:, start:start + n], framed[:, start + 1:start + 1 + n]
    lo = tf.cast(lo, tf.float32)
    hi = tf.cast(hi, tf.float32)
    return _to_u8((1.0 - frac) * lo + frac * hi)


def rotate(image, degrees, fill):
    """PIL ``img.rotate(degrees)`` (counter-clockwise, about the centre, same size)."""
    shape = tf.shape(image)
    cx = tf.cast(shape[1], tf.float32) / 2.0
    cy = tf.cast(shape[0], tf.float32) / 2.0
    ang = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    a, b = tf.cos(ang), tf.sin(ang)
    d, e = -tf.sin(ang), tf.cos(ang)
    c = a * (-cx) + b * (-cy) + cx
    f = d * (-cx) + e * (-cy) + cy
    return pil_affine(image, (a, b, c, d, e, f), fill)


def shear_x(image, factor, fill):
    return pil_affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill):
    return pil_affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x_rel(image, pct, fill):
    """``pil_affine(image, (1, 0, pct * W, 0, 1, 0), fill)``, as two slices and a lerp."""
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
    return _translate(image, pixels, fill, axis=1)


def translate_y_rel(image, pct, fill):
    """``pil_affine(image, (1, 0, 0, 0, 1, pct * H), fill)``, as two slices and a lerp."""
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
    return _translate(image, pixels, fill, axis=0)


# ----------------------------------------------------------------------------------------
# RandAugment (timm semantics)
# ----------------------------------------------------------------------------------------

LEVEL_DENOM = 10.0

RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate",
                              "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                              "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                              "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")


def parse_randaugment(spec: str) -> dict:
    """timm's ``rand-m9-mstd0.5-inc1`` string -> {magnitude, num_layers, magnitude_std,
    magnitude_max, transforms}."""
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"data.randaugment={spec!r}: a timm RandAugment string starts with "
                         "'rand-' (e.g. 'rand-m9-mstd0.5-inc1')")
    out = dict(magnitude=LEVEL_DENOM, num_layers=2, magnitude_std=0.0, magnitude_max=None,
               transforms=RAND_TRANSFORMS, prob=0.5)
    for c in parts[1:]:
        cs = re.split(r"(\d.*)", c)
        if len(cs) < 2:
            continue
        key, val = cs[:2]
        if key == "mstd":
            mstd = float(val)
            out["magnitude_std"] = math.inf if mstd > 100 else mstd
        elif key == "mmax":
            out["magnitude_max"] = int(val)
        elif key == "inc":
            if bool(int(val)):
                out["transforms"] = RAND_INCREASING_TRANSFORMS
        elif key == "m":
            out["magnitude"] = float(int(val))
        elif key == "n":
            out["num_layers"] = int(val)
        else:
            raise ValueError(f"data.randaugment={spec!r}: unsupported section {c!r} "
                             "(supported: m, n, mstd, mmax, inc)")
    return out


def _enhance_level(frac, sign, xp):
    return xp.maximum(0.1, 1.0 + frac * 0.9 * sign)


# timm ``auto_augment.LEVEL_TO_ARG``: name -> f(frac = level / 10, sign = +-1, xp), with ``xp``
# ``tf.math`` (host) or ``jax.numpy`` (device), so both paths use the same formulas.
LEVEL_TO_ARG = {
    "AutoContrast": lambda frac, sign, xp: 0.0 * frac,
    "Equalize": lambda frac, sign, xp: 0.0 * frac,
    "Invert": lambda frac, sign, xp: 0.0 * frac,
    "Rotate": lambda frac, sign, xp: frac * 30.0 * sign,
    "Posterize": lambda frac, sign, xp: xp.floor(frac * 4.0),
    "PosterizeIncreasing": lambda frac, sign, xp: 4.0 - xp.floor(frac * 4.0),
    "Solarize": lambda frac, sign, xp: xp.floor(frac * 256.0),
    "SolarizeIncreasing": lambda frac, sign, xp: 256.0 - xp.floor(frac * 256.0),
    "SolarizeAdd": lambda frac, sign, xp: xp.floor(frac * 110.0),
    "Color": lambda frac, sign, xp: frac * 1.8 + 0.1,
    "ColorIncreasing": _enhance_level,
    "Contrast": lambda frac, sign, xp: frac * 1.8 + 0.1,
    "ContrastIncreasing": _enhance_level,
    "Brightness": lambda frac, sign, xp: frac * 1.8 + 0.1,
    "BrightnessIncreasing": _enhance_level,
    "Sharpness": lambda frac, sign, xp: frac * 1.8 + 0.1,
    "SharpnessIncreasing": _enhance_level,
    "ShearX": lambda frac, sign, xp: frac * 0.3 * sign,
    "ShearY": lambda frac, sign, xp: frac * 0.3 * sign,
    "TranslateXRel": lambda frac, sign, xp: frac * 0.45 * sign,
    "TranslateYRel": lambda frac, sign, xp: frac * 0.45 * sign,
}

# timm ``auto_augment.NAME_TO_OP``: name -> f(uint8 image, arg, fill colour) in TF.
NAME_TO_OP = {
    "AutoContrast": lambda img, arg, fill: autocontrast(img),
    "Equalize": lambda img, arg, fill: equalize(img),
    "Invert": lambda img, arg, fill: invert(img),
    "Rotate": rotate,
    "Posterize": lambda img, arg, fill: posterize(img, arg),
    "PosterizeIncreasing": lambda img, arg, fill: posterize(img, arg),
    "Solarize": lambda img, arg, fill: solarize(img, arg),
    "SolarizeIncreasing": lambda img, arg, fill: solarize(img, arg),
    "SolarizeAdd": lambda img, arg, fill: solarize_add(img, arg),
    "Color": lambda img, arg, fill: color(img, arg),
    "ColorIncreasing": lambda img, arg, fill: color(img, arg),
    "Contrast": lambda img, arg, fill: contrast(img, arg),
    "ContrastIncreasing": lambda img, arg, fill: contrast(img, arg),
    "Brightness": lambda img, arg, fill: brightness(img, arg),
    "BrightnessIncreasing": lambda img, arg, fill: brightness(img, arg),
    "Sharpness": lambda img, arg, fill: sharpness(img, arg),
    "SharpnessIncreasing": lambda img, arg, fill: sharpness(img, arg),
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}


def level_to_arg(name: str, level, negate):
    """timm's level -> argument of op ``name``; ``negate`` is timm's ``_randomly_negate`` coin
    (bool)."""
    frac = tf.cast(level, tf.float32) / LEVEL_DENOM
    return LEVEL_TO_ARG[name](frac, tf.where(negate, -1.0, 1.0), tf.math)


def apply_op(name: str, image, arg, fill):
    try:
        op = NAME_TO_OP[name]
    except KeyError:
        raise ValueError(f"unknown RandAugment op {name!r} (known: {sorted(NAME_TO_OP)})") from None
    return op(image, arg, fill)


def sample_magnitude(u, magnitude, magnitude_std, magnitude_max=None):
    """timm: m ~ N(m, mstd) (or U(0, m) for mstd=inf), clipped to [0, mmax or 10], from one
    uniform ``u`` (through the normal quantile)."""
    upper = float(magnitude_max or LEVEL_DENOM)
    if magnitude_std == math.inf:
        m = u * magnitude
    elif magnitude_std > 0:
        m = magnitude + magnitude_std * tf.math.ndtri(u)
    else:
        m = tf.constant(magnitude, tf.float32) + 0.0 * u
    return tf.clip_by_value(m, 0.0, upper)


LAYER_UNIFORMS = 4      # per RandAugment layer: op, apply, magnitude, sign


def draw_layers(u, params: dict):
    """(op index, apply, level, negate) of RandAugment layers from uniforms ``u`` (..., 4):
    op uniform over the transforms, applied with probability ``prob`` (timm skips when
    random() > prob), level from ``sample_magnitude``, sign coin 0.5.  One random call per
    example instead of one per decision (each stateless op costs ~50 us in tf.data)."""
    n = len(params["transforms"])
    op = tf.minimum(tf.cast(tf.floor(u[..., 0] * n), tf.int32), n - 1)
    apply = u[..., 1] <= params["prob"]
    level = sample_magnitude(u[..., 2], params["magnitude"], params["magnitude_std"],
                             params["magnitude_max"])
    negate = u[..., 3] > 0.5
    return op, apply, level, negate


def draw_layer(seed, params: dict):
    """One layer's draws from a stateless seed."""
    return draw_layers(_uniform(seed, [LAYER_UNIFORMS]), params)


def randaugment(image, seed, params: dict, fill: Sequence[int]):
    """timm ``RandAugment``: ``num_layers`` ops drawn uniformly with replacement, each applied
    with probability 0.5, magnitude sampled per op.

    The layers run in a ``tf.while_loop`` whose body (one ``switch_case`` over the ops) is
    built once, not once per layer: building a tf.data iterator instantiates and optimises the
    whole map function (~0.25 ms per graph node, ~0.55 s for the two unrolled layers), paid by
    every new iterator."""
    names = params["transforms"]
    num_layers = params["num_layers"]
    fill = tf.constant([float(v) for v in fill], tf.float32)
    op, apply, level, negate = draw_layers(_uniform(seed, [num_layers, LAYER_UNIFORMS]), params)
    # one switch per layer: the drawn op, or the identity when the coin says skip
    index = tf.where(apply, op, len(names))

    def layer(i, image):
        lvl, neg = level[i], negate[i]

        def branch(name):
            return lambda: apply_op(name, image, level_to_arg(name, lvl, neg), fill)

        out = tf.switch_case(index[i], [branch(n) for n in names] + [lambda: tf.identity(image)])
        out.set_shape([None, None, 3])
        return i + 1, out

    static = image.shape
    _, image = tf.while_loop(lambda i, _: i < num_layers, layer, [tf.constant(0), image],
                             shape_invariants=[tf.TensorShape([]),
                                               tf.TensorShape([None, None, 3])],
                             parallel_iterations=1)
    image.set_shape(static.merge_with([None, None, 3]))
    return image


# ----------------------------------------------------------------------------------------
# random erasing (timm RandomErasing, applied to the normalised image)
# ----------------------------------------------------------------------------------------


def random_erasing(image, seed, *, probability=0.25, mode="pixel", max_count=1,
                   min_area=0.02, max_area=1 / 3, min_aspect=0.3, attempts=10):
    """timm ``RandomErasing``: with prob ``probability`` erase 1..max_count rectangles of area
    U(0.02, 1/3)/count and log-uniform aspect (0.3, 1/0.3), first of 10 tries that fits
    (w < W and h < H); fill: 'pixel' per-pixel N(0,1), 'rand' per-channel N(0,1), 'const' 0."""
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"data.erasing_mode={mode!r} is not 'pixel', 'rand' or 'const'")
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    area = tf.cast(height * width, tf.float32)
    s = split_seed(seed, 1 + max_count)
    per_box = 2 * attempts + 2                   # areas, aspect ratios, top, left
    u = _uniform(s[0], [2 + max_count * per_box])   # one random call for all the decisions
    do = u[0] < probability
    if max_count > 1:
        count = tf.minimum(tf.cast(tf.floor(u[1] * max_count), tf.int32) + 1, max_count)
    else:
        count = tf.constant(1, tf.int32)
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    for j in range(max_count):
        uj = u[2 + j * per_box:2 + (j + 1) * per_box]
        target = ((min_area + (max_area - min_area) * uj[:attempts]) * area
                  / tf.cast(count, tf.float32))
        r = tf.exp(lo + (hi - lo) * uj[attempts:2 * attempts])
        h = tf.cast(tf.round(tf.sqrt(target * r)), tf.int32)
        w = tf.cast(tf.round(tf.sqrt(target / r)), tf.int32)
        ok = (w < width) & (h < height)
        k = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
        hk, wk = h[k], w[k]
        top = tf.minimum(tf.cast(uj[-2] * tf.cast(height - hk + 1, tf.float32), tf.int32),
                         height - hk)
        left = tf.minimum(tf.cast(uj[-1] * tf.cast(width - wk + 1, tf.float32), tf.int32),
                          width - wk)

        def erase(x=image, top=top, left=left, hk=hk, wk=wk, s3=s[1 + j]):
            box_shape = tf.stack([hk, wk, 3])
            if mode == "pixel":       # noise for the box only (as timm)
                box = tf.random.stateless_normal(box_shape, s3)
            elif mode == "rand":
                box = tf.broadcast_to(tf.random.stateless_normal([1, 1, 3], s3), box_shape)
            else:
                box = tf.zeros(box_shape, x.dtype)
            # the box spliced in with slices and concats (copies) instead of a tf.where over
            # the whole image with a broadcast row x column mask: 1.2 -> 0.3 ms per 224^2
            band = x[top:top + hk]
            band = tf.concat([band[:, :left], box, band[:, left + wk:]], axis=1)
            return tf.concat([x[:top], band, x[top + hk:]], axis=0)

        active = do & tf.reduce_any(ok) & (j < count)
        image = tf.cond(active, erase, lambda x=image: tf.identity(x))
    return image


# ----------------------------------------------------------------------------------------
# the whole training transform
# ----------------------------------------------------------------------------------------


def make_train_augment(data_cfg, *, image_size: int, mean: Sequence[float],
                       std: Sequence[float]):
    """-> fn(encoded_bytes, seed int64[2]) -> float32 (S, S, 3), per the config switches.

    With ``data_cfg.device_augment`` the host part stops after crop + resize + flip and
    returns uint8 (S, S, 3); ``device_augment.make_device_augment`` does the rest on device."""
    size = int(image_size)
    rrc = bool(data_cfg.random_resized_crop)
    scale = tuple(float(v) for v in data_cfg.rrc_scale)
    ratio = tuple(float(v) for v in data_cfg.rrc_ratio)
    interp = str(data_cfg.train_interpolation)
    if interp != "random":
        preprocess._method(interp)
    hflip = float(data_cfg.hflip)
    ra = parse_randaugment(data_cfg.randaugment) if data_cfg.randaugment else None
    fill = tuple(min(255, round(255 * m)) for m in mean)     # timm: img_mean fill colour
    erase_p = float(data_cfg.random_erasing)
    erase_mode = str(data_cfg.erasing_mode)
    erase_count = int(data_cfg.erasing_count)
    on_device = bool(data_cfg.get("device_augment", False))
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"data.rrc_scale={scale} / data.rrc_ratio={ratio} are not valid ranges")

    def fn(encoded, seed):
        s = split_seed(seed, 6)
        if rrc:
            img = decode_random_crop(encoded, s[0], scale, ratio)
        else:
            img = preprocess.decode_image(encoded)
        img = random_interp_resize(img, size, interp, s[1])
        if hflip > 0:
            img = tf.cond(_uniform(s[2]) < hflip, lambda: tf.image.flip_left_right(img),
                          lambda: img)
        if on_device:
            img.set_shape([size, size, 3])
            return img
        if ra is not None:
            img = randaugment(img, s[3], ra, fill)
        x = preprocess.normalize(img, mean, std)
        if erase_p > 0:
            x = random_erasing(x, s[4], probability=erase_p, mode=erase_mode,
                               max_count=erase_count)
        x.set_shape([size, size, 3])
        return x

    return fn
