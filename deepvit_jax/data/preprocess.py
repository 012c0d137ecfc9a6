"""Image decoding and the official evaluation transform, in TensorFlow (runs inside tf.data).

`eval_preprocess` reproduces timm's evaluation transform used by the official DeepViT code
(torchvision on PIL images): ``Resize(int(image_size / crop_pct), bicubic)`` on the shorter
side, ``CenterCrop(image_size)``, ``ToTensor`` and ``Normalize(mean, std)``.

PIL resizes with an anti-aliased (support-scaled) kernel when downsampling and returns uint8;
``tf.image.resize(..., antialias=True)`` uses the same Keys cubic (a=-0.5) / triangle kernels
with the same support scaling, and we round + clip to uint8 afterwards as PIL does.  Tests
compare the result with PIL (tests/test_data_preprocess.py).

The anti-aliased bilinear / bicubic resize is computed here as two banded matrix products
(``_resize_axis``) with exactly the weights of TensorFlow's ``ScaleAndTranslate`` kernel (what
``tf.image.resize(antialias=True)`` runs): that kernel loops pixel by pixel in scalar code and
costs ~3.4 ms for a 500x375 -> 330x248 resize on one core, the matrix form ~1.8 ms.  Only the
order of the float sums differs, so results equal ``tf.image.resize`` after rounding to uint8
except for rare pixels (< 0.1 %) one grey level apart (tests/test_data_preprocess.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from deepvit_jax.errors import InputError

_METHODS = {
    "bicubic": tf.image.ResizeMethod.BICUBIC,
    "bilinear": tf.image.ResizeMethod.BILINEAR,
    "nearest": tf.image.ResizeMethod.NEAREST_NEIGHBOR,
    "lanczos": tf.image.ResizeMethod.LANCZOS3,
    "area": tf.image.ResizeMethod.AREA,
}


def _method(interpolation: str):
    try:
        return _METHODS[interpolation]
    except KeyError:
        raise ValueError(
            f"interpolation={interpolation!r} is not one of {sorted(_METHODS)}") from None


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """(H, W, C) with C in {1, 2, 3, 4} -> (H, W, 3): grey is repeated, alpha dropped."""
    if image.shape.rank == 3 and image.shape[-1] == 3:
        return image        # known RGB (decode_image): no cond, no copy (~0.2 ms per image)
    c = tf.shape(image)[-1]
    grey = tf.image.grayscale_to_rgb(image[..., :1])
    return tf.cond(c < 3, lambda: grey, lambda: image[..., :3])


# The pixel limit of image files given by a user (predict, prepare of a folder): PIL's
# decompression-bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS``, ~9459 x 9459). A 388 KB PNG
# can declare 20000 x 20000 pixels; decoded and resized in float32 that reached 13.8 GB.
# The header is read first (nothing decoded) and a larger image refused; ``--max-pixels``
# raises the limit (0: none). benchmarks/pixel_limit.py measures peak memory against size.
DEFAULT_MAX_PIXELS = 89_478_485


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header (PIL; nothing is decoded), or None when
    PIL does not recognise the format (the decoder then decides)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own DecompressionBombWarning: ours is below
        try:
            with Image.open(io.BytesIO(data)) as im:
                return tuple(im.size)
        except Image.DecompressionBombError:  # above 2x PIL's limit: opened without it
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                with Image.open(io.BytesIO(data)) as im:
                    return tuple(im.size)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                return None
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None


def check_image_pixels(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       flag: str = "--max-pixels") -> None:
    """Refuse (InputError) an image file whose header declares more than ``max_pixels``
    pixels, before anything is decoded. ``max_pixels`` 0 / None: no limit."""
    if not max_pixels:
        return
    size = image_dimensions(data)
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise InputError(f"{name}: {w}x{h} = {w * h:,} pixels is above the limit of "
                         f"{max_pixels:,} (a decompression bomb?); if you trust the file, "
                         f"pass {flag} {w * h} (0 = no limit)")


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, 3); also CMYK JPEGs, PNGs named .JPEG."""
    img = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    img.set_shape([None, None, 3])
    return img


def _keys_cubic(x):
    """TF's ``KeysCubicKernel`` (a = -0.5), the kernel of PIL's BICUBIC."""
    return tf.where(x >= 2.0, 0.0, tf.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0,
                                             (1.5 * x - 2.5) * x * x + 1.0))


def _triangle(x):
    return tf.maximum(0.0, 1.0 - x)


# interpolation -> (kernel, radius) of the anti-aliased resize (tf.image.resize's choices)
_KERNELS = {"bicubic": (_keys_cubic, 2.0), "bilinear": (_triangle, 1.0)}
# Output rows per matrix block. 8 measured fastest for the eval transform (blocks of 16:
# +4 % time, 4: +10 %, 32: +22 %): larger blocks multiply more zero weights.
_BLOCK = 8


def _resize_axis(x, out_size, kernel, radius: float, first=0, count=None):
    """Resample axis 0 of float ``x`` (n, ...) to ``out_size`` with ScaleAndTranslate's weights
    (``tensorflow/core/kernels/image/scale_and_translate_op.cc``: sample at (j + 0.5) / scale,
    kernel scaled by max(1 / scale, 1), weights normalised to sum 1).  Output rows are taken
    in blocks of ``_BLOCK``; each block is one (B x L) @ (L x rest) product over the L input
    rows it reaches.  ``first`` / ``count``: compute only output rows [first, first + count)
    of the ``out_size`` ones (a crop of the resized image, at the cost of the crop)."""
    n = tf.shape(x)[0]
    full = tf.convert_to_tensor(out_size, tf.int32)
    m = full if count is None else tf.convert_to_tensor(count, tf.int32)
    scale = tf.cast(full, tf.float32) / tf.cast(n, tf.float32)
    inv = 1.0 / scale
    ks = tf.maximum(inv, 1.0)
    nb = (m + _BLOCK - 1) // _BLOCK
    length = tf.minimum(
        tf.cast(tf.math.ceil((_BLOCK - 1) * inv + 2.0 * radius * ks), tf.int32) + 2, n)
    j = tf.range(nb * _BLOCK) + tf.convert_to_tensor(first, tf.int32)
    sample = (tf.cast(j, tf.float32) + 0.5) * inv
    start = tf.cast(tf.math.ceil(sample[::_BLOCK] - radius * ks - 0.5), tf.int32)
    start = tf.clip_by_value(start, 0, n - length)                               # (nb,)
    pos = start[:, None] + tf.range(length)[None, :]                             # (nb, L)
    dist = tf.cast(pos, tf.float32)[:, None, :] + 0.5 - tf.reshape(sample, [nb, _BLOCK, 1])
    w = kernel(tf.abs(dist * (1.0 / ks)))                                        # (nb, B, L)
    w = w * (1.0 / tf.reduce_sum(w, -1, keepdims=True))
    rest = tf.shape(x)[1:]
    rows = tf.reshape(tf.gather(x, pos), [nb, length, -1])
    out = tf.reshape(tf.matmul(w, rows), tf.concat([[nb * _BLOCK], rest], 0))
    return out[:m]


def resize_uint8(image: tf.Tensor, size: Sequence, interpolation: str = "bicubic",
                 window=None) -> tf.Tensor:
    """PIL-like resize of an image to ``size`` = (h, w); returns uint8 (rounded, clipped).
    Bilinear / bicubic are anti-aliased (support scaled when downsampling) as PIL's.
    ``window`` = (top, left, height, width): return only that crop of the resized image
    (computed directly, same pixels as resizing then cropping)."""
    method = _method(interpolation)
    if interpolation in _KERNELS:
        kernel, radius = _KERNELS[interpolation]
        top, left, h, w = window if window is not None else (0, 0, None, None)
        x = tf.cast(image, tf.float32)
        x = _resize_axis(x, size[0], kernel, radius, top, h)                     # (h, W, 3)
        x = _resize_axis(tf.transpose(x, [1, 0, 2]), size[1], kernel, radius, left, w)
        out = tf.transpose(x, [1, 0, 2])                                         # (h, w, 3)
    else:
        out = tf.image.resize(tf.cast(image, tf.float32), size, method=method,
                              antialias=interpolation == "lanczos")
        if window is not None:
            out = tf.image.crop_to_bounding_box(out, *window)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def shorter_side_size(image: tf.Tensor, size: int):
    """torchvision ``Resize(size)``'s output (h, w): shorter side -> size, longer ->
    int(size * long / short)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    long = tf.maximum(h, w)
    new_long = tf.cast(tf.math.floor(tf.cast(size, tf.float64) * tf.cast(long, tf.float64)
                                     / tf.cast(short, tf.float64)), tf.int32)
    new_h = tf.where(h <= w, size, new_long)
    new_w = tf.where(h <= w, new_long, size)
    return new_h, new_w


def resize_shorter_side(image: tf.Tensor, size: int, interpolation: str = "bicubic") -> tf.Tensor:
    """torchvision ``Resize(size)``: shorter side -> size, longer -> int(size * long / short)."""
    return resize_uint8(image, tf.stack(shorter_side_size(image, size)), interpolation)


def _center_offsets(h, w, size: int):
    """torchvision ``CenterCrop`` offsets: int(round((H - size) / 2)) (round half to even, as
    Python's round; tf.round rounds half to even too)."""
    top = tf.cast(tf.round(tf.cast(h - size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(w - size, tf.float64) / 2.0), tf.int32)
    return top, left


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision ``CenterCrop``: offsets int(round((H - size) / 2)) (round half to even, as
    Python's round; tf.round rounds half to even too)."""
    shape = tf.shape(image)
    top, left = _center_offsets(shape[0], shape[1], size)
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """uint8 (..., W, 3) -> float32 (x / 255 - mean) / std.

    Computed on rows of W * 3 values with the per-channel constants tiled W times: Eigen
    broadcasts a (3,) vector along the innermost axis element by element (~0.8 ms for a
    224 x 224 image on one core), a row-length vector at full speed (~0.25 ms); the values
    are the same."""
    x = tf.cast(image, tf.float32) / 255.0
    shape = tf.shape(x)
    rows = tf.reshape(x, [-1, shape[-2] * 3])
    m = tf.tile(tf.constant(mean, tf.float32), shape[-2:-1])
    s = tf.tile(tf.constant(std, tf.float32), shape[-2:-1])
    out = tf.reshape((rows - m) / s, shape)
    out.set_shape(image.shape)
    return out


def eval_resize_crop(image: tf.Tensor, *, image_size: int, crop_pct: float,
                     interpolation: str = "bicubic") -> tf.Tensor:
    """The uint8 part of the eval transform: shorter side -> int(size / crop_pct), centre crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    scale_size = int(image_size / crop_pct)
    image = to_rgb(tf.convert_to_tensor(image))
    new_h, new_w = shorter_side_size(image, scale_size)
    if interpolation in _KERNELS:      # resize only the centre crop's pixels (same values)
        top, left = _center_offsets(new_h, new_w, image_size)
        image = resize_uint8(image, (new_h, new_w), interpolation,
                             window=(top, left, image_size, image_size))
    else:
        image = center_crop(resize_uint8(image, tf.stack([new_h, new_w]), interpolation),
                            image_size)
    image.set_shape([image_size, image_size, 3])
    return image


def eval_preprocess(image, *, image_size: int, crop_pct: float, mean: Sequence[float],
                    std: Sequence[float], interpolation: str = "bicubic") -> tf.Tensor:
    """Official evaluation transform of one uint8 (H, W, C) image -> float32 (S, S, 3)."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"eval_preprocess expects a uint8 (H, W, C) image, got {image.dtype}")
    if image.shape.rank is not None and image.shape.rank != 3:
        raise ValueError(f"eval_preprocess expects an (H, W, C) image, got shape {image.shape}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean/std must have 3 values, got mean={mean}, std={std}")
    image = eval_resize_crop(image, image_size=image_size, crop_pct=crop_pct,
                             interpolation=interpolation)
    return normalize(image, mean, std)
