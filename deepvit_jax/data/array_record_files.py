"""ArrayRecord files of a prepared TFDS dataset: whether it has them, the command and the
conversion that add them (``python -m deepvit_jax.data prepare NAME --array-record``), and
their records read at random; the TFDS and grain this needs. The training reader over them
is data/array_record.py."""

from __future__ import annotations

import os

from deepvit_jax.errors import ConfigError, InputError

FORMAT = "array_record"
INSTALL = 'pip install "deepvit-jax[grain]"'
# The oldest TFDS that lists extra file formats of a prepared dataset
# (DatasetInfo.alternative_file_formats, 4.9.7) and reads one of them at random
# (as_data_source(file_format=...), 4.9.8). The grain extra asks for it; the base package
# supports older TFDS (a Colab runtime's), which read TFRecord only.
TFDS_FLOOR = "4.9.8"


def _tfds_lists_formats() -> bool:
    from tensorflow_datasets.core.proto import dataset_info_pb2

    return "alternative_file_formats" in dataset_info_pb2.DatasetInfo.DESCRIPTOR.fields_by_name


def require_grain():
    """The ``grain`` module, or a one-line ConfigError with the install command."""
    try:
        import array_record.python.array_record_module  # noqa: F401
        import grain
    except ImportError as e:
        raise ConfigError(f"data.reader='array_record' needs grain and array-record "
                          f"(missing: {e.name}): {INSTALL}") from None
    if not _tfds_lists_formats():
        import tensorflow_datasets as tfds

        raise ConfigError(f"data.reader='array_record' needs tensorflow-datasets>="
                          f"{TFDS_FLOOR} (installed: {tfds.__version__}): {INSTALL}")
    return grain


def _tfds_core():
    from tensorflow_datasets.core import dataset_info, file_adapters
    from tensorflow_datasets.core.utils import py_utils

    return dataset_info, file_adapters, py_utils


def has_array_record(dataset_dir) -> bool:
    from etils import epath

    dataset_info, _, _ = _tfds_core()
    try:
        proto = dataset_info.read_from_json(epath.Path(dataset_dir) / "dataset_info.json")
    except Exception:  # no readable dataset_info.json (not prepared by TFDS): no files listed
        return False
    # A TFDS older than TFDS_FLOOR has no list of other formats: it reads TFRecord only.
    return FORMAT in (proto.file_format, *getattr(proto, "alternative_file_formats", ()))


def prepare_command(data_cfg, dataset) -> str:
    """The command that adds ArrayRecord files to the prepared dataset of ``data_cfg``."""
    name = str(data_cfg.dataset)
    folder = f" --folder {data_cfg.folder_path}" if name == "folder" else ""
    return (f"python -m deepvit_jax.data prepare {name} --array-record{folder} "
            f"--data-dir {dataset.data_dir}")


def add_array_record(dataset_dir, *, progress: bool = True) -> dict[str, int]:
    """Write the ArrayRecord shards of every split of the prepared dataset in ``dataset_dir``
    (a TFDS dataset version folder, e.g. ``DATA_DIR/imagenet2012/5.1.0``) in place, and list
    the format in its ``dataset_info.json``. Returns {split: records}.

    This is what ``tfds convert_format --dataset_version_dir DIR --out_file_format
    array_record`` does (tensorflow_datasets/scripts/cli/convert_format_utils.py: each shard
    re-written record by record with TFDS's file adapters, written to a temporary name then
    renamed, then the format appended to ``alternative_file_formats``), with the same
    TFDS functions; that module is not called because it imports Apache Beam at import time,
    a large dependency this package does not otherwise need. Shards already converted are
    kept (an interrupted conversion resumes), and every split's record count is checked."""
    from etils import epath

    dataset_info, file_adapters, py_utils = _tfds_core()
    require_grain()
    path = epath.Path(dataset_dir)
    proto = dataset_info.read_from_json(path / "dataset_info.json")
    in_format = file_adapters.FileFormat(proto.file_format or "tfrecord")
    out_format = file_adapters.FileFormat(FORMAT)
    reader = file_adapters.ADAPTER_FOR_FORMAT[in_format]
    writer = file_adapters.ADAPTER_FOR_FORMAT[out_format]
    splits = dataset_info.get_split_dict_from_proto(proto, data_dir=path, file_format=in_format)
    counts = {}
    for split in splits.values():
        template = split.filename_template
        out_template = template.replace(filetype_suffix=out_format.file_suffix)
        num_shards = len(split.shard_lengths)
        shards = range(num_shards)
        if progress and in_format != out_format:
            import tqdm

            shards = tqdm.tqdm(shards, unit=" shards", desc=f"{proto.name} {split.name} -> "
                               f"{FORMAT}")
        for i in shards:
            out = out_template.sharded_filepath(shard_index=i, num_shards=num_shards)
            if in_format == out_format or out.exists():
                continue
            src = template.sharded_filepath(shard_index=i, num_shards=num_shards)
            records = ((j, r.numpy()) for j, r in enumerate(reader.make_tf_data(src)))
            with py_utils.incomplete_file(out) as tmp:
                writer.write_examples(tmp, records)
        written = sum(writer.num_examples(out_template.sharded_filepath(
            shard_index=i, num_shards=num_shards)) for i in range(num_shards))
        if written != split.num_examples:
            raise InputError(f"{path}: split {split.name!r} has {split.num_examples} records "
                             f"but its ArrayRecord shards hold {written}; delete its "
                             f"*.{FORMAT}-* shards and convert again")
        counts[split.name] = written
    if FORMAT not in (proto.file_format, *proto.alternative_file_formats):
        proto.alternative_file_formats.append(FORMAT)
        dataset_info.write_dataset_info_proto(proto, dataset_info_dir=path)
    return counts


def data_source(dataset_dir, split: str):
    """The split's ArrayRecord records as raw serialized bytes (``tfds`` random access)."""
    import tensorflow_datasets as tfds

    # A builder of its own: as_data_source switches the builder's file format, which the
    # tf.data reader's builder must keep.
    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    return builder.as_data_source(split, file_format=FORMAT,
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
