"""The training workdir, the one module that knows its layout::

    WORKDIR/
      checkpoints/<step>/{state,data,meta}   Orbax CheckpointManager (CHECKPOINTS, ITEMS)
      unreadable_checkpoints/<step>/         checkpoints set aside on resume (UNREADABLE)
      metrics.jsonl  tensorboard/            train.reporting.MetricWriter (METRICS, TENSORBOARD)
      train.log                              the run's log (TRAIN_LOG)
      lock                                   WorkdirLock (LOCK)
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

:class:`WorkdirLock` keeps a second run off a workdir in use (``WORKDIR/lock``). A run
that starts from scratch (no checkpoint) refuses a workdir holding another run's
``metrics.jsonl`` / ``tensorboard/`` unless ``config.overwrite`` (:func:`check_fresh_workdir`).

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
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from deepvit_jax import parallel
from deepvit_jax.errors import ConfigError, InputError, WorkdirLockedError
from deepvit_jax.utils import _exists, as_path, atomic_output, flatten_dict, is_local

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
UNREADABLE = "unreadable_checkpoints"
STATE, DATA, META = "state", "data", "meta"
ITEMS = (STATE, DATA, META)  # the Orbax items of every checkpoint
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TRAIN_LOG = "train.log"
LOCK = "lock"


def checkpoints_dir(workdir) -> epath.Path:
    return as_path(workdir) / CHECKPOINTS


def train_log(workdir) -> epath.Path:
    return as_path(workdir) / TRAIN_LOG


def read_only_manager(directory) -> ocp.CheckpointManager:
    """A CheckpointManager that reads ``directory`` (``WORKDIR/checkpoints``) and never
    creates, cleans or deletes anything in it (a run may be writing there); close it."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
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
# The workdir lock
# --------------------------------------------------------------------------------------


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WorkdirLock:
    """``WORKDIR/lock``: JSON ``{host, pid, started, token}`` of the run that owns the workdir.

    Taken by process 0 before anything in the workdir is touched (Orbax's start-up cleanup
    would otherwise delete another run's in-flight save) and removed at exit. A second run
    is refused (:class:`~deepvit_jax.errors.WorkdirLockedError`, exit status 3) with a
    message naming the owner and the file.

    Locally the lock is an OS lock (``fcntl.flock``) on that file, held for the whole run:
    the kernel grants it to exactly one open file at a time and drops it when its process
    dies (``kill -9`` included), so a file left by a dead run is taken over with a warning,
    however many runs start at once. (A file-existence protocol cannot do this: two runs
    that both judge one stale file and both replace it can both end up owning the
    workdir.) A file holding a record of another host is refused even when it is not
    locked (its run may live on a filesystem whose locks do not reach this host): delete
    it if that run is gone.

    Object stores (``gs://``) have no OS locks and no exclusive create in this layer: the
    record is written, read back after ``SETTLE_S`` seconds and kept only if it is still
    this run's (of several runs writing within that time the last one wins and the others
    are refused); a stale record is first moved aside to a unique name. An empty or
    unreadable record there is taken for a run that is still starting until it is
    ``UNREADABLE_STALE_S`` seconds old, then taken over as a run killed while creating it.
    """

    UNREADABLE_STALE_S = 10.0  # object stores: grace of an empty / unreadable lock file
    SETTLE_S = 2.0  # object stores: time between writing the record and reading it back

    def __init__(self, workdir):
        self.path = as_path(workdir) / LOCK
        self.held = False
        self._fd: int | None = None
        self._token = ""

    # -- messages ----------------------------------------------------------------------

    def _in_use(self, raw: str, owner: dict | None, age: float | None = None
                ) -> WorkdirLockedError:
        if owner is None:
            state = ("is empty" if not raw.strip() else "cannot be read as a lock record")
            how_old = "" if age is None else f", {age:.0f} s old"
            return WorkdirLockedError(
                f"{self.path.parent} is in use by a run that is starting (its lock file "
                f"{self.path} {state}{how_old}): wait for it, or use another --workdir; if no "
                f"run uses this workdir, delete {self.path}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        return WorkdirLockedError(
            f"{self.path.parent} is in use by another run (pid {owner.get('pid', '?')} on "
            f"host {owner.get('host', '?')}, since {since}): wait for it to finish, or use "
            f"another --workdir; if that run is gone, delete {self.path}")

    @staticmethod
    def _parse(raw: str) -> dict | None:
        try:
            owner = json.loads(raw)
        except ValueError:
            return None
        ok = isinstance(owner, dict) and isinstance(owner.get("host"), str)
        return owner if ok else None

    # -- acquire / release -------------------------------------------------------------

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "token": uuid.uuid4().hex}
        self._token = me["token"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if is_local(self.path):
            try:
                import fcntl
            except ImportError:  # no OS file locks (Windows)
                fcntl = None
            if fcntl is not None and self._acquire_local(me, fcntl):
                return
        self._acquire_shared(me)

    def _acquire_local(self, me: dict, fcntl) -> bool:
        """Take the OS lock of ``self.path``; False when the filesystem has no locks."""
        path = os.fspath(self.path)
        while True:
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:  # removed meanwhile: start again
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live run holds it
                raw = _read_fd(fd)
                os.close(fd)
                raise self._in_use(raw, self._parse(raw)) from None
            except OSError as e:  # ENOLCK / EOPNOTSUPP: a filesystem without locks
                os.close(fd)
                log.warning("workdir lock %s: this filesystem has no file locks (%s); using "
                            "the object-store protocol", path, e)
                return False
            # A run that releases the lock unlinks the file before unlocking it: the file
            # locked here must still be the one at ``path``, or start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        raw = _read_fd(fd)
        owner = self._parse(raw)
        if raw.strip() and owner is not None and owner["host"] != me["host"]:
            os.close(fd)
            raise self._in_use(raw, owner)
        if raw.strip():
            if owner is None:
                log.warning("workdir lock %s is unreadable (%r...) and no process holds it "
                            "(a run killed while creating it): taking it over", path, raw[:40])
            else:
                log.warning("workdir lock %s: its run (pid %s on this host) is gone; taking "
                            "it over", path, owner.get("pid", "?"))
        elif not created:
            log.warning("workdir lock %s is empty and no process holds it (a run killed "
                        "while creating it): taking it over", path)
        data = json.dumps(me).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        self._fd, self.held = fd, True
        return True

    def _acquire_shared(self, me: dict) -> None:
        text = json.dumps(me)
        if _exists(self.path):
            raw = self._read()
            owner = self._parse(raw)
            if owner is None:
                age = self._age()
                if age <= self.UNREADABLE_STALE_S:
                    raise self._in_use(raw, None, age)
                log.warning("workdir lock %s is empty or unreadable and %.0f s old (more than "
                            "%.0f s: a run killed while creating it): taking it over",
                            self.path, age, self.UNREADABLE_STALE_S)
            elif owner["host"] == me["host"] and isinstance(owner.get("pid"), int) \
                    and not _pid_alive(owner["pid"]):
                log.warning("workdir lock %s: its run (pid %d on this host) is gone; taking "
                            "it over", self.path, owner["pid"])
            else:
                raise self._in_use(raw, owner)
            # Move the stale record aside under a unique name (of several runs taking it
            # over, one moves it), then check that nothing newer replaced it meanwhile.
            aside = self.path.parent / f"lock.stale-{me['token']}"
            try:
                self.path.rename(aside)
                aside.unlink(missing_ok=True)
            except Exception:  # already moved by another run: judge what is there now
                pass
            if _exists(self.path):
                raw = self._read()
                raise self._in_use(raw, self._parse(raw), self._age())
        # No exclusive create on an object store: of the runs that wrote within SETTLE_S,
        # the last write is the one read back, and only its run keeps the lock. A read-back
        # that finds no record at all (a late take-over moved ours aside, or a write in
        # flight is seen empty) says nothing of who won: write again, so that a round of
        # simultaneous take-overs never ends with every run refused.
        for attempt in range(3):
            self.path.write_text(text)
            time.sleep(self.SETTLE_S * (1 + random.random() * attempt))
            raw = self._read()
            if raw == text:
                self.held = True
                return
            if raw.strip():
                break  # another run's record (or one being written): that run keeps it
            log.info("workdir lock %s: the record written was gone when read back; "
                     "writing it again", self.path)
        raise self._in_use(raw, self._parse(raw), self._age())

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except Exception:  # gone meanwhile, or unreadable
            return ""

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().mtime
        except Exception:
            return 0.0

    def owner(self) -> dict:
        """The JSON of the run holding the lock ({} when there is none or it is unreadable)."""
        return self._parse(self._read()) or {}

    def take_over_from_other_host(self) -> str | None:
        """Remove a lock of another host (the host of a runtime that is gone, e.g. a Colab
        runtime that disconnected and never removed it); returns that host, or None when
        there was no such lock. Only for setups with one runtime per workdir: another
        host's lock cannot be checked for liveness, which is why :meth:`acquire` refuses it."""
        host = self.owner().get("host")
        if not host or host == socket.gethostname():
            return None
        self.path.unlink(missing_ok=True)
        return str(host)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self._fd is not None:
                # Unlink while still locked; a run that locks the old file meanwhile sees
                # that it is gone and starts again (see _acquire_local).
                os.unlink(os.fspath(self.path))
            elif (self._parse(self._read()) or {}).get("token") == self._token:
                self.path.unlink(missing_ok=True)  # only this run's own record
        except OSError as e:
            log.warning("could not remove the workdir lock %s: %s", self.path, e)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _read_fd(fd: int) -> str:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


@contextlib.contextmanager
def claim_workdir(workdir, config_json: dict):
    """For the duration of the block, process 0 holds ``WORKDIR/lock``; before it starts,
    every process checks that all of them run the same config and that process 0 got the
    lock (so that no process trains alone)."""
    lock = WorkdirLock(workdir)
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
