"""ImageNet-1k (ILSVRC2012) prepared by TFDS's own ``imagenet2012`` builder, with every image
checked once.

TFDS stores each JPEG as it is in the tar (after its fixed list of CMYK and PNG repairs), so
a file that does not decode reaches training, where a dropped example would shift every
later batch.  ``ValidatedImagenet2012`` is that builder (same name, version, features and
output folder, so ``tfds.builder('imagenet2012')`` reads what it writes) with one change: each
image is decoded by TensorFlow's own decoder - the one the input pipeline uses - before it is
written, and the images that fail are skipped, logged and counted (``skipped[split]``).
JPEGs are decoded at 1/8 scale (``ratio=8``: all the entropy-coded data is still read, only
the inverse DCT is smaller), which keeps the check to a small part of the preparation.
"""

from __future__ import annotations

import collections
import logging

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)


def decodes(data: bytes) -> bool:
    """Whether TensorFlow decodes ``data`` (as the input pipeline would) without an error."""
    import tensorflow as tf

    try:
        if tf.io.is_jpeg(data):
            tf.io.decode_jpeg(data, channels=3, ratio=8)
        else:
            tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return False
    return True


class ValidatedImagenet2012(tfds.builder_cls("imagenet2012"), skip_registration=True):
    """TFDS's imagenet2012 builder that skips and counts undecodable images."""

    name = "imagenet2012"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: dict[str, int] = collections.Counter()

    def _generate_examples(self, archive, validation_labels=None, labels_exist=True):
        split = ("test" if not labels_exist else "validation" if validation_labels else "train")
        for key, example in super()._generate_examples(archive, validation_labels,
                                                       labels_exist):
            image = example["image"]
            data = image.read() if hasattr(image, "read") else image
            if not decodes(data):
                self.skipped[split] += 1
                log.warning("imagenet2012 %s: skipping %s, it does not decode", split, key)
                continue
            yield key, {**example, "image": data}
