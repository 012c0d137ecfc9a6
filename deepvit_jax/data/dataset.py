"""The dataset a config names, resolved once, and the helpers its streams share.

``dataset_info(data_cfg)`` finds the TFDS builder (``get_builder``: the embedded digits, an
image folder, or any prepared TFDS dataset), checks the features and splits, and returns a
:class:`DatasetInfo` that the training stream (train_stream.py) and the evaluation stream
(eval_stream.py) are built from. :class:`ImageSpec` is what a model expects of its input
images (shared with ``predict``, so that the evaluation preprocessing exists once).

The rest is shared by the streams: the process index and count, the per-process batch, the
seed words of the stateless augmentation, reading a split as encoded bytes, the iterator
state check (``STATE_VERSION``, ``check_state``) and the placement of host batches as global
``jax.Array`` batches (``_to_global``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from deepvit_jax.data import preprocess
from deepvit_jax.errors import DatasetNotPreparedError

log = logging.getLogger(__name__)

STATE_VERSION = 1


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


def _label_sharding(sharding):
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if spec else None))


def _to_global(batch: dict[str, np.ndarray], sharding, global_batch_size: int):
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


def _check_image_size(image_size, what="image_size"):
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"{what} must be a positive int, got {image_size!r}")

