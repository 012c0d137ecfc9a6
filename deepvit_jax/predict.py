"""Classify images with a saved model: top-5 ImageNet classes, or raw logits to a .npy file.

  python -m deepvit_jax.predict --checkpoint ckpt/deepvit_s cat.jpg dog.png
  python -m deepvit_jax.predict --checkpoint ckpt/deepvit_s batch.npy --output logits.npy

Image files get the official evaluation transform of the model's config
(``deepvit_jax.data.preprocess.eval_preprocess``: bicubic resize of the shorter side to
int(image_size / crop_pct), centre crop, normalise with the config's mean / std; 248 -> 224
with mean = std = 0.5 for the 224-px models, crop 1.0 at 384 px). A ``.npy`` input is a batch
of already preprocessed float NHWC images of the model's size.

An image file of more than ``--max-pixels`` pixels (default 89,478,485, PIL's
decompression-bomb limit) is refused from its header, before it is decoded. ``--output`` is
claimed first (a second command writing it exits 3) and written under a temporary name
renamed at the end.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Sequence
from importlib import resources

import jax
import numpy as np
import tensorflow as tf
from flax import nnx
from tqdm import tqdm

from deepvit_jax import cli
from deepvit_jax.data.dataset import ImageSpec
from deepvit_jax.data.preprocess import DEFAULT_MAX_PIXELS, check_image_pixels, decode_image
from deepvit_jax.errors import one_line
from deepvit_jax.model_dir import load_model
from deepvit_jax.utils import as_path, atomic_output, claim_output

CLASSES_FILE = "imagenet_classes.txt"


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes in label order as (WordNet id, name) pairs."""
    text = resources.files("deepvit_jax").joinpath(CLASSES_FILE).read_text(encoding="utf-8")
    rows = [ln.split("\t") for ln in text.splitlines() if ln and not ln.startswith("#")]
    return tuple((wnid, lemmas.split(", ")[0]) for wnid, lemmas in rows)


def class_names(num_classes: int, names_file: str | None = None) -> list[str]:
    """Display names: from ``names_file`` (one per line), ImageNet's for 1000 classes,
    else 'class i'."""
    if names_file:
        with open(names_file, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{names_file}: {len(names)} names for a model with "
                             f"{num_classes} classes")
        return names
    if num_classes == 1000:
        return [f"{name} ({wnid})" for wnid, name in imagenet_classes()]
    return [f"class {i}" for i in range(num_classes)]


def load_inputs(paths: Sequence[str], cfg, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
                ) -> tuple[np.ndarray, list[str]]:
    """Image files (any format TensorFlow decodes) and/or .npy batches -> float32 NHWC batch
    of the model's size, with one label per row for printing. An image file whose header
    declares more than ``max_pixels`` pixels (default PIL's decompression-bomb limit; 0 /
    None: no limit) is refused before it is decoded."""
    spec = ImageSpec.of(cfg)
    want = (cfg.image_size, cfg.image_size, 3)
    batches, labels = [], []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        if path.endswith(".npy"):
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ValueError(f"{path}: not a readable .npy file ({e})") from e
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[1:] != want or not np.issubdtype(arr.dtype,
                                                                          np.floating):
                raise ValueError(
                    f"{path}: expected preprocessed float images of shape (N, {want[0]}, "
                    f"{want[1]}, 3) for model {cfg.name!r}, got {arr.dtype} {arr.shape}")
            bad = ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
            if bad.any():
                raise ValueError(
                    f"{path}: image {int(np.argmax(bad))} (of {len(arr)}) holds NaN or inf "
                    f"values ({int(bad.sum())} such image(s)); a model cannot classify them: "
                    "fix the array")
            batches.append(arr.astype(np.float32))
            labels += [f"{path}[{i}]" for i in range(arr.shape[0])]
            continue
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: not an image file (it is empty)")
        with open(path, "rb") as f:
            data = f.read()
        check_image_pixels(data, path, max_pixels)
        try:
            image = decode_image(tf.constant(data))
        except tf.errors.OpError as e:  # in our words: no TensorFlow graph / op names
            raise ValueError(f"{path}: not an image file that can be decoded (JPEG, PNG, GIF, "
                             f"BMP or WebP): {one_line(e.message)}") from None
        x = spec.eval_preprocess(image)
        batches.append(x.numpy()[None])
        labels.append(path)
    return np.concatenate(batches, axis=0), labels


def predict_logits(model, images: np.ndarray, *, batch_size: int = 32,
                   progress: bool = False) -> np.ndarray:
    """float32 logits (N, num_classes) of ``model`` (eval mode) for an NHWC batch."""
    model.check_input(images[:1])
    model.eval()
    # Split once and jit a pure function of the arrays: nnx.jit would walk the module graph
    # on every call (tens of ms per batch for a 16-block model).
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    starts = range(0, len(images), batch_size)
    out = []
    for s in tqdm(starts, desc="predict", unit="batch", disable=not progress or len(starts) < 2):
        chunk = images[s:s + batch_size]
        n = len(chunk)
        if n < batch_size and len(images) > batch_size:  # pad: one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]),
                                                    chunk.dtype)])
        out.append(np.asarray(fwd(state, chunk))[:n])
    return np.concatenate(out, axis=0)


def top_k(logits: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(indices, softmax probabilities), each (N, k), best first."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, axis=-1)


def _save_npy(path: str, array: np.ndarray) -> None:
    import io

    # Serialised in memory first (logits are small), then one Python write: a full disk is
    # OSError(ENOSPC), the one-line exit 4.
    buf = io.BytesIO()
    np.save(buf, array)
    try:
        with atomic_output(path) as tmp, as_path(tmp).open("wb") as f:
            f.write(buf.getvalue())
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, path) from e  # named in the one-line error


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("deepvit_jax.predict", "Top-k classes (with ImageNet names for 1000-class "
                   "models) for image files, or a .npy batch of preprocessed NHWC images, "
                   "using a model directory written by deepvit_jax (save_model / the convert "
                   "CLI / export).", __doc__)
    cli.add_checkpoint_flag(p, help="model directory (config.json + state/)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE",
                   help="image files (JPEG, PNG, GIF, BMP) and/or .npy batches")
    p.add_argument("--output", help="save the raw logits (N, num_classes) to this .npy file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file")
    p.add_argument("--top-k", type=cli.positive_int, default=5)
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--class-names", help="text file with one class name per line "
                                         "(default: ImageNet names for 1000 classes)")
    p.add_argument("--max-pixels", type=cli.non_negative_int, default=DEFAULT_MAX_PIXELS,
                   metavar="N", help="refuse image files of more than N pixels, read from "
                                     "their header before decoding (default %(default)s, "
                                     "PIL's decompression-bomb limit; 0: no limit)")
    args = p.parse_args(argv)
    cli.setup_console(args.verbose)

    def body():
        if args.output:
            cli.check_output(args.output, args.inputs, overwrite=args.overwrite,
                             suffix=".npy")
        with claim_output(args.output) if args.output else contextlib.nullcontext():
            if args.output:  # again under the claim: another command may have written it
                cli.check_output(args.output, args.inputs, overwrite=args.overwrite,
                                 suffix=".npy")
            model = load_model(args.checkpoint)
            cfg = model.config
            names = class_names(cfg.num_classes, args.class_names)
            images, labels = load_inputs(args.inputs, cfg, max_pixels=args.max_pixels)
            logits = predict_logits(model, images, batch_size=args.batch_size, progress=True)
            if args.output:
                _save_npy(args.output, logits)
        idx, prob = top_k(logits, min(args.top_k, cfg.num_classes))
        for label, ii, pp in zip(labels, idx, prob, strict=True):
            print(f"{label}:")
            for rank, (i, q) in enumerate(zip(ii, pp, strict=True), 1):
                print(f"  {rank}. {q:6.2%}  {names[i]}  [{i}]")
        if args.output:
            print(f"logits {logits.shape} saved to {args.output}")

    return cli.run_cli(body, input_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
