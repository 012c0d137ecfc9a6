"""The evaluation stream: one pass over the eval split per ``iter()``, as global batches.

Each process reads its part of the split once (``tfds.split_for_jax_process``), decodes it
with the official evaluation transform (``ImageSpec.eval_preprocess``) and pads with masked
(mask 0) zero images, so that every process yields the same number of batches and every
image counts exactly once.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from deepvit_jax.data import preprocess
from deepvit_jax.data.dataset import (DatasetInfo, ImageSpec, _check_image_size, _local_batch,
                                      _process, _read, _tf, _to_global, dataset_info,
                                      process_split)
from deepvit_jax.errors import InputError

log = logging.getLogger(__name__)


class EvalIterable:
    """One pass over the eval split per ``iter()``; batches carry ``mask`` (0 = padding)."""

    def __init__(self, data_cfg, dataset: DatasetInfo, *, global_batch_size: int,
                 spec: ImageSpec, sharding, process_index=None, process_count=None):
        _check_image_size(spec.size)
        self.cfg = data_cfg
        self.process_index, self.process_count = _process(process_index, process_count)
        self.global_batch_size = int(global_batch_size)
        self.local_batch = _local_batch(self.global_batch_size, self.process_count)
        self.builder = dataset.builder
        self.eval_split = dataset.eval_split
        self.num_examples = dataset.num_eval
        self.split = process_split(self.eval_split, self.process_index, self.process_count,
                                   drop_remainder=False)
        per_process = math.ceil(self.num_examples / self.process_count)   # even_splits' largest
        self.num_batches = max(1, math.ceil(per_process / self.local_batch))
        self.spec = spec
        self.sharding = sharding
        self._dataset = None

    def __len__(self):
        return self.num_batches

    def host_dataset(self):
        tf = _tf()
        spec = self.spec
        size = spec.size

        def fn(encoded, label):
            img = spec.eval_preprocess(preprocess.decode_image(encoded))
            return {"image": img, "label": tf.cast(label, tf.int32),
                    "mask": tf.constant(1.0, tf.float32)}

        ds = _read(self.cfg, self.builder, self.split, shuffle_seed=None)
        # No AutoGraph: the preprocessing is written with tf.cond (converting it took seconds).
        ds = ds.map(tf.function(fn, autograph=False),
                    num_parallel_calls=int(self.cfg.num_parallel_calls))
        ds = ds.ignore_errors(log_warning=True)
        pad = tf.data.Dataset.from_tensors({
            "image": tf.zeros((size, size, 3), tf.float32), "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0, tf.float32)}).repeat()
        ds = ds.concatenate(pad).take(self.num_batches * self.local_batch)
        ds = ds.batch(self.local_batch, drop_remainder=True)
        return ds.prefetch(max(1, int(self.cfg.prefetch_batches)))

    def __iter__(self):
        expected = int(self.builder.info.splits[self.split].num_examples)
        seen = 0
        # Built (and its functions traced) once: every evaluation is a pass over it.
        if self._dataset is None:
            self._dataset = self.host_dataset()
        for batch in self._dataset.as_numpy_iterator():
            seen += int(np.sum(batch["mask"] > 0))
            if self.sharding is None:
                yield batch
            else:
                yield _to_global(batch, self.sharding, self.global_batch_size)
        if expected and not seen:
            raise InputError(f"no image of the eval split {self.split!r} of "
                             f"{self.cfg.dataset!r} could be decoded (see the tf.data "
                             "warnings above); check the files or prepare the dataset again")
        if seen < expected:
            log.warning("eval split %r: %d of this process's %d images could not be decoded "
                        "and were skipped", self.split, expected - seen, expected)


def make_eval_iterator(data_cfg, *, global_batch_size: int, spec: ImageSpec, sharding,
                       dataset: DatasetInfo | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> EvalIterable:
    """One pass over the whole eval split: ``{'image', 'label', 'mask'}`` global batches, padded
    (mask 0) so that every image counts exactly once and all processes yield the same count.
    ``dataset``: the resolved dataset (``dataset_info(data_cfg)``), resolved here if None."""
    return EvalIterable(data_cfg, dataset or dataset_info(data_cfg),
                        global_batch_size=global_batch_size, spec=spec, sharding=sharding,
                        process_index=process_index, process_count=process_count)
