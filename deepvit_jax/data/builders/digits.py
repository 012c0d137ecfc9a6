"""scikit-learn's handwritten digits as a TFDS dataset: the embedded default data set.

1797 real 8x8 grey images (values 0..16) of the digits 0-9 ship inside scikit-learn, so the
default run needs no download.  Each image is scaled to 0..255, upscaled to 32x32 with PIL
bicubic (so small patch sizes and the usual pipeline work) and stored as an RGB PNG.
Fixed split: a stratified 80/20 split with seed 0 (1437 train / 360 test images).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_TRAIN = 1437
NUM_TEST = 360


def _split_indices():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    idx = np.arange(len(data.target))
    train, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=data.target)
    return data, np.sort(train), np.sort(test)


def digits_image(pixels_8x8: np.ndarray) -> np.ndarray:
    """One sklearn digit (8x8 float 0..16) -> uint8 (32, 32, 3)."""
    from PIL import Image

    grey = np.clip(np.round(pixels_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return np.repeat(np.asarray(big)[:, :, None], 3, axis=2)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits, 32x32 RGB, fixed stratified train/test split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "32x32 RGB PNG, stratified 80/20 split with seed 0."}  # noqa: RUF012

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
                "sklearn_index": np.int32,
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        data, train, test = _split_indices()
        return {"train": self._generate_examples(data, train),
                "test": self._generate_examples(data, test)}

    def _generate_examples(self, data, indices):
        for i in indices:
            yield int(i), {"image": digits_image(data.images[i]),
                           "label": int(data.target[i]), "sklearn_index": int(i)}
