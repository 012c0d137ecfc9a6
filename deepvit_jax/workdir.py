"""The training workdir, the one module that knows its layout::

    WORKDIR/
      checkpoints/<step>/{state,data,meta}   Orbax CheckpointManager (CHECKPOINTS, ITEMS)
      unreadable_checkpoints/<step>/         checkpoints set aside on resume (UNREADABLE)
      metrics.jsonl  tensorboard/            train.reporting.MetricWriter (METRICS, TENSORBOARD)
      train.log                              the run's log (TRAIN_LOG)
      lock                                   workdir_lock.WorkdirLock (LOCK)
      run_config.json                        the config of the run that made the run files
                                             (RUN_CONFIG, check_fresh_workdir)

Each checkpoint ``checkpoints/<step>/`` holds three items:

* ``state`` - the :class:`~deepvit_jax.train.state.TrainState` (parameters, BatchNorm
  statistics, optimizer, EMA, RNG key, step), saved sharded by every process;
* ``data``  - the training iterator's position (JSON, ``iterator.get_state()``);
* ``meta``  - the run config and model config (JSON), for humans and tools.

Before anything is restored, the saved config is compared with the current one
(:func:`config_changes`): a resume may change only the fields in
``train.config.RESUMABLE_FIELDS`` (run length, cadences, retention, input-pipeline knobs).
A checkpoint that cannot be read is moved to ``WORKDIR/unreadable_checkpoints/<step>`` and
the one before it is used (:meth:`Checkpointer.restore_latest`).

``workdir_lock.WorkdirLock`` keeps a second run off a workdir in use (``WORKDIR/lock``;
the local and object-store protocols and the take-over policy live in workdir_lock.py), taken
for the whole run by :func:`claim_workdir` on process 0. A run that starts from scratch (no
checkpoint) refuses a workdir holding another run's ``metrics.jsonl`` / ``tensorboard/`` unless
``config.overwrite`` (:func:`check_fresh_workdir`).

Saves are asynchronous. Orbax writes into a temporary directory and renames it when every
item is complete, so a checkpoint cut short by ``kill -9`` is never listed (and its leftovers
are removed on the next start). Retention: the last ``keep`` checkpoints plus the best one by
``best_metric`` (checkpoints saved at an evaluation carry the eval metrics).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from deepvit_jax import parallel, workdir_lock
from deepvit_jax.errors import ConfigError, InputError
from deepvit_jax.utils import as_path, atomic_output, flatten_dict

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
UNREADABLE = "unreadable_checkpoints"
STATE, DATA, META = "state", "data", "meta"
ITEMS = (STATE, DATA, META)  # the Orbax items of every checkpoint
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TRAIN_LOG = "train.log"
LOCK = workdir_lock.LOCK  # workdir_lock.WorkdirLock


def checkpoints_dir(workdir) -> epath.Path:
    return as_path(workdir) / CHECKPOINTS


def train_log(workdir) -> epath.Path:
    return as_path(workdir) / TRAIN_LOG


def read_only_manager(directory) -> ocp.CheckpointManager:
    """A CheckpointManager that reads ``directory`` (``WORKDIR/checkpoints``) and never
    creates, cleans or deletes anything in it (a run may be writing there); close it."""
    # save_interval_steps=0: what read_only implies (Orbax warns when it has to set it).
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           cleanup_tmp_directories=False)
    return ocp.CheckpointManager(os.fspath(directory), options=options, item_names=ITEMS)


def checkpoint_steps(directory) -> list[int]:
    """The complete checkpoints in ``directory`` (Orbax's temporary directories are not
    listed), oldest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def latest_step(workdir) -> int | None:
    """The latest complete checkpoint step of ``workdir``, or None."""
    steps = checkpoint_steps(checkpoints_dir(workdir))
    return steps[-1] if steps else None


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "eval/top1",
                 async_save: bool = True):
        self.directory = as_path(directory)
        self.best_metric = best_metric
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=max(int(keep), 1)),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: float(m[best_metric]), reverse=False, n=1,
                keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict,
             metrics: dict | None = None) -> bool:
        if step in self.manager.all_steps():
            return False
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                     DATA: ocp.args.JsonSave(data_state),
                                     META: ocp.args.JsonSave(meta)})
        saved = self.manager.save(step, args=args, metrics=metrics, force=True)
        if saved:
            log.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of ``step``; ``abstract_state`` is a tree of
        ``jax.ShapeDtypeStruct`` with shardings (where the arrays will be placed)."""
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                     DATA: ocp.args.JsonRestore(), META: ocp.args.JsonRestore()})
        out = self.manager.restore(step, args=args)
        return out[STATE], out[DATA], out[META]

    def restore_meta(self, step: int) -> dict:
        """The ``meta`` item (run config, model config, step) of ``step``."""
        return restore_meta(self.manager, step)

    def restore_latest(self, abstract_state, check_meta: Callable[[dict, int], None]
                       ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest checkpoint that can be read, or None
        when there is none. ``check_meta(meta, step)`` runs before the arrays are read (it
        raises to refuse the resume, e.g. on a changed config). Checkpoints newer than the
        one restored that cannot be read are moved to ``WORKDIR/unreadable_checkpoints/``
        (kept for inspection); when none can be read nothing is moved and InputError says
        why (a code or config mismatch must not discard a run)."""
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # any unreadable file: try the one before
                failed.append((step, e))
                continue
            check_meta(meta, step)
            try:
                state, data, meta = self.restore(step, abstract_state)
            except Exception as e:  # any unreadable file: try the one before
                failed.append((step, e))
                continue
            for bad, e in failed:
                self._set_aside(bad, e)
            return step, state, data, meta
        if failed:
            step, e = failed[0]
            raise InputError(f"no checkpoint in {self.directory} can be restored (steps "
                             f"{[s for s, _ in failed]}); step {step}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}. Move the "
                             "directory away to start afresh, or fix the files")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        dest = self.directory.parent / UNREADABLE / str(step)
        log.warning("checkpoint %s/%d cannot be read (%s: %s); moving it to %s and using the "
                    "one before it", self.directory, step, type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "", dest)
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest.rmtree()
            (self.directory / str(step)).rename(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The ``meta`` item (run config, model config, step) of ``step``."""
    out = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return out[META]


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with shardings, the restore target for ``tree``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


# --------------------------------------------------------------------------------------
# Resume: the saved config against the current one
# --------------------------------------------------------------------------------------


_ABSENT = "(absent)"


def config_changes(saved: dict, current: dict, allowed) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes between two JSON configs, each ``'field: old -> new'``
    with dotted field names; a field matches ``allowed`` exactly or by its section
    (``'data.num_parallel_calls'``, or ``'mesh'`` for every mesh field)."""
    a, b = flatten_dict(saved), flatten_dict(current)
    refused, ok = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old == new:
            continue
        line = f"config.{key}: {old!r} -> {new!r}"
        parts = key.split(".")
        if any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1)):
            ok.append(line)
        else:
            refused.append(line)
    return refused, ok


def check_resume_config(saved_meta: dict, current: dict, allowed, directory, step: int) -> None:
    """Raise ConfigError listing every changed field outside ``allowed``."""
    saved = saved_meta.get("config") if isinstance(saved_meta, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{directory}/{step}: the checkpoint has no saved config (meta item); "
                          "it was not written by this trainer")
    refused, ok = config_changes(saved, current, allowed)
    for line in ok:
        log.info("resume: %s (allowed)", line)
    if refused:
        raise ConfigError(
            f"the run in {directory} (step {step}) was started with another config; resuming "
            f"it would silently change: {'; '.join(refused)}. Use the saved values (see "
            f"{directory}/{step}/meta) or a new --workdir. Changeable on resume: "
            f"{', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------------------
# A fresh start never replaces another run's files
# --------------------------------------------------------------------------------------

RUN_FILES = ("metrics.jsonl", "tensorboard", "train.log")
RUN_CONFIG = "run_config.json"  # the config of the run that made the run files


def other_run_files(workdir, config_json: dict, allowed) -> list[str]:
    """The run files (``metrics.jsonl``, ``tensorboard/``, ``train.log``) in ``workdir``
    that a fresh start (no checkpoint to resume) would replace and that are not this
    run's own: [] when there are none, or when ``WORKDIR/run_config.json`` says they were
    made by the same config (this run, killed before its first checkpoint: the same
    command starts it again, as always)."""
    path = as_path(workdir)
    metrics = path / "metrics.jsonl"
    if not _exists_nonempty(metrics) and not (path / "tensorboard").exists():
        return []
    found = [n + ("/" if n == "tensorboard" else "") for n in RUN_FILES if (path / n).exists()]
    try:
        saved = json.loads((path / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return found
    refused, _ = config_changes(saved, config_json, allowed)
    return found if refused else []


def _exists_nonempty(path: epath.Path) -> bool:
    try:
        return path.exists() and path.stat().length > 0
    except OSError:
        return False


def check_fresh_workdir(workdir, config_json: dict, *, overwrite: bool, allowed) -> None:
    """Before a run starts from scratch in ``workdir``: refuse (ConfigError, exit 2) when it
    holds another run's files (naming them) unless ``overwrite``; then record this run's
    config in ``WORKDIR/run_config.json``. Process 0 looks; every process stops with it."""
    found = [] if overwrite or jax.process_index() else other_run_files(workdir, config_json,
                                                                        allowed)
    message = (f"--workdir {workdir} holds another run's files ({', '.join(found)}) but no "
               "checkpoint to resume: starting here would replace them. Use another "
               "--workdir, or pass --config.overwrite=True to start over in this one")
    if jax.process_count() > 1:
        parallel.check_processes(config_json, ok=not found, problem=message if found else
                                 "process 0 found another run's files in the workdir")
    if found:
        raise ConfigError(message)
    if jax.process_index() == 0:
        as_path(workdir).mkdir(parents=True, exist_ok=True)
        with atomic_output(as_path(workdir) / RUN_CONFIG) as tmp, as_path(tmp).open("w") as f:
            json.dump(config_json, f, indent=1)


@contextlib.contextmanager
def claim_workdir(workdir, config_json: dict):
    """For the duration of the block, process 0 holds ``WORKDIR/lock``; before it starts,
    every process checks that all of them run the same config and that process 0 got the
    lock (so that no process trains alone)."""
    lock = workdir_lock.WorkdirLock(workdir)
    lock_error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as e:  # WorkdirLockedError, or the storage refused the lock file
            lock_error = e
    try:
        try:
            parallel.check_processes(config_json, ok=lock_error is None,
                                     problem="process 0 could not take the workdir lock")
        except ConfigError:
            if lock_error is None:
                raise
        if lock_error is not None:
            raise lock_error
        yield
    finally:
        lock.release()
