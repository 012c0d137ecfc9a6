"""What a config compiles to, before any array exists: the model config, the checked batch
sizes and the :class:`Program` (model graph, optimizer, abstract state, shardings, jitted
train step). The training loop (``train.loop.setup``) and the ahead-of-time compiler
(``deepvit_jax.aot``) both build it here, so both compile the same step with the same
shardings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from deepvit_jax import parallel
from deepvit_jax.data.device_augment import make_device_augment
from deepvit_jax.errors import ConfigError
from deepvit_jax.models import ModelConfig, get_config
from deepvit_jax.train import config as config_lib
from deepvit_jax.train import state as state_lib
from deepvit_jax.train import step as step_lib


def model_config(config, num_classes: int) -> ModelConfig:
    """The ModelConfig of ``config.model_name`` with the ``config.model`` overrides."""
    overrides = {k: v for k, v in config.model.items() if v is not None}
    try:
        get_config(config.model_name)
    except ValueError as e:
        raise ConfigError(f"config.model_name={config.model_name!r}: {e}") from None
    try:
        return get_config(config.model_name, num_classes=num_classes, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def check_batch_size(config, field: str, value: int, mesh, num_train: int,
                     processes: int | None = None) -> int:
    """``value`` if the mesh and the processes (default: this run's) can split it and the
    split holds it."""
    shards = parallel.batch_size_per_shard(mesh)
    processes = jax.process_count() if processes is None else processes
    if value % shards or value % processes:
        raise ConfigError(
            f"config.{field}={value} cannot be split over the mesh: it must be a multiple of "
            f"data x fsdp = {shards} (mesh {dict(mesh.shape)}) and of the process count "
            f"{processes}")
    if field != "eval.batch_size" and value > num_train:
        raise ConfigError(f"config.{field}={value} is larger than the {num_train} training "
                          f"images of {config.data.dataset!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Program:
    """What a config compiles to, before any array exists: the model graph, the optimizer,
    the abstract initial state with its shardings, and the jitted train step. The training
    loop (:func:`setup`) and the ahead-of-time compiler (``deepvit_jax.aot``) both build it
    with :func:`make_program`, so both compile the same step with the same shardings."""

    model_def: state_lib.ModelDef
    tx: Any
    schedule: Any
    init_fn: Callable  # () -> (TrainState, rest): the initial state; jit it to materialise
    abstract_state: Any  # TrainState of ShapeDtypeStructs
    abstract_rest: Any
    state_sh: Any  # TrainState of NamedShardings
    rest_sh: Any
    batch_sh: dict  # {'image', 'label'}: the train batch's shardings
    augment_fn: Callable | None  # the on-device augmentation (None: the host does it all)
    train_step: Callable  # jax.jit(train step, shardings, donation): (state, rest, batch)


def make_program(config, mcfg: ModelConfig, mesh, length: config_lib.RunLength) -> Program:
    """The train step of ``config`` on ``mesh`` (see :class:`Program`)."""
    schedule = step_lib.make_schedule(config.optim, length)
    tx = step_lib.make_optimizer(config.optim, schedule)
    model_def = state_lib.make_model_def(mcfg)

    def init_fn():
        return state_lib.init_state(mcfg, tx, config.seed, ema=config.ema_decay > 0)

    abstract_state, abstract_rest = jax.eval_shape(init_fn)
    state_sh = parallel.tree_shardings(abstract_state, mesh)
    rest_sh = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_rest)
    # The on-device augmentation, built once: the train step and BatchNorm re-estimation.
    augment_fn = make_device_augment(config.data, image_size=mcfg.image_size, mean=mcfg.mean,
                                     std=mcfg.std)
    data_sh = parallel.batch_sharding(mesh)
    batch_sh = {"image": data_sh, "label": data_sh}
    train_step = jax.jit(
        step_lib.make_train_step(model_def, tx, schedule, config, augment_fn=augment_fn),
        in_shardings=(state_sh, rest_sh, batch_sh),
        out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=(0,))
    return Program(model_def, tx, schedule, init_fn, abstract_state, abstract_rest, state_sh,
                   rest_sh, batch_sh, augment_fn, train_step)


def batch_sizes(config, mesh, num_train: int) -> tuple[int, int, int]:
    """(train, eval, BatchNorm re-estimation) global batch sizes, checked against the mesh."""
    batch_size = check_batch_size(config, "batch_size", config.batch_size, mesh, num_train)
    eval_bs = check_batch_size(config, "eval.batch_size", config.eval.batch_size or batch_size,
                          mesh, num_train)
    recal_bs = config.eval.bn_recalibration_batch_size or batch_size
    if config.eval.bn_recalibration_batches:
        check_batch_size(config, "eval.bn_recalibration_batch_size", recal_bs, mesh, num_train)
    return batch_size, eval_bs, recal_bs
