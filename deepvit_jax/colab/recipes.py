"""The notebooks' training config (``configs/colab.py``) and dataset."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepvit_jax import configs
from deepvit_jax.colab.runtime import Runtime, detect_runtime, say
from deepvit_jax.data.__main__ import prepare
from deepvit_jax.data.dataset import dataset_info, get_builder
from deepvit_jax.errors import DatasetNotPreparedError


def config_dir() -> Path:
    """The recipes' folder, ``deepvit_jax/configs`` (shipped in the package; ``configs/`` of
    a git checkout links to it)."""
    return configs.DIR


def load_config(spec: str, overrides: Mapping[str, Any] | None = None):
    """``FILE.py[:ARG]`` from ``configs/`` as ``main --config configs/FILE.py:ARG`` loads it,
    then ``overrides`` ({'model.depth': 2, 'total_steps': 10}; dotted field names) applied."""
    name, _, arg = spec.partition(":")
    path = config_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"configs/{name}: no such config file in {path.parent}")
    mod_spec = importlib.util.spec_from_file_location(f"deepvit_config_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
        if not hasattr(node, "keys") or leaf not in node.keys():
            raise ValueError(f"overrides: configs/{name} has no field {key!r} (dotted names of "
                             f"existing fields, e.g. 'model.depth', 'optim.learning_rate')")
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"overrides: {key}={value!r}: {e}") from None
    return config


def training_config(runtime: str, dataset: str, overrides: Mapping[str, Any] | None = None,
                    *, detected: Runtime | None = None, data_dir: str = ""):
    """``configs/colab.py:RUNTIME,DATASET`` with ``overrides``; ``runtime='auto'`` takes the
    detected runtime's (``detect_runtime``); ``data_dir`` (if given) is the TFDS data dir."""
    if runtime == "auto":
        runtime = (detected or detect_runtime(verbose=False)).config_arg
    overrides = dict(overrides or {})
    if data_dir:
        overrides["data.data_dir"] = data_dir
    config = load_config(f"colab.py:{runtime},{dataset}", overrides)
    m = config.model
    say(f"config: configs/colab.py:{runtime},{dataset} - {config.model_name} "
        f"{m.depth or ''} blocks x {m.embed_dim or ''}-d at {m.image_size} px, batch "
        f"{config.batch_size}, {m.dtype}")
    return config


def prepare_dataset(data_cfg):
    """Download and prepare ``data_cfg.dataset`` through TFDS if it is not ready; returns the
    ``DatasetInfo`` and prints its classes and split sizes."""
    name = str(data_cfg.dataset)
    try:
        get_builder(data_cfg)
    except DatasetNotPreparedError:
        say(f"data: downloading and preparing {name} (once; kept in the TFDS data dir)")
        try:
            prepare(name, data_dir=data_cfg.get("data_dir"))
        except Exception as e:
            raise RuntimeError(f"data: could not prepare {name!r} ({e}); check the runtime's "
                               f"internet connection, or use the dataset 'digits'") from None
    info = dataset_info(data_cfg)
    say(f"data: {info.name}, {info.num_classes} classes, {info.train_split} "
        f"{info.num_train} / {info.eval_split} {info.num_eval} images ({info.data_dir})")
    return info
