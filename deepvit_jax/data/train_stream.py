"""The training stream: TFDS -> tf.data -> globally sharded ``jax.Array`` batches.

How an image becomes a batch (the dataset is resolved first, dataset.py):

1. The split is read as *encoded* bytes (``SkipDecoding``), files shuffled with a seed, and the
   encoded examples shuffled (seeded buffer) and numbered (``enumerate``).  By default
   (``data.global_order``) every process reads the same global order of the whole split and
   keeps only its slice of each global batch (example ``i`` belongs to global batch
   ``i // B``, to process ``(i // (B / P)) % P``), so the global batches - and so the loss
   curve - do not depend on the process count, and a run may resume on another number of
   hosts.  Every process then *reads* (not decodes) the whole split; at pod scale, where
   that I/O matters, ``global_order=False`` makes each process read only its own part
   (``tfds.split_for_jax_process``) with its own seeds.
2. When resuming, the already-seen examples are skipped *before* any decoding.
3. Each example is decoded and augmented (augment.py) with stateless random ops whose seed is
   derived from (seed, epoch, example number): the same seed gives the same batches whatever
   the thread scheduling, and a restored iterator repeats the exact stream.
4. Host batches of ``global_batch_size / process_count`` (the global remainder dropped)
   become one global ``jax.Array`` via ``jax.make_array_from_process_local_data`` on the
   given ``NamedSharding``, prefetched to the devices.

Evaluation (eval_stream.py) reads each process's part once, pads with masked (mask 0) zero
images so every process yields the same number of batches, and counts every image exactly once.

The iterator state is ``{'seed', 'epoch', 'position', ...}`` (JSON): ``position`` is the number
of batches already yielded in ``epoch``.  ``prepare`` (``python -m deepvit_jax.data``) skips
and counts images that cannot be decoded, so every stored image decodes and the epochs and
resume positions are exact; an image that still fails at read time (a dataset prepared
elsewhere) stops training with an error that names it, rather than shifting every later
batch (and, across processes, desynchronising them).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from deepvit_jax.data import augment as aug_lib
from deepvit_jax.data.array_record import ArrayRecordTrainStream
from deepvit_jax.data.array_record_files import has_array_record, prepare_command
from deepvit_jax.data.dataset import (STATE_VERSION, DatasetInfo, ImageSpec, _check_image_size,
                                      _local_batch, _process, _read, _seed_words, _tf,
                                      _to_global, check_state, dataset_info, process_split)
from deepvit_jax.errors import ConfigError, InputError

READERS = ("auto", "tfrecord", "array_record")
log = logging.getLogger(__name__)


class _Raising:
    """An iterator that raises ``exc`` (an error met while building an epoch's iterator in
    the background, re-raised on the training thread)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __iter__(self):
        return self

    def __next__(self):
        raise self.exc


class HostTrainStream:
    """This process's training batches as NumPy arrays (plus the state after each batch)."""

    def __init__(self, data_cfg, dataset: DatasetInfo, *, global_batch_size: int,
                 spec: ImageSpec, seed: int, process_index=None, process_count=None):
        self.cfg = data_cfg
        self.process_index, self.process_count = _process(process_index, process_count)
        self.global_batch_size = int(global_batch_size)
        self.local_batch = _local_batch(self.global_batch_size, self.process_count)
        self.image_size = int(spec.size)
        self.mean, self.std = tuple(spec.mean), tuple(spec.std)
        self.seed = int(seed)
        self.builder = dataset.builder
        self.global_order = bool(data_cfg.get("global_order", True))
        # (read_index, read_count): which part of the split this process reads, and the
        # process number mixed into its seeds; (keep_index, keep_count): which slice of each
        # read batch of local_batch * keep_count examples it keeps.
        pi, pc = self.process_index, self.process_count
        self._read, self._keep = ((0, 1), (pi, pc)) if self.global_order else ((pi, pc), (0, 1))
        self.split = process_split(dataset.train_split, *self._read, drop_remainder=True)
        self.num_read = int(self.builder.info.splits[self.split].num_examples)
        self.read_batch = self.local_batch * self._keep[1]
        self.batches_per_epoch = self.num_read // self.read_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the train split {dataset.train_split!r} has {self.num_read} examples"
                f"{'' if self.global_order else ' per process'}, fewer than the batch "
                f"{self.read_batch} (global_batch_size={self.global_batch_size}, "
                f"{pc} processes)")
        self.augment = aug_lib.make_train_augment(data_cfg, image_size=self.image_size,
                                                  mean=self.mean, std=self.std)
        self._cached = None
        self._example = None
        self.epoch, self.position = 0, 0
        self._it = None
        self._next = None    # (epoch, Future of its iterator) built in the background
        self._pool = None

    # -- state ---------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "reader": "tfrecord", "seed": self.seed,
                "epoch": self.epoch,
                "position": self.position, "global_batch_size": self.global_batch_size,
                "process_count": self.process_count, "global_order": self.global_order,
                "dataset": str(self.cfg.dataset), "split": str(self.cfg.train_split)}

    def set_state(self, state: dict[str, Any]) -> None:
        # In the global order the stream does not depend on the process count.
        check_state(state, self.get_state(),
                    ignore=("process_count",) if self.global_order else ())
        self.seed = int(state["seed"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self._it = self._next = None

    # -- data ----------------------------------------------------------------------------
    def _encoded(self, epoch: int):
        """(encoded image, label) in this epoch's shuffled order."""
        rank = self._read[0]
        file_seed = _seed_words(self.seed, epoch, rank, 1)[0] % (2**31)
        if self.cfg.get("cache"):
            if self._cached is None:
                self._cached = _read(self.cfg, self.builder, self.split, shuffle_seed=None).cache()
            ds = self._cached
        else:
            ds = _read(self.cfg, self.builder, self.split, shuffle_seed=file_seed)
        buf = int(self.cfg.shuffle_buffer)
        if buf > 1:
            ds = ds.shuffle(buf, seed=_seed_words(self.seed, epoch, rank, 2)[0],
                            reshuffle_each_iteration=False)
        return ds

    def _epoch_dataset(self, epoch: int, start_batch: int):
        tf = _tf()
        # Number the examples, drop the epoch's remainder (every process must yield the same
        # number of batches), skip what was seen (before decoding: cheap), keep this
        # process's slice of each batch.
        ds = self._encoded(epoch).enumerate().take(self.batches_per_epoch * self.read_batch)
        if start_batch:
            ds = ds.skip(start_batch * self.read_batch)
        (k, count), local = self._keep, self.local_batch
        if count > 1:
            ds = ds.filter(lambda i, ex: (i // local) % count == k)
        words = _seed_words(self.seed, epoch, self._read[0], 3)
        base = tf.constant([words[0] % (2**62), words[1] % (2**62)], tf.int64)
        example = self._example_fn()
        ds = ds.map(lambda i, ex: example(i, ex[0], ex[1], base),
                    num_parallel_calls=int(self.cfg.num_parallel_calls))
        # An image that fails to decode is dropped here and found below (its number is
        # missing from the batch), instead of ending the stream with a bare TF error.
        ds = ds.ignore_errors()
        ds = ds.batch(local, drop_remainder=True)
        return ds.prefetch(max(1, int(self.cfg.prefetch_batches)))

    def _example_fn(self):
        """The per-example decode + augmentation as one ``tf.function``, traced once: every
        epoch, resume and rewind (the BatchNorm re-estimation batches before each
        evaluation) builds a new dataset, and tracing the augmentation again through
        AutoGraph each time cost about a second."""
        if self._example is None:
            tf = _tf()
            augment = self.augment

            def example(i, encoded, label, base):
                seed = base + tf.stack([tf.constant(0, tf.int64), i])
                return {"image": augment(encoded, seed), "label": tf.cast(label, tf.int32),
                        "index": i}

            self._example = tf.function(example, autograph=False)  # explicit tf.cond / loops
        return self._example

    def _start(self, epoch: int, position: int):
        """The epoch's batch iterator from ``position``, its first batch already pulled."""
        it = iter(self._epoch_dataset(epoch, position).as_numpy_iterator())
        try:
            first = [next(it)]
        except StopIteration:
            first = []
        except Exception as e:   # raised when the training thread gets there
            return _Raising(e)
        return itertools.chain(first, it)

    def _prepare_next_epoch(self) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "next-epoch")
        epoch = self.epoch + 1
        self._next = (epoch, self._pool.submit(self._start, epoch, 0))

    def _take_next_epoch(self):
        pending, self._next = self._next, None
        if pending is None or pending[0] != self.epoch or self.position != 0:
            return None
        return pending[1].result()

    def close(self) -> None:
        self._it, self._next = None, None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _undecodable(self, index: int | None):
        which = (f"example {index} of epoch {self.epoch} (in its shuffled order)"
                 if index is not None else
                 f"images of epoch {self.epoch} after batch {self.position}")
        return InputError(
            f"train split {self.split!r} of {self.cfg.dataset!r}: {which} failed to decode; "
            "a skipped image would shift every later batch (and desynchronise processes), so "
            "prepare the dataset with `python -m deepvit_jax.data prepare ...`, which skips "
            "and counts undecodable images")

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(host batch, state after this batch)."""
        if self._it is None:
            self._it = self._take_next_epoch() or self._start(self.epoch, self.position)
            # Build the next epoch's iterator (and its first batch) in the background: a new
            # iterator costs about as much CPU as a short epoch's batches (tf.data optimises
            # and instantiates the augmentation graph, then fills the shuffle buffer), and
            # on the training thread every step of a small dataset waited for it.
            self._prepare_next_epoch()
        try:
            batch = next(self._it)
        except StopIteration:   # fewer batches than batches_per_epoch: images were dropped
            raise self._undecodable(None) from None
        k, local = self._keep[0], self.local_batch
        want = self.position * self.read_batch + k * local + np.arange(local)
        index = batch.pop("index")
        if not np.array_equal(index, want):
            raise self._undecodable(int(want[np.argmax(index != want)]))
        self.position += 1
        if self.position >= self.batches_per_epoch:
            state = self.get_state()
            self.epoch, self.position, self._it = self.epoch + 1, 0, None
            state.update(epoch=self.epoch, position=0)
        else:
            state = self.get_state()
        return batch, state


class TrainIterator:
    """Global training batches ``{'image': (B,S,S,3), 'label': (B,) i32}`` on ``sharding``:
    normalised float32 images, or uint8 crops when ``data.device_augment`` leaves RandAugment,
    normalisation and erasing to the train step."""

    def __init__(self, host: HostTrainStream, sharding, prefetch: int = 2,
                 make_host: Callable[[str], Any] | None = None):
        self.host = host
        # data.reader='auto': builds the other reader's stream when a saved state was made
        # by it (a run resumes with the stream it started with).
        self._make_host = make_host
        self.sharding = sharding
        self.prefetch = max(1, int(prefetch))
        self._queue = collections.deque()
        self._state = host.get_state()

    def __iter__(self):
        return self

    def _fill(self):
        while len(self._queue) < self.prefetch:
            batch, state = next(self.host)
            arrays = (_to_global(batch, self.sharding, self.host.global_batch_size)
                      if self.sharding is not None else batch)
            self._queue.append((arrays, state))

    def __next__(self):
        self._fill()
        arrays, self._state = self._queue.popleft()
        return arrays

    def get_state(self) -> dict[str, Any]:
        """Position after the last batch returned (JSON-serialisable)."""
        return dict(self._state)

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("reader", "tfrecord") if isinstance(state, dict) else None
        if (self._make_host is not None and saved in READERS[1:]
                and saved != self.host.get_state()["reader"]):
            self.close()
            self.host = self._make_host(saved)
        self.host.set_state(state)
        self._queue.clear()
        self._state = self.host.get_state()

    @property
    def batches_per_epoch(self) -> int:
        return self.host.batches_per_epoch

    def close(self) -> None:
        """Stop the reader's background work (worker processes of the array_record reader)."""
        self._queue.clear()
        close = getattr(self.host, "close", None)
        if close is not None:
            close()


def make_train_iterator(data_cfg, *, global_batch_size: int, spec: ImageSpec, sharding,
                        seed: int, dataset: DatasetInfo | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
    """Infinite, resumable stream of global training batches (remainder of each epoch dropped).

    ``sharding``: a ``NamedSharding`` whose first dimension is the batch (labels use its first
    spec entry); ``None`` yields host-local NumPy batches (tests / single-process tools).
    ``dataset``: the resolved dataset (``dataset_info(data_cfg)``), resolved here if None.
    """
    _check_image_size(spec.size)
    requested = _requested_reader(data_cfg)  # checked before the dataset is resolved
    dataset = dataset or dataset_info(data_cfg)
    pi, pc = _process(process_index, process_count)
    reader = resolve_reader(data_cfg, dataset, pc)

    def make_host(reader: str):
        if reader == "array_record":
            return ArrayRecordTrainStream(data_cfg, dataset, spec=spec, seed=seed,
                                          global_batch_size=global_batch_size,
                                          process_index=pi, process_count=pc)
        return HostTrainStream(data_cfg, dataset, global_batch_size=global_batch_size,
                               spec=spec, seed=seed, process_index=process_index,
                               process_count=process_count)

    return TrainIterator(make_host(reader), sharding,
                         prefetch=int(data_cfg.get("prefetch_batches", 2)),
                         make_host=make_host if requested == "auto" else None)


def _requested_reader(data_cfg) -> str:
    """``data.reader``, checked: one of :data:`READERS`."""
    reader = str(data_cfg.get("reader", "auto"))
    if reader not in READERS:
        raise ConfigError(f"data.reader={reader!r} is not one of {READERS}")
    return reader


def resolve_reader(data_cfg, dataset: DatasetInfo, process_count: int) -> str:
    """The reader ``data.reader`` names; for ``'auto'`` (the default) ``'array_record'``
    where the prepared dataset has ArrayRecord files (each host reads only its B/P records
    per step; at least as fast per core as tf.data, benchmarks/data_readers.py), else
    ``'tfrecord'``, with a warning on several hosts, where every host then reads the whole
    split. Either way the batches do not depend on the number of hosts."""
    reader = _requested_reader(data_cfg)
    if reader != "auto":
        return reader
    if bool(data_cfg.get("global_order", True)) and has_array_record(dataset.builder.data_dir):
        return "array_record"
    if process_count > 1:
        log.warning("data.reader='auto': %s has no ArrayRecord files, so each of the %d "
                    "processes reads the whole train split (tf.data); `%s` adds them and "
                    "each then reads only its 1/%d", dataset.builder.data_dir, process_count,
                    prepare_command(data_cfg, dataset), process_count)
    return "tfrecord"
