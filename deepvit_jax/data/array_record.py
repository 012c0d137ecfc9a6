"""The random-access training reader over ArrayRecord copies of prepared TFDS datasets.

``python -m deepvit_jax.data prepare NAME --array-record`` (``add_array_record``,
data/array_record_files.py) writes, beside
each TFRecord shard of a prepared dataset, the ArrayRecord shard with the same records in the
same order, and lists ``array_record`` among the dataset's ``alternative_file_formats``: the
tf.data reader keeps reading the TFRecord files, and ``tfds.data_source`` / ``as_data_source``
can read the ArrayRecord ones at random.

``data.reader='array_record'`` (``ArrayRecordTrainStream``): each process reads, per step, only
the ``L = B / P`` records of its slice of the global batch (the index layer, data/index.py),
with one batched random-access read, and decodes + augments them with the very augmentation
of the tf.data reader (augment.py, same per-example seeds) in grain worker processes
(``data.num_workers``; TensorFlow pinned to one thread and to the CPU in each).  Its batches
do not depend on the process count, and its state is the small JSON of the tf.data reader
(``seed``, ``epoch``, ``position``), so a run may resume on another number of hosts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from deepvit_jax.data import augment as aug_lib
from deepvit_jax.data import index as index_lib
from deepvit_jax.data.array_record_files import (FORMAT, data_source, has_array_record,
                                                 prepare_command, require_grain)
from deepvit_jax.data.dataset import STATE_VERSION, _seed_words, check_state
from deepvit_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# The per-step work (runs in a grain worker)
# ----------------------------------------------------------------------------------------


def worker_init(worker_index: int, worker_count: int) -> None:
    """In each grain worker: TensorFlow on one thread, on the CPU only (the accelerator
    belongs to JAX in the training process)."""
    del worker_index, worker_count
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            pass


class ReadAugment:
    """step -> this process's host batch of that step: reads its L records (one batched
    read), decodes and augments each with the per-example seed of the tf.data reader.
    Picklable (grain sends it to the workers); opens the source and traces the
    augmentation lazily in the process that runs it."""

    def __init__(self, *, dataset_dir: str, split: str, image_key: str, label_key: str,
                 data_cfg: dict, image_size: int, mean, std, seed: int, num_records: int,
                 global_batch_size: int, process_index: int, process_count: int,
                 batches_per_epoch: int, source=None):
        self.dataset_dir, self.split = str(dataset_dir), split
        self.image_key, self.label_key = image_key, label_key
        self.data_cfg = dict(data_cfg)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.seed, self.n = int(seed), int(num_records)
        self.B, self.p, self.P = int(global_batch_size), int(process_index), int(process_count)
        self.batches_per_epoch = int(batches_per_epoch)
        self._source = source          # tests inject a counting source (in-process only)
        self._parse = self._augment = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = state["_parse"] = state["_augment"] = None
        return state

    def records(self, step: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(epoch, global positions, record indices) that this process reads at ``step``."""
        epoch, position = divmod(int(step), self.batches_per_epoch)
        pos = index_lib.process_positions(position, self.B, self.p, self.P)
        return epoch, pos, index_lib.permute(pos, self.n, self.seed, epoch)

    def _setup(self):
        import ml_collections
        import tensorflow as tf
        import tensorflow_datasets as tfds


        if self._source is None:
            self._source = data_source(self.dataset_dir, self.split)
        features = tfds.builder_from_directory(self.dataset_dir).info.features
        decoders = {self.image_key: tfds.decode.SkipDecoding()}
        keys = (self.image_key, self.label_key)

        def parse(record):
            ex = features.deserialize_example_np(record, decoders=decoders)
            return ex[keys[0]], int(ex[keys[1]])

        self._parse = parse
        # Grappler rewrites a tf.function's arithmetic (e.g. folds the normalisation), which
        # tf.data does not do to its map functions: without it the same record and seed give
        # bit-identical images in both readers (tests/test_data_array_record.py).
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
        fn = aug_lib.make_train_augment(ml_collections.ConfigDict(self.data_cfg),
                                        image_size=self.image_size, mean=self.mean,
                                        std=self.std)
        self._augment = tf.function(fn, input_signature=(
            tf.TensorSpec((), tf.string), tf.TensorSpec((2,), tf.int64)))
        self._seed_words = _seed_words

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        if self._augment is None:
            self._setup()
        epoch, pos, rec = self.records(step)
        raw = self._source.__getitems__([int(r) for r in rec])
        words = self._seed_words(self.seed, epoch, 0, 3)   # the tf.data reader's, read rank 0
        base = np.array([words[0] % (2**62), words[1] % (2**62)], np.int64)
        images, labels, bad = [], [], -1
        for j, record in enumerate(raw):
            encoded, label = self._parse(record)
            try:
                img = self._augment(encoded, base + np.array([0, pos[j]], np.int64)).numpy()
            except Exception as e:   # tf.errors.InvalidArgumentError: not an image
                if "InvalidArgument" not in type(e).__name__:
                    raise
                bad = j
                break
            images.append(img)
            labels.append(label)
        if bad >= 0:    # reported (with its position) by the training process
            return {"step": np.int64(step), "bad": np.int64(bad)}
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32),
                "step": np.int64(step), "bad": np.int64(-1)}


# ----------------------------------------------------------------------------------------
# The training stream
# ----------------------------------------------------------------------------------------


WORKER_BYTES = 1.2e9  # resident memory of one worker (TensorFlow + JAX imported; measured
                      # 1.1 GB, benchmarks/results/data_readers.json)


def num_workers(data_cfg) -> int:
    """``data.num_workers``; -1: one per core, but at most as many as half the available
    memory holds (a 240-core host would otherwise start 240 workers of ~1.1 GB each)."""
    w = int(data_cfg.get("num_workers", -1))
    if w >= 0:
        return w
    cores = os.cpu_count() or 1
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on Linux: no cap
        return cores
    fit = max(1, int(0.5 * available / WORKER_BYTES))
    if fit < cores:
        log.info("data.num_workers=-1: %d grain workers (half the available memory at "
                 "~%.1f GB each), not one per core (%d)", fit, WORKER_BYTES / 1e9, cores)
    return min(cores, fit)


class ArrayRecordTrainStream:
    """This process's training batches (``HostTrainStream``'s interface) from ArrayRecord
    files: per step exactly its ``L = B / P`` records, augmented in grain workers."""

    reader = FORMAT

    def __init__(self, data_cfg, dataset, *, global_batch_size: int, spec, seed: int,
                 process_index: int, process_count: int, source=None):
        require_grain()
        self.cfg = data_cfg
        if not bool(data_cfg.get("global_order", True)):
            raise ConfigError("data.global_order=False does not apply to "
                              "data.reader='array_record', which always reads only this "
                              "process's records in the global order: drop the setting")
        self.process_index, self.process_count = process_index, process_count
        self.global_batch_size = int(global_batch_size)
        if self.global_batch_size <= 0 or self.global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive "
                             f"multiple of the process count ({process_count})")
        self.local_batch = self.global_batch_size // process_count
        self.seed = int(seed)
        self.split = dataset.train_split
        builder = dataset.builder
        self.dataset_dir = str(builder.data_dir)
        if not has_array_record(self.dataset_dir):
            raise InputError(
                f"data.reader='array_record': {self.dataset_dir} has no ArrayRecord files; "
                f"add them with `{prepare_command(data_cfg, dataset)}`")
        self.num_records = int(builder.info.splits[self.split].num_examples)
        self.batches_per_epoch = self.num_records // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the train split {self.split!r} has {self.num_records} examples, "
                             f"fewer than global_batch_size={self.global_batch_size}")
        self.fn = ReadAugment(
            dataset_dir=self.dataset_dir, split=self.split, image_key=data_cfg.image_key,
            label_key=data_cfg.label_key, data_cfg=data_cfg.to_dict(), image_size=spec.size,
            mean=spec.mean, std=spec.std, seed=self.seed, num_records=self.num_records,
            global_batch_size=self.global_batch_size, process_index=process_index,
            process_count=process_count, batches_per_epoch=self.batches_per_epoch,
            source=source)
        self.num_workers = num_workers(data_cfg)
        self.epoch, self.position = 0, 0
        self._it = None

    # -- state (the same JSON as the tf.data reader's global order, without the P) -----
    def get_state(self) -> dict[str, Any]:

        return {"version": STATE_VERSION, "reader": FORMAT, "seed": self.seed,
                "epoch": self.epoch, "position": self.position,
                "global_batch_size": self.global_batch_size, "global_order": True,
                "dataset": str(self.cfg.dataset), "split": str(self.cfg.train_split)}

    def set_state(self, state: dict[str, Any]) -> None:

        check_state(state, self.get_state(), ignore=("process_count",))
        self.close()
        self.seed = self.fn.seed = int(state["seed"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    # -- data ----------------------------------------------------------------------------
    def _pipeline(self, start: int):
        grain = require_grain()
        ds = grain.MapDataset.range(start, 2**62).map(self.fn)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():   # grain reads its absl flags (defaults here)
                flags.FLAGS.mark_as_parsed()
            buffer = max(1, int(self.cfg.get("prefetch_batches", 2)))
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=buffer),
                worker_init_fn=worker_init)
        return iter(ds)

    def _undecodable(self, step: int, j: int):
        epoch, pos, rec = self.fn.records(step)
        return InputError(
            f"train split {self.split!r} of {self.cfg.dataset!r}: example {int(pos[j])} of "
            f"epoch {epoch} (in its shuffled order; record {int(rec[j])} of the split) failed "
            "to decode; a skipped image would shift every later batch (and desynchronise "
            "processes), so prepare the dataset with `python -m deepvit_jax.data prepare "
            "...`, which skips and counts undecodable images")

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        step = self.epoch * self.batches_per_epoch + self.position
        if self._it is None:
            self._it = self._pipeline(step)
        out = next(self._it)
        if int(out["step"]) != step:   # cannot happen: grain keeps the order
            raise RuntimeError(f"array_record reader: got step {int(out['step'])}, "
                               f"expected {step}")
        if int(out["bad"]) >= 0:
            self.close()
            raise self._undecodable(step, int(out["bad"]))
        self.position += 1
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return {"image": out["image"], "label": out["label"]}, self.get_state()

    def close(self) -> None:
        """Stop the worker processes (also done at exit: they are daemonic)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown
            pass
