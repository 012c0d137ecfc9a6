"""TFDS -> tf.data -> globally sharded ``jax.Array`` batches.

How an image becomes a batch (training):

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

Evaluation reads each process's part once, pads with masked (mask 0) zero images so every
process yields the same number of batches, and counts every image exactly once.

The iterator state is ``{'seed', 'epoch', 'position', ...}`` (JSON): ``position`` is the number
of batches already yielded in ``epoch``.  ``prepare`` (``python -m deepvit_jax.data``) skips
and counts images that cannot be decoded, so every stored image decodes and the epochs and
resume positions are exact; an image that still fails at read time (a dataset prepared
elsewhere) stops training with an error that names it, rather than shifting every later
batch (and, across processes, desynchronising them).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import os
from typing import Any

import numpy as np

from deepvit_jax.data import augment as aug_lib
from deepvit_jax.data import preprocess
from deepvit_jax.errors import ConfigError, DatasetNotPreparedError, InputError

log = logging.getLogger(__name__)

STATE_VERSION = 1
READERS = ("tfrecord", "array_record")


def _tf():
    import tensorflow as tf

    # tf.data only: keep TensorFlow away from any accelerator JAX owns.
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass
    return tf


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


# ----------------------------------------------------------------------------------------
# Dataset resolution
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A resolved dataset: resolve it once (``dataset_info``) and hand it to the iterators."""

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    train_split: str
    eval_split: str
    image_shape: tuple | None
    data_dir: str
    builder: Any = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What a model expects of its input images: side, normalisation and the evaluation
    resize / centre crop. ``ImageSpec.of(model_config)`` takes them from a ModelConfig."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    @classmethod
    def of(cls, model_config) -> ImageSpec:
        c = model_config
        return cls(size=c.image_size, mean=tuple(c.mean), std=tuple(c.std),
                   crop_pct=c.crop_pct, interpolation=c.interpolation)

    def eval_preprocess(self, image):
        """The official evaluation transform of one decoded uint8 (H, W, C) image."""
        return preprocess.eval_preprocess(image, image_size=self.size, crop_pct=self.crop_pct,
                                          mean=self.mean, std=self.std,
                                          interpolation=self.interpolation)


def default_data_dir(data_dir: str | None = None) -> str:
    if data_dir:
        return os.path.expanduser(str(data_dir))
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def get_builder(data_cfg, *, prepare_digits: bool = True):
    """The TFDS builder for ``data_cfg.dataset`` (prepared), with a clear error otherwise."""
    tfds = _tfds()
    name = str(data_cfg.dataset)
    data_dir = default_data_dir(data_cfg.get("data_dir"))
    if name == "digits":
        from deepvit_jax.data.builders.digits import Digits

        builder = Digits(data_dir=data_dir)
        if not builder.is_prepared():
            if not prepare_digits:
                raise DatasetNotPreparedError(f"digits is not prepared under {data_dir}")
            log.info("Preparing the embedded digits dataset under %s", data_dir)
            builder.download_and_prepare()
        return builder
    if name == "folder":
        from deepvit_jax.data.builders.folder import folder_builder

        return folder_builder(data_cfg.get("folder_path"), data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"data.dataset={name!r} is not a known dataset: use 'digits', 'folder' or a TFDS "
            f"name (see tfds.list_builders()). {first}") from None
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"data.dataset={name!r} is not prepared under data_dir={data_dir!r}. Run first:\n"
            f"  python -m deepvit_jax.data prepare {name} --data-dir {data_dir}"
            + (" --manual-dir DIR" if name.startswith("imagenet2012") else ""))
    return builder


def _split_size(builder, split: str, field: str) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"data.{field}={split!r} does not exist in dataset {builder.name!r}; available "
            f"splits: {sorted(builder.info.splits.keys())} ({e})") from None


def _eval_split(data_cfg, builder) -> str:
    if data_cfg.get("eval_split"):
        return str(data_cfg.eval_split)
    splits = builder.info.splits.keys()
    for s in ("validation", "test", "val"):
        if s in splits:
            return s
    hint = ""
    if builder.name == "image_folder":
        from deepvit_jax.data.builders.folder import NO_EVAL_HINT

        hint = f"; for an image folder, {NO_EVAL_HINT}"
    raise ValueError(f"dataset {builder.name!r} has no 'validation' or 'test' split "
                     f"(splits: {sorted(splits)}); set data.eval_split{hint}")


def _check_features(data_cfg, builder):
    feats = builder.info.features
    for key, field in ((data_cfg.image_key, "image_key"), (data_cfg.label_key, "label_key")):
        if key not in feats:
            raise ValueError(f"data.{field}={key!r} is not a feature of {builder.name!r} "
                             f"(features: {sorted(feats.keys())})")


def dataset_info(data_cfg) -> DatasetInfo:
    """Classes and split sizes; errors clearly for an unknown dataset or split (no compute)."""
    builder = get_builder(data_cfg)
    _check_features(data_cfg, builder)
    train_split = str(data_cfg.train_split)
    eval_split = _eval_split(data_cfg, builder)
    num_train = _split_size(builder, train_split, "train_split")
    num_eval = _split_size(builder, eval_split, "eval_split")
    label = builder.info.features[data_cfg.label_key]
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise ValueError(f"feature {data_cfg.label_key!r} of {builder.name!r} is not a ClassLabel")
    img = builder.info.features[data_cfg.image_key]
    return DatasetInfo(name=builder.name, num_classes=int(num_classes), num_train=num_train,
                       num_eval=num_eval, train_split=train_split, eval_split=eval_split,
                       image_shape=tuple(getattr(img, "shape", ()) or ()) or None,
                       data_dir=default_data_dir(data_cfg.get("data_dir")), builder=builder)


# ----------------------------------------------------------------------------------------
# Host-local tf.data pipelines
# ----------------------------------------------------------------------------------------


def _process(process_index, process_count):
    import jax

    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index={pi} is not in [0, process_count={pc})")
    return pi, pc


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"the process count ({process_count})")
    return global_batch_size // process_count


def _options(data_cfg):
    tf = _tf()
    opts = tf.data.Options()
    opts.deterministic = True
    opts.autotune.enabled = True
    if data_cfg.get("private_threadpool_size"):
        opts.threading.private_threadpool_size = int(data_cfg.private_threadpool_size)
    return opts


def _seed_words(*ints) -> tuple[int, int]:
    """Two int64-safe seed words from any integers (NumPy's SeedSequence hashing)."""
    a, b = np.random.SeedSequence([int(i) % (2**63) for i in ints]).generate_state(2)
    return int(a), int(b)


def _read(data_cfg, builder, split, *, shuffle_seed: int | None):
    tfds = _tfds()
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                  options=_options(data_cfg), add_tfds_id=False)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                            read_config=read_config,
                            decoders={data_cfg.image_key: tfds.decode.SkipDecoding()})
    ik, lk = data_cfg.image_key, data_cfg.label_key
    return ds.map(lambda ex: (ex[ik], ex[lk]))


def process_split(split: str, process_index: int, process_count: int, *, drop_remainder: bool):
    return _tfds().split_for_jax_process(split, process_index=process_index,
                                         process_count=process_count,
                                         drop_remainder=drop_remainder)


def check_state(state, mine: dict[str, Any], *, ignore=()) -> None:
    """Refuse a saved iterator state whose stream this run cannot reproduce (another batch
    size, reader, order or - in the per-process order - process count)."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"not a data-iterator state (version {STATE_VERSION}): {state!r}")
    saved = {"global_batch_size": int(state["global_batch_size"]),
             "reader": str(state.get("reader", "tfrecord")),        # older states
             "global_order": bool(state.get("global_order", True)),   # older states
             "process_count": state.get("process_count")}
    for key in saved.keys() - set(ignore):
        if saved[key] != mine.get(key):
            raise ValueError(f"iterator state has {key}={saved[key]}, this run has "
                             f"{mine.get(key)}: the saved data position cannot be reproduced")


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
        import concurrent.futures

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


def _label_sharding(sharding):
    from jax.sharding import NamedSharding, PartitionSpec

    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if spec else None))


def _to_global(batch: dict[str, np.ndarray], sharding, global_batch_size: int):
    import jax

    out = {}
    lab = _label_sharding(sharding)
    for k, v in batch.items():
        sh = lab if v.ndim == 1 else sharding
        try:
            out[k] = jax.make_array_from_process_local_data(
                sh, v, (global_batch_size, *v.shape[1:]))
        except Exception as e:  # re-raised with the shapes that matter
            raise ValueError(
                f"cannot place host batch {k!r} of shape {v.shape} as a global batch of "
                f"{global_batch_size} with sharding {sh}: the batch dimension must divide over "
                f"the mesh's data axes ({e})") from None
    return out


class TrainIterator:
    """Global training batches ``{'image': (B,S,S,3), 'label': (B,) i32}`` on ``sharding``:
    normalised float32 images, or uint8 crops when ``data.device_augment`` leaves RandAugment,
    normalisation and erasing to the train step."""

    def __init__(self, host: HostTrainStream, sharding, prefetch: int = 2):
        self.host = host
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


def _check_image_size(image_size, what="image_size"):
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"{what} must be a positive int, got {image_size!r}")


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
    reader = str(data_cfg.get("reader", "tfrecord"))
    if reader not in READERS:
        raise ConfigError(f"data.reader={reader!r} is not one of {READERS}")
    dataset = dataset or dataset_info(data_cfg)
    if reader == "array_record":
        # array_record imports this module (its reader reuses the augmentation and state).
        from deepvit_jax.data.array_record import ArrayRecordTrainStream

        pi, pc = _process(process_index, process_count)
        host = ArrayRecordTrainStream(data_cfg, dataset, global_batch_size=global_batch_size,
                                      spec=spec, seed=seed, process_index=pi, process_count=pc)
    else:
        host = HostTrainStream(data_cfg, dataset, global_batch_size=global_batch_size,
                               spec=spec, seed=seed, process_index=process_index,
                               process_count=process_count)
    return TrainIterator(host, sharding, prefetch=int(data_cfg.get("prefetch_batches", 2)))


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
