"""Issue 23: reliability, second round. One section per class of docs/reliability.md:

* the workdir lock under concurrent take-overs of a stale lock (processes released by a
  barrier, locally; threads on an object store), and empty / unreadable lock files;
* a full disk, a quota or a permission error during any training write -> exit 4, one line
  naming the path and the fix, and the rerun resumes with nothing lost;
* SIGHUP (a closed terminal) handled as SIGTERM;
* a second Ctrl-C: exit 130 with the project's own message;
* messages in the project's words (not an image file);
* inputs that are not numbers refused.
"""

import json
import multiprocessing
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stale_record(pid: int) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": pid, "started": 0})


# ---------------------------------------------------------------------------------------
# The workdir lock: exactly one owner under any interleaving
# ---------------------------------------------------------------------------------------


def _contender(workdir, rounds, barrier, results, index):
    """One run starting on ``workdir`` in each round, at the same moment as the others."""
    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.train.checkpoints import WorkdirLock

    for r in range(rounds):
        barrier.wait()  # the stale lock is in place: go
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
            won = True
        except WorkdirLockedError:
            won = False
        results.put((r, index, won))
        barrier.wait()  # every contender has tried; the owners still hold the lock
        lock.release()
        barrier.wait()  # released before the next round's stale lock is written


@pytest.mark.parametrize("contenders", [2, 3])
def test_simultaneous_takeovers_of_a_stale_lock_have_one_owner(tmp_path, contenders):
    rounds = 100
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(contenders + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), rounds, barrier, results, i),
                         daemon=True) for i in range(contenders)]
    for p in procs:
        p.start()
    stale = _stale_record(_dead_pid())
    owners = []
    try:
        for _ in range(rounds):
            (tmp_path / "lock").write_text(stale)  # left by a run killed with kill -9
            barrier.wait(timeout=120)
            barrier.wait(timeout=120)
            won = [results.get(timeout=60) for _ in range(contenders)]
            owners.append(sum(w for _, _, w in won))
            barrier.wait(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert owners == [1] * rounds, (f"rounds with {contenders} simultaneous take-overs and "
                                    f"not exactly one owner: {sum(o != 1 for o in owners)} "
                                    f"(owners per round: {owners})")
    assert not (tmp_path / "lock").exists()


def test_lock_is_held_by_the_os_and_dies_with_its_process(tmp_path):
    """A run killed with kill -9 leaves its file, and the next run takes it over at once;
    a run that is alive keeps it, whatever its file says."""
    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.train.checkpoints import WorkdirLock

    code = ("import sys, time; from deepvit_jax.train.checkpoints import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError, match=f"pid {p.pid} on host"):
            WorkdirLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == p.pid  # left behind
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_empty_or_unreadable_lock_file(tmp_path, caplog):
    """An empty lock file (a run killed between creating and writing it) has its own
    message: taken over at once locally when no process holds it, refused while one does
    (the run is starting)."""
    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.train.checkpoints import WorkdirLock

    for content in ("", '{"host": "x", "pi'):
        (tmp_path / "lock").write_text(content)
        lock = WorkdirLock(tmp_path)
        with caplog.at_level("WARNING"):
            lock.acquire()  # no process holds it: stale, whatever its age
        assert "no process holds it" in caplog.text and "killed while creating it" in caplog.text
        caplog.clear()
        lock.release()
    # A run that has created (and locked) the file but not yet written its record.
    import fcntl

    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(tmp_path).acquire()
    finally:
        os.close(fd)
    msg = str(e.value)
    assert "is in use by a run that is starting" in msg and "is empty" in msg
    assert "pid ?" not in msg and "1970" not in msg


@pytest.fixture
def ram_scheme(monkeypatch):
    """``ram://`` (TensorFlow's in-memory filesystem) routed through etils.epath's
    tf.io.gfile backend, as ``gs://`` is (see tests/test_reliability.py)."""
    import uuid

    from etils.epath import backend, gpath, register

    monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "ram://"))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
    yield f"ram://bucket-{uuid.uuid4().hex[:8]}/run"


@pytest.mark.parametrize("contenders", [2, 3])
def test_object_store_takeovers_have_one_owner(ram_scheme, monkeypatch, contenders):
    """On an object store (no OS locks): runs starting together on a stale lock, threads
    released by a barrier; exactly one keeps the lock in every round."""
    import tensorflow as tf

    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.train.checkpoints import WorkdirLock

    monkeypatch.setattr(WorkdirLock, "SETTLE_S", 0.3, raising=False)
    rounds = 15
    stale = _stale_record(_dead_pid())
    barrier = threading.Barrier(contenders)
    owners = []
    for _ in range(rounds):
        with tf.io.gfile.GFile(f"{ram_scheme}/lock", "w") as f:
            f.write(stale)
        won = []

        def run(won=won):
            lock = WorkdirLock(ram_scheme)
            barrier.wait()
            try:
                lock.acquire()
                won.append(lock)
            except WorkdirLockedError:
                pass

        threads = [threading.Thread(target=run) for _ in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        owners.append(len(won))
        for lock in won:
            lock.release()
    assert owners == [1] * rounds, owners


def test_object_store_empty_lock_waits_for_its_grace_period(ram_scheme, monkeypatch):
    import tensorflow as tf

    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.train.checkpoints import WorkdirLock

    monkeypatch.setattr(WorkdirLock, "SETTLE_S", 0.0, raising=False)
    tf.io.gfile.makedirs(ram_scheme)
    with tf.io.gfile.GFile(f"{ram_scheme}/lock", "w") as f:
        f.write("")
    monkeypatch.setattr(WorkdirLock, "_age", lambda self: 3.0)  # younger than the grace
    with pytest.raises(WorkdirLockedError) as e:
        WorkdirLock(ram_scheme).acquire()
    assert "is in use by a run that is starting" in str(e.value) and "3 s old" in str(e.value)
    monkeypatch.setattr(WorkdirLock, "_age", lambda self: WorkdirLock.UNREADABLE_STALE_S + 1)
    lock = WorkdirLock(ram_scheme)
    lock.acquire()
    with tf.io.gfile.GFile(f"{ram_scheme}/lock") as f:
        assert json.loads(f.read())["pid"] == os.getpid()
    lock.release()
    assert not tf.io.gfile.exists(f"{ram_scheme}/lock")
