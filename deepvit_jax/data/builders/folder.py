"""A local folder of images as a prepared TFDS dataset.

Layout (the same as ``tfds.folder_dataset.ImageFolder``)::

    ROOT/<split>/<class name>/<any name>.<jpg|jpeg|png|bmp|gif|webp|...>

``prepare`` (``python -m deepvit_jax.data prepare folder --folder ROOT``) reads every image once
with PIL: JPEG/PNG files that are RGB are stored as they are; anything else (CMYK or grey
JPEGs, a PNG saved as .JPEG, BMP, WebP, ...) is re-encoded as an RGB JPEG (quality 95); files
PIL cannot decode, and files of more pixels than ``--max-pixels`` (PIL's decompression-bomb
limit by default; read from the header, nothing decoded), are skipped and counted (listed in
the log). A folder with only a ``train`` split gets a ``validation`` split with
``--val-fraction F`` (:func:`hold_out`: F of each class, chosen by a hash of each path).
Unlike ImageFolder, which decodes files lazily at training time, a corrupt file then never
reaches a training run.
The prepared copy lives under ``DATA_DIR/image_folder/<name>_<hash>/1.0.0`` (``hash``: of
the folder's absolute path, so ``~/a/pets`` and ``~/b/pets`` never share one) and is read
with ``tfds.builder_from_directory``. ``source.json`` beside it records the folder's
fingerprint (every image's path, size and modification time): a changed folder is prepared
again by ``prepare`` and refused by training until it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path

import tensorflow_datasets as tfds

from deepvit_jax.data.preprocess import DEFAULT_MAX_PIXELS, check_image_pixels
from deepvit_jax.errors import DatasetNotPreparedError, EmptySplitError, InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VERSION = "1.0.0"


SOURCE_FILE = "source.json"


def folder_name(root) -> str:
    """``<base name>_<8 hex digits of the absolute path>``: one prepared copy per folder."""
    path = Path(root).expanduser().resolve()
    name = re.sub(r"[^a-z0-9_]+", "_", path.name.lower()).strip("_") or "folder"
    return f"{name}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def fingerprint(root) -> str:
    """A hash of every image file's relative path, size and modification time."""
    root = Path(root).expanduser().resolve()
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            st = f.stat()
            h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _recorded(path: Path, key: str = "fingerprint"):
    try:
        return json.loads((path / SOURCE_FILE).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


EVAL_SPLITS = ("validation", "test", "val")  # what training takes as the evaluation split
NO_EVAL_HINT = ("prepare it again with --val-fraction 0.1 (holds out a tenth of each class of "
                "'train', deterministically), add ROOT/validation/<class>/ images, or set "
                "data.eval_split")


def hold_out(items: list[tuple[Path, str]], root: Path, fraction: float
             ) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(train, validation): ``fraction`` of each class's images (at least one of a class
    with two or more) held out, chosen by a hash of each file's path relative to ``root``:
    the same files whatever the order they are listed in, and a file added later does not
    move the others."""
    by_class: dict[str, list[tuple[Path, str]]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    train, val = [], []
    for cls in sorted(by_class):
        ranked = sorted(by_class[cls], key=lambda it: hashlib.sha256(
            str(it[0].relative_to(root)).encode()).hexdigest())
        n = len(ranked)
        k = max(1, round(fraction * n)) if n >= 2 else 0
        val += ranked[:k]
        train += ranked[k:]
    return sorted(train), sorted(val)


def prepared_dir(root, data_dir) -> Path:
    return Path(data_dir) / "image_folder" / folder_name(root) / VERSION


def scan_folder(root) -> tuple[dict[str, list[tuple[Path, str]]], list[str]]:
    """{split: [(path, class)]}, sorted class names; clear errors for a wrong layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    splits, classes = {}, set()
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        items = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((f, class_dir.name))
                    classes.add(class_dir.name)
        if items:
            splits[split_dir.name] = items
    if not splits:
        raise ValueError(
            f"no images found under {str(root)!r}: expected ROOT/<split>/<class>/<image file> "
            f"(e.g. {root}/train/cat/001.jpg, {root}/validation/cat/101.jpg); image extensions: "
            f"{sorted(IMAGE_EXTENSIONS)}")
    return splits, sorted(classes)


def read_image_bytes(path, max_pixels: int | None = None) -> bytes | None:
    """File bytes ready for TF decoding (RGB JPEG or PNG), or None if PIL cannot decode it
    or its header declares more than ``max_pixels`` pixels (default: PIL's
    decompression-bomb limit, ``preprocess.DEFAULT_MAX_PIXELS``; 0: no limit)."""
    from PIL import Image, UnidentifiedImageError

    data = Path(path).read_bytes()
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    try:
        check_image_pixels(data, str(path), limit)
    except InputError as e:
        log.warning("skipping %s", e)
        return None
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # checked above against our own (settable) limit
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            im.load()                     # full decode: catches truncated files
            if fmt in ("JPEG", "PNG") and mode in ("RGB", "L"):  # TF decodes these as they are
                return data
            rgb = im.convert("RGB")       # CMYK, palette, RGBA, BMP, WebP, ...
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        log.warning("skipping %s: not a decodable image (%s)", path, e)
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    return buf.getvalue()


class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder):
    """Builder for one local folder (see the module docstring)."""

    VERSION = tfds.core.Version(VERSION)
    name = "image_folder"

    def __init__(self, *, root, val_fraction: float = 0.0, max_pixels: int | None = None,
                 **kwargs):
        self._root = Path(root)
        self._max_pixels = max_pixels
        self._splits, self._classes = scan_folder(root)
        if val_fraction:
            present = [s for s in EVAL_SPLITS if s in self._splits]
            if present:
                raise ValueError(f"--val-fraction: image folder {str(root)!r} already has the "
                                 f"evaluation split {present[0]!r}; leave --val-fraction out")
            if "train" not in self._splits:
                raise ValueError(f"--val-fraction: image folder {str(root)!r} has no 'train' "
                                 f"split to hold images out of (splits: "
                                 f"{sorted(self._splits)})")
            self._splits["train"], self._splits["validation"] = hold_out(
                self._splits["train"], self._root, val_fraction)
        self.skipped: dict[str, int] = {}
        config = tfds.core.BuilderConfig(name=folder_name(root), version=VERSION,
                                         description=f"images from {root}")
        super().__init__(config=config, **kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=self._classes),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, items)
                for split, items in self._splits.items()}

    def _generate_examples(self, split, items):
        skipped = 0
        for path, cls in items:
            data = read_image_bytes(path, self._max_pixels)
            if data is None:
                skipped += 1
                continue
            rel = os.path.relpath(path, self._root)
            yield rel, {"image": data, "label": cls, "file_name": rel}
        self.skipped[split] = skipped
        if skipped == len(items):  # instead of TFDS's bare "No examples were yielded"
            raise EmptySplitError(
                f"image folder {str(self._root)!r}: none of the {len(items)} image file(s) of "
                f"split {split!r} can be decoded (e.g. {items[0][0]}); fix or remove them "
                "(see the warnings above)")
        if skipped:
            log.warning("split %r: skipped %d undecodable image(s) of %d", split, skipped,
                        len(items))


def _cause(exc: BaseException | None, kind: type) -> BaseException | None:
    """``exc`` or the exception it was raised from / during (TFDS re-raises with context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def prepare_folder(root, data_dir, *, val_fraction: float = 0.0,
                   max_pixels: int | None = None) -> tuple[Path, dict[str, int]]:
    """Prepare ``root`` (again when its files, or ``val_fraction``, changed since the last
    prepare). ``val_fraction`` > 0 holds out that fraction of each class of ``train`` as a
    ``validation`` split (:func:`hold_out`), for a folder without an evaluation split."""
    import shutil

    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1) (e.g. 0.1)")
    path = prepared_dir(root, data_dir)
    now = fingerprint(root)
    if path.exists() and (_recorded(path) != now
                          or (_recorded(path, "val_fraction") or 0.0) != val_fraction):
        log.info("%s (or --val-fraction) changed since it was prepared: preparing it again",
                 root)
        shutil.rmtree(path)
    builder = ImageFolderBuilder(root=root, data_dir=str(data_dir), val_fraction=val_fraction,
                                 max_pixels=max_pixels)
    parent = Path(data_dir) / "image_folder"
    before = set(parent.iterdir()) if parent.is_dir() else set()
    try:
        builder.download_and_prepare()
    except Exception as e:
        empty = _cause(e, EmptySplitError)
        if empty is None:
            raise
        for leftover in (set(parent.iterdir()) - before) if parent.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)  # this attempt's incomplete output
        raise ValueError(str(empty)) from None
    path = Path(builder.data_dir)
    (path / SOURCE_FILE).write_text(json.dumps(
        {"root": str(Path(root).expanduser().resolve()), "fingerprint": now,
         "val_fraction": val_fraction}))
    if not any(s in builder.info.splits for s in EVAL_SPLITS):
        log.warning("image folder %s has no evaluation split (%s): training needs one; %s",
                    root, ", ".join(EVAL_SPLITS), NO_EVAL_HINT)
    return path, builder.skipped


def folder_builder(root, data_dir):
    """The prepared builder for ``root`` (raises with the prepare command if missing)."""
    if not root:
        raise ValueError("data.dataset='folder' needs data.folder_path (ROOT/<split>/<class>/*)")
    path = prepared_dir(root, data_dir)
    run = f"python -m deepvit_jax.data prepare folder --folder {root} --data-dir {data_dir}"
    if not (path / "dataset_info.json").exists():
        raise DatasetNotPreparedError(
            f"the image folder {str(root)!r} is not prepared under {str(data_dir)!r}. Run:\n"
            f"  {run}")
    if _recorded(path) != fingerprint(root):
        raise DatasetNotPreparedError(
            f"the image folder {str(root)!r} changed since it was prepared into {path} "
            f"(files added, removed or modified). Prepare it again:\n  {run}")
    return tfds.builder_from_directory(str(path))
