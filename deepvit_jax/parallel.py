"""Devices: multi-host initialisation, the mesh from the config, sharding rules.

The mesh has three axes:

* ``data``   - pure data parallelism (parameters replicated);
* ``fsdp``   - data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
* ``tensor`` - optional tensor parallelism across attention heads / MLP hidden units.

The batch is split over ``('data', 'fsdp')``. Parameters follow :data:`TENSOR_RULES` on the
``tensor`` axis and are additionally sharded over ``fsdp`` along their largest divisible
dimension. Everything runs under ``jax.jit`` with these ``NamedSharding`` s as in/out
shardings; XLA inserts the collectives, so the result is the same computation whatever the
mesh (BatchNorm statistics, for instance, are always over the *global* batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepvit_jax.errors import ConfigError
from deepvit_jax.utils import flatten_dict, path_str

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# --------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------


def _on_slurm() -> bool:
    """A SLURM job step with several tasks, launched by ``srun`` (which sets
    ``SLURM_STEP_NUM_TASKS``). ``SLURM_NTASKS`` alone is also set inside an ``sbatch``
    script, where a lone ``python`` would wait forever for tasks that never start."""
    if "SLURM_PROCID" not in os.environ:
        return False
    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if step_tasks <= 1 and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        log.warning("SLURM_NTASKS=%s but this process was not started by srun (no "
                    "SLURM_STEP_NUM_TASKS): running as a single process; launch with srun "
                    "for a multi-process run", os.environ["SLURM_NTASKS"])
    return step_tasks > 1


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


INIT_TIMEOUT_S = 300


def _initialize(**kwargs) -> None:
    timeout = int(os.environ.get("DEEPVIT_INIT_TIMEOUT_S", INIT_TIMEOUT_S))
    try:
        jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
    except Exception as e:  # the coordinator never answered / a peer never joined
        raise ConfigError(
            f"multi-process start-up failed after up to {timeout} s ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): start every process (the same "
            "command with its own --process-id, or srun with --ntasks), check "
            "--coordinator-address is reachable; DEEPVIT_INIT_TIMEOUT_S sets the wait") from None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, *, cpu_collectives: str = "gloo") -> bool:
    """Call ``jax.distributed.initialize`` where the run spans several processes.

    * explicit ``coordinator_address`` (``host:port``) + ``num_processes`` + ``process_id``;
    * otherwise a SLURM job step with several tasks (``srun``) or a multi-host TPU slice,
      whose environment JAX reads by itself;
    * otherwise a single process: nothing to do.

    On CPU, cross-process collectives go through ``cpu_collectives`` (gloo). Must run before
    anything touches the JAX backend. Waits at most ``DEEPVIT_INIT_TIMEOUT_S`` (300 s) for
    the other processes, then fails naming the fix. Returns True when the runtime is up.
    """
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--coordinator-address={coordinator_address} needs --num-processes >= 1 and "
                f"0 <= --process-id < num_processes (got {num_processes}, {process_id})")
        if num_processes == 1:
            return False
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        _initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id)
        return True
    if _on_slurm() or _on_tpu_pod():
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        _initialize()
        return True
    return False


def _leaf_hash(value) -> int:
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def check_processes(config_json: dict, ok: bool = True, problem: str = "") -> None:
    """Every process runs the same config (and ``ok`` everywhere, e.g. process 0 holds the
    workdir lock). One all-gather of a hash per config field at start-up; a difference
    raises ConfigError on every process, naming the fields (different seeds would give
    replicas that silently differ)."""
    if jax.process_count() == 1:
        return
    flat = flatten_dict(config_json)
    keys = sorted(flat)
    mine = np.array([int(ok)] + [_leaf_hash(flat[k]) for k in keys], np.int64)
    # Different field sets would make the gathered shapes differ: gather the count first.
    counts = np.asarray(multihost_utils.process_allgather(np.int64(len(mine))))
    if len(set(counts.tolist())) > 1:
        raise ConfigError(f"the processes run configs with different fields (counts "
                          f"{counts.tolist()}): run the same code and config everywhere")
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 1 + fields)
    if not every[:, 0].all():
        raise ConfigError(problem or "another process failed its start-up checks")
    differ = [keys[i] for i in range(len(keys)) if len(set(every[:, 1 + i].tolist())) > 1]
    if differ:
        raise ConfigError(
            f"the {jax.process_count()} processes run different configs: "
            f"{', '.join('config.' + k for k in differ[:10])} differ (this is process "
            f"{jax.process_index()}): give every process the same --config flags")


# --------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolve ``config.mesh`` (fields data/fsdp/tensor; one of them may be -1 = "the rest")
    against the device count. Raises ConfigError naming the field."""
    sizes = {a: int(mesh_cfg[a]) for a in AXES}
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f"config.mesh.{a}={s}: must be a positive size or -1 (fill)")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh: impossible mesh {sizes} on {num_devices} devices "
                f"({num_devices} is not divisible by {fixed})")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh: impossible mesh {sizes}: {fixed} devices requested, "
            f"{num_devices} available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # jax.make_mesh orders the devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def batch_size_per_shard(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# --------------------------------------------------------------------------------------
# Parameter sharding rules
# --------------------------------------------------------------------------------------

# Tensor parallelism (Megatron style): column-parallel in-projections, row-parallel
# out-projections. A rule gives the mesh axis of each dimension; FSDP fills in later.
# The regex is matched against the end of the '/'-joined path, so the same rules apply to the
# parameters, the optimizer moments and the EMA copy (their paths end the same way).
TENSOR_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"attn/qkv/kernel$", (None, "tensor")),
    (r"attn/qkv/bias$", ("tensor",)),
    (r"attn/proj/kernel$", ("tensor", None)),
    (r"mlp/fc1/kernel$", (None, "tensor")),
    (r"mlp/fc1/bias$", ("tensor",)),
    (r"mlp/fc2/kernel$", ("tensor", None)),
]


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
               min_fsdp_size: int = 2**12) -> P:
    """PartitionSpec for one array: tensor rule by name, then FSDP on the largest dimension
    that the fsdp axis divides (arrays under ``min_fsdp_size`` elements stay replicated)."""
    spec: list[str | None] = [None] * len(shape)
    tp = mesh.shape["tensor"]
    if tp > 1:
        for pattern, axes in TENSOR_RULES:
            if re.search(pattern, path) and len(axes) == len(shape):
                spec = [a if a is None or shape[i] % tp == 0 else None
                        for i, a in enumerate(axes)]
                break
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and int(np.prod(shape, dtype=np.int64)) >= min_fsdp_size:
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if spec[i] is None and shape[i] % fsdp == 0:
                spec[i] = "fsdp"
                break
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedSharding for every array leaf of ``tree`` (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, param_spec(path_str(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)
