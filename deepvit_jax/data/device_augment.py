"""RandAugment, normalisation and random erasing on the accelerator, in JAX.

With ``data.device_augment = True`` the host pipeline stops after random-resized crop, resize
and flip and yields uint8 ``(B, S, S, 3)`` batches (``augment.make_train_augment``); the
jitted train step calls ``make_device_augment(...)(key, images)`` before mixup / cutmix.

Semantics are the host version's (``augment.py``: timm's ``rand-m9-mstd0.5-inc1`` and
``RandomErasing``): the same op table order, the same magnitude formulas (``augment.LEVEL_TO_ARG``
is shared), op drawn uniformly per layer, applied with probability ``prob``, magnitude
N(m, mstd) clipped, sign coin, then ``(x / 255 - mean) / std`` and erasing with probability
``random_erasing``.  Only the random numbers differ (``jax.random`` instead of TF's stateless
ops); tests compare each op with the host op on the same image and magnitude, and the
distribution of ops / magnitudes / erasing with the host's.

Randomness: example ``i`` of the global batch uses ``fold_in(key, i)``, so the result depends
only on the step key and the example's position, not on how the batch is sharded.

How it vectorises (``vmap`` over examples, no data-dependent control flow): every point op
(autocontrast, equalize, invert, posterize, solarize, solarize-add, contrast, brightness) is a
256-entry lookup table per channel, so one gather applies whichever was drawn; the five
geometric ops are one affine warp with a per-example matrix; colour and sharpness are computed
and selected.  Each RandAugment layer therefore costs about four image passes for every
example, whatever op it drew.

Hand-written because no maintained JAX library implements timm's RandAugment (PIL semantics)
or RandomErasing; ``dm_pix`` has other op definitions and no RandAugment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from deepvit_jax.data import augment as host

LEVEL_DENOM = host.LEVEL_DENOM

# ----------------------------------------------------------------------------------------
# point ops as lookup tables: name -> f(image uint8 (H, W, 3), arg) -> int32 LUT (3, 256)
# ----------------------------------------------------------------------------------------

def _v():
    """0..255 (int32). A function, not a module constant: a jnp array made at import would
    start JAX's backend, which must wait for ``jax.distributed.initialize``."""
    return jnp.arange(256, dtype=jnp.int32)


def _lut_identity(img, arg):
    return jnp.broadcast_to(_v(), (3, 256))


def _grey(img):
    """PIL's RGB -> L (int32), as ``augment.grayscale_l``."""
    x = img.astype(jnp.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def _blend_f(degenerate, x, factor):
    """PIL blend on float32 values: floor(d + f (x - d)) clipped (``augment._blend``)."""
    return jnp.clip(jnp.floor(degenerate + factor * (x - degenerate)), 0.0, 255.0)


def _lut_autocontrast(img, arg):
    x = img.astype(jnp.float32)
    lo = jnp.min(x, axis=(0, 1))[:, None]
    hi = jnp.max(x, axis=(0, 1))[:, None]
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    v = _v().astype(jnp.float32)[None, :]
    y = jnp.clip(jnp.floor(v * scale - lo * scale), 0.0, 255.0).astype(jnp.int32)
    return jnp.where(hi > lo, y, _v()[None, :])


def _lut_equalize(img, arg):
    def channel(c):
        hist = jnp.zeros(256, jnp.int32).at[c.reshape(-1).astype(jnp.int32)].add(1)
        last = hist[jnp.max(jnp.where(hist > 0, _v(), -1))]
        step = (jnp.sum(hist) - last) // 255
        lut = (step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1)
        return jnp.where(step > 0, jnp.clip(lut, 0, 255), _v())

    return jnp.stack([channel(img[..., i]) for i in range(3)])


def _lut_invert(img, arg):
    return jnp.broadcast_to(255 - _v(), (3, 256))


def _lut_posterize(img, arg):
    bits = arg.astype(jnp.int32)
    mask = ~((1 << (8 - jnp.minimum(bits, 8))) - 1)
    return jnp.broadcast_to(jnp.where(bits >= 8, _v(), _v() & mask), (3, 256))


def _lut_solarize(img, arg):
    return jnp.broadcast_to(jnp.where(_v() < arg.astype(jnp.int32), _v(), 255 - _v()), (3, 256))


def _lut_solarize_add(img, arg):
    out = jnp.where(_v() < 128, jnp.minimum(_v() + arg.astype(jnp.int32), 255), _v())
    return jnp.broadcast_to(out, (3, 256))


def _lut_contrast(img, arg):
    mean = jnp.floor(jnp.mean(_grey(img).astype(jnp.float32)) + 0.5)
    out = _blend_f(mean, _v().astype(jnp.float32), arg).astype(jnp.int32)
    return jnp.broadcast_to(out, (3, 256))


def _lut_brightness(img, arg):
    out = _blend_f(0.0, _v().astype(jnp.float32), arg).astype(jnp.int32)
    return jnp.broadcast_to(out, (3, 256))


# ----------------------------------------------------------------------------------------
# image ops that are not tables
# ----------------------------------------------------------------------------------------


def _color(img, arg):
    g = _grey(img).astype(jnp.float32)[..., None]
    return _blend_f(g, img.astype(jnp.float32), arg)


def _sharpness(img, arg):
    """ImageEnhance.Sharpness: blend with the 3x3 SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13,
    border pixels unchanged).  The 9 taps are summed as integers (exact), then /13 and
    rounded: n / 13 is never within float error of a .5 tie, so this equals the host's float
    convolution after rounding."""
    x = img.astype(jnp.int32)
    h, w = x.shape[0], x.shape[1]
    acc = 4 * x[1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            acc = acc + x[dy:dy + h - 2, dx:dx + w - 2]
    smooth = jnp.round(acc.astype(jnp.float32) / 13.0)
    xf = img.astype(jnp.float32)
    degenerate = xf.at[1:-1, 1:-1].set(smooth)
    return _blend_f(degenerate, xf, arg)


def _affine_matrix(name, arg, h: int, w: int):
    """PIL's inverse affine (a, b, c, d, e, f) of a geometric op (``augment.rotate`` etc.)."""
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    if name == "Rotate":
        ang = -arg * (math.pi / 180.0)
        a, b, d, e = jnp.cos(ang), jnp.sin(ang), -jnp.sin(ang), jnp.cos(ang)
        cx, cy = w / 2.0, h / 2.0
        return a, b, a * (-cx) + b * (-cy) + cx, d, e, d * (-cx) + e * (-cy) + cy
    if name == "ShearX":
        return one, arg, zero, zero, one, zero
    if name == "ShearY":
        return one, zero, zero, arg, one, zero
    if name == "TranslateXRel":
        return one, zero, arg * w, zero, one, zero
    if name == "TranslateYRel":
        return one, zero, zero, zero, one, arg * h
    raise ValueError(f"{name!r} is not a geometric op")


def _warp(img, matrix, fill):
    """PIL ``Image.transform(AFFINE, BILINEAR, fillcolor=fill)`` as the host's ``pil_affine``
    (TF's ImageProjectiveTransformV3, bilinear, out-of-image neighbours read as 0, then the fill
    colour weighted by the out-of-image share), on float32; returns float32 before rounding."""
    a, b, c, d, e, f = matrix
    h, w = img.shape[0], img.shape[1]
    c2 = c + 0.5 * (a + b) - 0.5
    f2 = f + 0.5 * (d + e) - 0.5
    ys = jnp.arange(h, dtype=jnp.float32)[:, None]
    xs = jnp.arange(w, dtype=jnp.float32)[None, :]
    xin = a * xs + b * ys + c2
    yin = d * xs + e * ys + f2
    x0, y0 = jnp.floor(xin), jnp.floor(yin)
    x1, y1 = x0 + 1.0, y0 + 1.0
    src = jnp.concatenate([img.astype(jnp.float32), jnp.ones((h, w, 1), jnp.float32)], -1)

    def read(yy, xx):
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        yi = jnp.clip(yy, 0, h - 1).astype(jnp.int32)
        xi = jnp.clip(xx, 0, w - 1).astype(jnp.int32)
        return jnp.where(ok[..., None], src[yi, xi], 0.0)

    top = (x1 - xin)[..., None] * read(y0, x0) + (xin - x0)[..., None] * read(y0, x1)
    bot = (x1 - xin)[..., None] * read(y1, x0) + (xin - x0)[..., None] * read(y1, x1)
    out = (y1 - yin)[..., None] * top + (yin - y0)[..., None] * bot
    return out[..., :3] + (1.0 - out[..., 3:]) * fill


def _apply_lut(img, lut):
    """out[..., c] = lut[c, img[..., c]]."""
    flat = img.reshape(-1, 3).astype(jnp.int32)
    return jnp.take_along_axis(lut.T, flat, axis=0).reshape(img.shape)


# name -> (kind, function): kind 'lut' (table of the image), 'color', 'sharpness', 'affine'
NAME_TO_OP: dict[str, tuple[str, Callable]] = {
    "AutoContrast": ("lut", _lut_autocontrast),
    "Equalize": ("lut", _lut_equalize),
    "Invert": ("lut", _lut_invert),
    "Rotate": ("affine", None),
    "Posterize": ("lut", _lut_posterize),
    "PosterizeIncreasing": ("lut", _lut_posterize),
    "Solarize": ("lut", _lut_solarize),
    "SolarizeIncreasing": ("lut", _lut_solarize),
    "SolarizeAdd": ("lut", _lut_solarize_add),
    "Color": ("color", _color),
    "ColorIncreasing": ("color", _color),
    "Contrast": ("lut", _lut_contrast),
    "ContrastIncreasing": ("lut", _lut_contrast),
    "Brightness": ("lut", _lut_brightness),
    "BrightnessIncreasing": ("lut", _lut_brightness),
    "Sharpness": ("sharpness", _sharpness),
    "SharpnessIncreasing": ("sharpness", _sharpness),
    "ShearX": ("affine", None),
    "ShearY": ("affine", None),
    "TranslateXRel": ("affine", None),
    "TranslateYRel": ("affine", None),
}


def level_to_arg(name: str, level, negate):
    """The host's ``augment.LEVEL_TO_ARG`` formulas evaluated with jax.numpy."""
    frac = jnp.asarray(level, jnp.float32) / LEVEL_DENOM
    return jnp.asarray(host.LEVEL_TO_ARG[name](frac, jnp.where(negate, -1.0, 1.0), jnp),
                       jnp.float32)


def apply_op(name: str, img, arg, fill):
    """One RandAugment op on one uint8 (H, W, 3) image -> uint8 (what ``augment.apply_op``
    computes on the host)."""
    kind, fn = NAME_TO_OP[name]
    fill = jnp.asarray(fill, jnp.float32)
    arg = jnp.asarray(arg, jnp.float32)
    if kind == "lut":
        return _apply_lut(img, fn(img, arg)).astype(jnp.uint8)
    if kind == "affine":
        out = _warp(img, _affine_matrix(name, arg, img.shape[0], img.shape[1]), fill)
        return jnp.clip(jnp.round(out), 0.0, 255.0).astype(jnp.uint8)
    return fn(img, arg).astype(jnp.uint8)


def _layer(img, op, apply, level, negate, names, fill):
    """One RandAugment layer on one image, with the drawn op index ``op`` (traced)."""
    h, w = img.shape[0], img.shape[1]
    args = jnp.stack([level_to_arg(n, level, negate) for n in names])
    arg = args[op]
    kinds = [NAME_TO_OP[n][0] for n in names]

    # point ops: one table, chosen among the drawn candidates
    lut_names = [n for n, k in zip(names, kinds, strict=True) if k == "lut"]
    out = img.astype(jnp.float32)
    if lut_names:
        luts = jnp.stack([NAME_TO_OP[n][1](img, args[names.index(n)]) for n in lut_names])
        lut_index = jnp.asarray([lut_names.index(n) if k == "lut" else 0
                                 for n, k in zip(names, kinds, strict=True)])[op]
        lut_out = _apply_lut(img, luts[lut_index]).astype(jnp.float32)
    # geometric ops: one warp with the drawn op's matrix
    geo_names = [n for n, k in zip(names, kinds, strict=True) if k == "affine"]
    if geo_names:
        mats = jnp.stack([jnp.stack([jnp.asarray(v, jnp.float32) for v in _affine_matrix(
            n, args[names.index(n)], h, w)]) for n in geo_names])
        geo_index = jnp.asarray([geo_names.index(n) if k == "affine" else 0
                                 for n, k in zip(names, kinds, strict=True)])[op]
        geo_out = jnp.clip(jnp.round(_warp(img, tuple(mats[geo_index]), fill)), 0.0, 255.0)
    kind_ids = {"lut": 0, "affine": 1, "color": 2, "sharpness": 3}
    kind = jnp.asarray([kind_ids[k] for k in kinds])[op]
    if lut_names:
        out = jnp.where(kind == 0, lut_out, out)
    if geo_names:
        out = jnp.where(kind == 1, geo_out, out)
    if "color" in kinds:
        out = jnp.where(kind == 2, _color(img, arg), out)
    if "sharpness" in kinds:
        out = jnp.where(kind == 3, _sharpness(img, arg), out)
    return jnp.where(apply, out, img.astype(jnp.float32)).astype(jnp.uint8)


# Randomness: each example draws one vector of uniforms (and one of normals for erasing
# noise) and every decision reads its own entries.  Fewer random-number calls than a key
# split per decision: each ``jax.random`` call is a separate Threefry computation, and a dozen
# of them per example multiplied the train step's XLA compile time.

_LAYER_UNIFORMS = 4      # op, apply, magnitude, sign


def _erasing_uniforms(max_count: int, attempts: int) -> int:
    return 2 + max_count * (2 * attempts + 2)    # do, count; per box: areas, ratios, top, left


def _magnitude(u, magnitude, magnitude_std, magnitude_max=None):
    """As ``augment.sample_magnitude`` from one uniform ``u``: N(m, mstd) through the normal
    quantile (U(0, m) for mstd = inf), clipped to [0, mmax or 10]."""
    upper = float(magnitude_max or LEVEL_DENOM)
    if magnitude_std == math.inf:
        m = u * magnitude
    elif magnitude_std > 0:
        m = magnitude + magnitude_std * jax.scipy.special.ndtri(u)
    else:
        m = jnp.float32(magnitude)
    return jnp.clip(m, 0.0, upper)


def _draw_layer(u, params: dict):
    n = len(params["transforms"])
    op = jnp.minimum(jnp.floor(u[0] * n).astype(jnp.int32), n - 1)
    apply = u[1] <= params["prob"]                       # timm skips when random() > prob
    level = _magnitude(u[2], params["magnitude"], params["magnitude_std"],
                       params["magnitude_max"])
    negate = u[3] > 0.5
    return op, apply, level, negate


def draw_layer(key, params: dict):
    """(op index, apply, level, negate) of one RandAugment layer, as the host draws them:
    op uniform over the transforms, applied with probability ``prob``, level N(m, mstd)
    clipped, sign coin 0.5."""
    return _draw_layer(jax.random.uniform(key, (_LAYER_UNIFORMS,)), params)


def _randaugment(u, img, params: dict, fill):
    names = list(params["transforms"])
    fill = jnp.asarray(fill, jnp.float32)

    def body(img, u_layer):      # a scan: the layer is compiled once, not num_layers times
        return _layer(img, *_draw_layer(u_layer, params), names, fill), None

    return jax.lax.scan(body, img, u)[0]


def randaugment(key, img, params: dict, fill):
    """timm ``RandAugment`` on one uint8 image (``num_layers`` layers)."""
    u = jax.random.uniform(key, (params["num_layers"], _LAYER_UNIFORMS))
    return _randaugment(u, img, params, fill)


def _random_erasing(u, noise, x, *, probability, mode, max_count, min_area=0.02,
                    max_area=1 / 3, min_aspect=0.3, attempts=10):
    height, width = x.shape[0], x.shape[1]
    area = float(height * width)
    do = u[0] < probability
    count = (jnp.minimum(jnp.floor(u[1] * max_count).astype(jnp.int32) + 1, max_count)
             if max_count > 1 else jnp.int32(1))
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    for j in range(max_count):
        uj = u[2 + j * (2 * attempts + 2):2 + (j + 1) * (2 * attempts + 2)]
        target = (min_area + (max_area - min_area) * uj[:attempts]) * area / count
        lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
        r = jnp.exp(lo + (hi - lo) * uj[attempts:2 * attempts])
        h = jnp.round(jnp.sqrt(target * r)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(target / r)).astype(jnp.int32)
        ok = (w < width) & (h < height)
        k = jnp.argmax(ok)
        hk, wk = h[k], w[k]
        top = jnp.minimum((uj[-2] * (height - hk + 1)).astype(jnp.int32), height - hk)
        left = jnp.minimum((uj[-1] * (width - wk + 1)).astype(jnp.int32), width - wk)
        inside = (rows >= top) & (rows < top + hk) & (cols >= left) & (cols < left + wk)
        if mode == "pixel":
            fill = noise[j]
        elif mode == "rand":
            fill = noise[j, :1, :1]
        else:
            fill = jnp.zeros((1, 1, 1), jnp.float32)
        active = do & jnp.any(ok) & (j < count)
        x = jnp.where(active & inside, fill, x)
    return x


def random_erasing(key, x, *, probability=0.25, mode="pixel", max_count=1, attempts=10):
    """timm ``RandomErasing`` on one normalised float32 (H, W, 3) image, as
    ``augment.random_erasing``: with probability ``probability`` erase 1..max_count boxes of
    area U(0.02, 1/3) / count and log-uniform aspect (0.3, 1/0.3), the first of ``attempts``
    with w < W and h < H; fill per-pixel N(0, 1) ('pixel'), per-channel ('rand') or 0."""
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"data.erasing_mode={mode!r} is not 'pixel', 'rand' or 'const'")
    k_u, k_n = jax.random.split(key)
    u = jax.random.uniform(k_u, (_erasing_uniforms(max_count, attempts),))
    noise = jax.random.normal(k_n, (max_count, *x.shape), jnp.float32)
    return _random_erasing(u, noise, x, probability=probability, mode=mode,
                           max_count=max_count, attempts=attempts)


def normalize(img, mean: Sequence[float], std: Sequence[float]):
    """uint8 -> float32 (x / 255 - mean) / std (``preprocess.normalize``)."""
    x = img.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def make_device_augment(data_cfg, *, image_size: int, mean: Sequence[float],
                        std: Sequence[float]) -> Callable | None:
    """-> ``fn(key, images uint8 (B, S, S, 3)) -> float32 (B, S, S, 3)`` (RandAugment,
    normalisation, random erasing), or None when ``data_cfg.device_augment`` is False.

    Call it inside the jitted train step, before mixup / cutmix, on the global batch."""
    if not data_cfg.get("device_augment", False):
        return None
    size = int(image_size)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean/std must have 3 values, got mean={mean}, std={std}")
    ra = host.parse_randaugment(data_cfg.randaugment) if data_cfg.randaugment else None
    fill = tuple(min(255, round(255 * m)) for m in mean)     # timm: img_mean fill colour
    erase_p = float(data_cfg.random_erasing)
    erase_kw = dict(probability=erase_p, mode=str(data_cfg.erasing_mode),
                    max_count=int(data_cfg.erasing_count))
    if erase_kw["mode"] not in ("pixel", "rand", "const"):
        raise ValueError(f"data.erasing_mode={erase_kw['mode']!r} is not 'pixel', 'rand' or "
                         "'const'")

    n_ra = ra["num_layers"] * _LAYER_UNIFORMS if ra is not None else 0
    n_erase = _erasing_uniforms(erase_kw["max_count"], 10) if erase_p > 0 else 0
    noise_shape = (erase_kw["max_count"], size, size, 3)

    def one(key, img):
        k_u, k_n = jax.random.split(key)
        u = jax.random.uniform(k_u, (n_ra + n_erase,))
        if ra is not None:
            img = _randaugment(u[:n_ra].reshape(-1, _LAYER_UNIFORMS), img, ra, fill)
        x = normalize(img, mean, std)
        if erase_p > 0:
            noise = (jax.random.normal(k_n, noise_shape, jnp.float32)
                     if erase_kw["mode"] != "const" else None)
            x = _random_erasing(u[n_ra:], noise, x, **erase_kw)
        return x

    def fn(key, images):
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"device augmentation expects (B, {size}, {size}, 3) images "
                             f"(data.device_augment), got shape {images.shape}")
        if images.dtype != jnp.uint8:
            raise ValueError(f"device augmentation expects the host's uint8 images "
                             f"(data.device_augment=True), got {images.dtype}")
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
        return jax.vmap(one)(keys, images)

    return fn
