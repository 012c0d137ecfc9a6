"""A local folder of images as a prepared TFDS dataset.

Layout (the same as ``tfds.folder_dataset.ImageFolder``)::

    ROOT/<split>/<class name>/<any name>.<jpg|jpeg|png|bmp|gif|webp|...>

``prepare`` (``python -m deepvit_jax.data prepare folder --folder ROOT``) reads every image once
with PIL: JPEG/PNG files that are RGB are stored as they are; anything else (CMYK or grey
JPEGs, a PNG saved as .JPEG, BMP, WebP, ...) is re-encoded as an RGB JPEG (quality 95); files
PIL cannot decode are skipped and counted (listed in the log).  Unlike ImageFolder, which
decodes files lazily at training time, a corrupt file then never reaches a training run.
The prepared copy lives under ``DATA_DIR/image_folder/<name>/1.0.0`` and is read with
``tfds.builder_from_directory``.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VERSION = "1.0.0"


def folder_name(root) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", Path(root).resolve().name.lower()).strip("_")
    return name or "folder"


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


def read_image_bytes(path) -> bytes | None:
    """File bytes ready for TF decoding (RGB JPEG or PNG), or None if PIL cannot decode it."""
    from PIL import Image, UnidentifiedImageError

    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            im.load()                     # full decode: catches truncated files
            if fmt in ("JPEG", "PNG") and mode in ("RGB", "L"):  # TF decodes these as they are
                return data
            rgb = im.convert("RGB")       # CMYK, palette, RGBA, BMP, WebP, ...
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        log.warning("skipping %s: not a decodable image (%s)", path, e)
        return None
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    return buf.getvalue()


class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder):
    """Builder for one local folder (see the module docstring)."""

    VERSION = tfds.core.Version(VERSION)
    name = "image_folder"

    def __init__(self, *, root, **kwargs):
        self._root = Path(root)
        self._splits, self._classes = scan_folder(root)
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
            data = read_image_bytes(path)
            if data is None:
                skipped += 1
                continue
            rel = os.path.relpath(path, self._root)
            yield rel, {"image": data, "label": cls, "file_name": rel}
        self.skipped[split] = skipped
        if skipped:
            log.warning("split %r: skipped %d undecodable image(s) of %d", split, skipped,
                        len(items))


def prepare_folder(root, data_dir) -> tuple[Path, dict[str, int]]:
    builder = ImageFolderBuilder(root=root, data_dir=str(data_dir))
    builder.download_and_prepare()
    return Path(builder.data_dir), builder.skipped


def folder_builder(root, data_dir):
    """The prepared builder for ``root`` (raises with the prepare command if missing)."""
    if not root:
        raise ValueError("data.dataset='folder' needs data.folder_path (ROOT/<split>/<class>/*)")
    path = prepared_dir(root, data_dir)
    if not (path / "dataset_info.json").exists():
        from deepvit_jax.data.pipeline import DatasetNotPreparedError

        raise DatasetNotPreparedError(
            f"the image folder {str(root)!r} is not prepared under {str(data_dir)!r}. Run:\n"
            f"  python -m deepvit_jax.data prepare folder --folder {root} --data-dir {data_dir}")
    return tfds.builder_from_directory(str(path))
