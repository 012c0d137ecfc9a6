"""The run's train and eval programs, built by the training code (``train.program``) on a
topology's devices, and lowered on abstract arrays (``jax.ShapeDtypeStruct`` with the run's
shardings) at the config's global batch."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from deepvit_jax import parallel
from deepvit_jax.data.dataset import dataset_info
from deepvit_jax.errors import ConfigError, one_line
from deepvit_jax.train import config as config_lib
from deepvit_jax.train import program
from deepvit_jax.train.evaluator import jit_eval_step

# Datasets a recipe may name that need not be prepared on the compiling machine:
# (classes, train images, eval images).
KNOWN_DATASETS = {
    "imagenet2012": (1000, 1281167, 50000),
    "imagenet2012_real": (1000, 1281167, 50000),
    "imagenette": (10, 9469, 3925),
    "cifar10": (10, 50000, 10000),
    "cifar100": (100, 50000, 10000),
}


def _dataset(config, num_classes: int | None, num_train: int | None):
    """(num_classes, num_train, name): the prepared dataset's, else the known table's."""
    name = str(config.data.dataset)
    try:
        info = dataset_info(config.data)
        known = (info.num_classes, info.num_train)
    except Exception as e:  # not prepared here: the table, or the flags
        row = KNOWN_DATASETS.get(name.split(":")[0].split("/")[0])
        if row is None and not (num_classes and num_train):
            raise ConfigError(f"config.data.dataset={name!r} is not readable here "
                              f"({one_line(e)}) and not one of {sorted(KNOWN_DATASETS)}: "
                              "pass --num-classes and --num-train") from None
        known = row[:2] if row else (num_classes, num_train)
    return (num_classes or known[0]), (num_train or known[1]), name


@dataclasses.dataclass
class Setup:
    config: Any
    mesh: Any
    mcfg: Any
    prog: Any  # train.program.Program
    hosts: int
    num_train: int


def build(config, devices, *, num_classes=None, num_train=None) -> Setup:
    """The run's programs on ``devices``, by the training loop's own functions."""
    config = config.copy_and_resolve_references()
    if config.init_from is None:  # weights are loaded at run time; the program is the same
        with config.unlocked():
            config.init_from = ""
    config_lib.validate(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    classes, n_train, _ = _dataset(config, num_classes, num_train)
    mcfg = program.model_config(config, classes)
    hosts = len({d.process_index for d in devices})
    program.check_batch_size(config, "batch_size", config.batch_size, mesh, n_train,
                             processes=hosts)
    program.check_batch_size(config, "eval.batch_size",
                             config.eval.batch_size or config.batch_size, mesh, n_train,
                             processes=hosts)
    length = config_lib.run_length(config, n_train)
    return Setup(config, mesh, mcfg, program.make_program(config, mcfg, mesh, length), hosts,
                 n_train)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def lower_train(s: Setup, global_batch: int):
    """The jitted train step of :func:`build` lowered at ``global_batch`` (abstract arrays)."""
    p, size = s.prog, s.mcfg.image_size
    image_dtype = jnp.uint8 if p.augment_fn is not None else jnp.float32
    batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), image_dtype,
                                           sharding=p.batch_sh["image"]),
             "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32,
                                           sharding=p.batch_sh["label"])}
    with jax.set_mesh(s.mesh):
        return p.train_step.trace(_abstract(p.abstract_state, p.state_sh),
                                  _abstract(p.abstract_rest, p.rest_sh), batch).lower()


def lower_eval(s: Setup, global_batch: int):
    """The evaluator's jitted step (``jit_eval_step``) lowered at ``global_batch``."""
    p, size = s.prog, s.mcfg.image_size
    data_sh = parallel.batch_sharding(s.mesh)
    step = jit_eval_step(p.model_def, s.mesh, p.state_sh, p.rest_sh)
    batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32,
                                           sharding=data_sh),
             "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=data_sh),
             "mask": jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=data_sh)}
    st = p.abstract_state
    with jax.set_mesh(s.mesh):
        return step.trace(_abstract(st.params, p.state_sh.params),
                          _abstract(st.batch_stats, p.state_sh.batch_stats),
                          _abstract(p.abstract_rest, p.rest_sh), batch).lower()


def unrolled_flops(s: Setup, train_batch: int, eval_batch: int) -> tuple[float, float]:
    """Global FLOPs of one train and one eval step of ``s.config`` with its blocks unrolled,
    by XLA's cost analysis of the programs lowered (not compiled) for one CPU device.

    For ``model.scan_blocks``: the analysis of a compiled program counts a loop body once,
    so a scanned program's own count misses (depth - 1) blocks. The arithmetic does not
    depend on the device or the mesh: the one-device program of the same step counts it."""
    config = s.config.copy_and_resolve_references()
    with config.unlocked():
        config.model.scan_blocks = False
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    one = build(config, jax.devices("cpu")[:1], num_classes=s.mcfg.num_classes,
                num_train=s.num_train)
    return (float(lower_train(one, train_batch).cost_analysis()["flops"]),
            float(lower_eval(one, eval_batch).cost_analysis()["flops"]))
