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
import re
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import types

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
    from deepvit_jax.workdir_lock import WorkdirLock

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
    from deepvit_jax.workdir_lock import WorkdirLock

    code = ("import sys, time; from deepvit_jax.workdir_lock import WorkdirLock; "
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
    from deepvit_jax.workdir_lock import WorkdirLock

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


@pytest.mark.parametrize("contenders", [2, 3])
def test_object_store_takeovers_have_one_owner(ram_scheme, monkeypatch, contenders):
    """On an object store (no OS locks): runs starting together on a stale lock, threads
    released by a barrier; exactly one keeps the lock in every round."""
    import tensorflow as tf

    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.workdir_lock import WorkdirLock

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
            except Exception as error:  # anything else fails the test
                won.append(error)

        threads = [threading.Thread(target=run) for _ in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not [e for e in won if isinstance(e, Exception)], won
        owners.append(len(won))
        for lock in won:
            lock.release()
    assert owners == [1] * rounds, owners


def test_object_store_lock_written_again_when_its_record_vanished(ram_scheme, monkeypatch):
    """A late take-over moved this run's fresh record aside before it was read back (the
    read-back finds none): the run writes it again instead of being refused, so that a
    round never ends with no owner; another run's record read back still refuses."""
    from deepvit_jax import workdir_lock
    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.workdir_lock import WorkdirLock

    monkeypatch.setattr(WorkdirLock, "SETTLE_S", 0.05, raising=False)
    lock = WorkdirLock(ram_scheme)
    sleeps = []

    def sleep(s, vanish=[True]):  # noqa: B006 -- once
        sleeps.append(s)
        if vanish and vanish.pop():
            lock.path.unlink()

    def with_sleep(fake):  # the module workdir_lock sees as ``time``, its sleep faked
        return types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)
                                        if not k.startswith("_")} | {"sleep": fake})

    monkeypatch.setattr(workdir_lock, "time", with_sleep(sleep))
    lock.acquire()
    assert lock.held and len(sleeps) == 2 and lock.owner()["pid"] == os.getpid()
    lock.release()

    other = WorkdirLock(ram_scheme)
    sleeps.clear()

    def sleep_other_wins(s):
        sleeps.append(s)
        other.path.write_text(json.dumps({"host": "elsewhere", "pid": 7, "started": 0}))

    monkeypatch.setattr(workdir_lock, "time", with_sleep(sleep_other_wins))
    with pytest.raises(WorkdirLockedError, match="host elsewhere"):
        other.acquire()
    assert len(sleeps) == 1


def test_object_store_empty_lock_waits_for_its_grace_period(ram_scheme, monkeypatch):
    import tensorflow as tf

    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.workdir_lock import WorkdirLock

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


# ---------------------------------------------------------------------------------------
# Training runs: a full disk (exit 4, then an exact resume) and SIGHUP (saved, exit 0)
# ---------------------------------------------------------------------------------------

RUN = ["--config.model.embed_dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
       "--config.model.reattn_blocks=(0,1)", "--config.batch_size=32",
       "--config.log_every_steps=1", "--config.eval.every_steps=4",
       "--config.eval.batch_size=40", "--config.checkpoint.every_steps=2",
       "--config.data.shuffle_buffer=64", "--config.total_steps=8"]


def _train_cmd(workdir, data_dir, entry=("-m", "deepvit_jax.main")):
    return [sys.executable, *entry, f"--config={DEFAULT}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *RUN]


def _train_env(**extra):
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", **extra)
    return env


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
    """The 8-step run, uninterrupted: (final step, final state, metrics rows)."""
    from test_main import _final_state, _metrics

    wd = tmp_path_factory.mktemp("reference")
    r = subprocess.run(_train_cmd(wd, data_dir), cwd=ROOT, env=_train_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return (*_final_state(wd), _metrics(wd))


def _same_run(workdir, reference_run):
    from test_main import _final_state, _metrics

    ref_step, ref_state, ref_rows = reference_run
    step, state = _final_state(workdir)
    assert step == ref_step == 8 and set(state) == set(ref_state)
    for k in ref_state:
        np.testing.assert_array_equal(state[k], ref_state[k], err_msg=k)
    rows = _metrics(workdir)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval/top1" in r] == [4, 8]
    want = {(r["step"], k): v for r in ref_rows for k, v in r.items()
            if k in ("train/loss", "eval/top1")}
    got = {(r["step"], k): v for r in rows for k, v in r.items() if (r["step"], k) in want}
    assert got == want


def _can_mount_tmpfs() -> bool:
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


FULL_DISK = """
set -u
mount -t tmpfs -o size=1m tmpfs "$WD"
"$@" > "$OUT/out1" 2> "$OUT/err1"; echo $? > "$OUT/rc1"
mount -o remount,size=64m "$WD"   # space freed: the same command again
"$@" > "$OUT/out2" 2> "$OUT/err2"; echo $? > "$OUT/rc2"
cp -a "$WD/." "$OUT/workdir"
"""


@pytest.mark.slow
def test_full_disk_during_training_exits_4_and_the_rerun_loses_nothing(tmp_path, data_dir,
                                                                        reference_run):
    """A real filesystem that fills up (a 1 MiB tmpfs in a user+mount namespace): the first
    checkpoints fit, a later save (Orbax's async save: TensorStore's RESOURCE_EXHAUSTED) or
    a metrics / log write does not. Exit 4, one line naming the workdir and the fix; the
    same command on the enlarged filesystem completes with the uninterrupted run's state."""
    if not _can_mount_tmpfs():
        pytest.skip("unprivileged user + mount namespaces are not available (unshare)")
    wd, out = tmp_path / "wd", tmp_path / "out"
    wd.mkdir()
    out.mkdir()
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", FULL_DISK,
           "full_disk", *_train_cmd(wd, data_dir)]
    subprocess.run(cmd, cwd=ROOT, env=_train_env(WD=str(wd), OUT=str(out)), timeout=900,
                   check=True)
    rc1, err1 = int((out / "rc1").read_text()), (out / "err1").read_text()
    assert rc1 == 4, err1[-3000:]
    last = err1.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device writing "), last
    assert str(wd) in last and "run the same command again" in last
    assert "Traceback" not in err1 and "Logging error" not in err1, err1[-3000:]
    assert int((out / "rc2").read_text()) == 0, (out / "err2").read_text()[-3000:]
    _same_run(out / "workdir", reference_run)


@pytest.mark.slow
def test_sighup_saves_and_resumes_like_sigterm(tmp_path, data_dir, reference_run):
    """The terminal closes (SIGHUP) after step 3: the run saves step 3 and exits 0; the
    same command then completes with the uninterrupted run's state."""
    wd = tmp_path / "run"
    p = subprocess.Popen(_train_cmd(wd, data_dir, [str(ROOT / "tests" / "pausing_main.py")]),
                         cwd=ROOT, env=_train_env(PAUSE_AT_STEP="3"), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         # as from a terminal: a test runner may run with SIGHUP ignored
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    from test_main import _wait_for

    _wait_for(wd / "paused_at_3", p)
    assert not (wd / "checkpoints" / "3").exists()
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert (wd / "checkpoints" / "3").is_dir()
    assert "SIGHUP received (the terminal closed): saving a checkpoint" in (
        wd / "train.log").read_text()
    r = subprocess.run(_train_cmd(wd, data_dir), cwd=ROOT, env=_train_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(wd, reference_run)


def test_sighup_ignored_by_nohup_stays_ignored():
    from deepvit_jax.train.reporting import Preemption

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with Preemption():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup: train on
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with Preemption() as p:
            assert signal.getsignal(signal.SIGHUP) == p._handler
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, old)


# ---------------------------------------------------------------------------------------
# Storage failures wherever they surface: exit 4, one line naming the path
# ---------------------------------------------------------------------------------------

# Verbatim: what Orbax's async save raises when TensorStore finds the disk full.
TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file '
    '"/w/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
    'Failed writing: "/w/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/'
    'ocdbt.process_0/d/4c80": Failed to write 848253 bytes to file 4: No space left on '
    "device [os_error_code='28']")


def test_storage_failures_exit_4_with_one_line(capsys):
    import errno

    from deepvit_jax import cli, errors

    cases = [
        (ValueError(TENSORSTORE_FULL), "no space left on the device", "/w/checkpoints/4"),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/w/metrics.jsonl"),
         "disk quota exceeded", "/w/metrics.jsonl"),
        (OSError(errno.EROFS, "Read-only file system", "/w/x"), "read-only filesystem", "/w/x"),
        (RuntimeError("saving failed"), "no space left on the device", "/w/y"),
    ]
    try:  # an error wrapping an OSError (raise ... from e)
        raise RuntimeError("saving failed") from OSError(errno.ENOSPC, "No space", "/w/y")
    except RuntimeError as e:
        cases[-1] = (e, *cases[-1][1:])
    for exc, problem, path in cases:
        def body(exc=exc):
            raise exc
        assert cli.run_cli(body) == 4, exc
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {problem}"), err
        assert path in err and "free space" in err, err
    # Device memory is not a disk: XLA's RESOURCE_EXHAUSTED out-of-memory stays a bug.
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0G")
    assert errors.exit_code(oom) == -1


def test_train_log_on_a_full_disk_raises_once(tmp_path):
    """train.log written to a full device (/dev/full: every write fails with ENOSPC)."""
    import logging

    from deepvit_jax import errors
    from deepvit_jax.console import LogFile

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    (tmp_path / "train.log").symlink_to("/dev/full")
    handler = LogFile(tmp_path / "train.log")
    logger = logging.getLogger("test_train_log_full")
    logger.addHandler(handler)
    try:
        with pytest.raises(OSError) as info:
            logger.warning("a row")
        assert errors.exit_code(info.value) == errors.EXIT_IO
        assert re.search(r"no space left on the device .*train\.log.*: free space",
                         errors.storage_message(info.value)), errors.storage_message(info.value)
        logger.warning("another row")  # written no more, raised once
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_only_the_closed_loop_echoes_of_a_failed_save_are_dropped(tmp_path):
    """What Orbax's failed async save leaves behind (asyncio_utils.run_sync closes its loop
    at the first failure): TensorStore writes still in flight call back into the closed
    loop, and each reports an unraisable "Event loop is closed" from a TensorStore thread,
    which Python prints as a traceback. Reproduced with real TensorStore writes: those
    reports are dropped; any other unraisable exception reaches the previous hook."""
    import asyncio
    import time

    import tensorstore as ts

    from deepvit_jax import console

    async def save():
        t = await ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                          "path": str(tmp_path / "a")}},
                          create=True, delete_existing=True, dtype=ts.float32,
                          shape=[4000, 4000],
                          chunk_layout=ts.ChunkLayout(chunk_shape=[100, 100]))
        writes = [t[i * 100:(i + 1) * 100].write(np.ones((100, 4000), np.float32))
                  for i in range(40)]

        async def disk_full():
            await asyncio.sleep(0)
            raise OSError(28, "No space left on device")
        await asyncio.gather(disk_full(), *writes)

    def failed_save():
        loop = asyncio.new_event_loop()
        with pytest.raises(OSError):
            loop.run_until_complete(save())
        loop.close()
        time.sleep(2)  # the writes in flight complete and call back

    class Bug:
        def __del__(self):
            raise KeyError("a real bug")

    seen = []
    before = sys.unraisablehook
    try:
        sys.unraisablehook = seen.append
        failed_save()  # without the filter: the echoes are reported
        echoes = [u for u in seen if console._closed_loop_echo(u)]
        assert echoes and len(echoes) == len(seen), [str(u.exc_value) for u in seen]
        seen.clear()
        console.quiet_closed_loop_echoes()
        console.quiet_closed_loop_echoes()  # once
        failed_save()
        Bug()
    finally:
        sys.unraisablehook = before
    assert [(u.exc_type, str(u.exc_value)) for u in seen] == [(KeyError, "'a real bug'")]


# ---------------------------------------------------------------------------------------
# A second Ctrl-C: exit 130 with the project's words
# ---------------------------------------------------------------------------------------


def _map_fn(x):  # traced by AutoGraph (tf.data), as the input pipeline's functions are
    os.kill(os.getpid(), signal.SIGINT)
    return x * 2


def test_second_ctrl_c_inside_traced_code_says_aborted(capsys):
    """The second SIGINT lands while TensorFlow traces the input pipeline: AutoGraph
    re-raises it with its 'in user code:' trace in front; the line is still ours."""
    import tensorflow as tf

    from deepvit_jax import cli
    from deepvit_jax.train.reporting import Preemption

    before = signal.getsignal(signal.SIGINT)
    with Preemption() as p:
        p.flag, p.signal_name = True, "SIGINT"  # the first Ctrl-C arrived

        def body():
            tf.data.Dataset.range(3).map(_map_fn)

        assert cli.run_cli(body) == 130
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: SIGINT received again while stopping after SIGINT: aborted")
    assert "in user code" not in err and "File " not in err


# ---------------------------------------------------------------------------------------
# Inputs in the project's words, and inputs that are not numbers
# ---------------------------------------------------------------------------------------

from test_predict import model_dir  # noqa: E402,F401  (a small 1000-class model directory)


def test_empty_or_non_image_file_is_not_an_image_file(model_dir, tmp_path, capsys):  # noqa: F811
    from deepvit_jax import predict

    for name, content in (("empty.png", b""), ("notes.jpg", b"shopping list"),
                          ("cut.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")):
        path = tmp_path / name
        path.write_bytes(content)
        assert predict.main(["--checkpoint", str(model_dir), str(path)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not an image file"), err
        for leak in ("function_node", "{{", "[Op:", "job:localhost", "Traceback"):
            assert leak not in err, err


def test_arrays_that_are_not_numbers_are_refused(model_dir, tmp_path, capsys):  # noqa: F811
    from deepvit_jax import predict

    good = np.zeros((3, 32, 32, 3), np.float32)
    cases = {"nan.npy": good.copy(), "inf.npy": good.copy(), "text.npy": np.full(
        (1, 32, 32, 3), "a"), "ints.npy": good.astype(np.int64),
        "complex.npy": good.astype(np.complex64)}
    cases["nan.npy"][1, 4, 4, 0] = np.nan
    cases["inf.npy"][2, 0, 0, 2] = -np.inf
    for name, arr in cases.items():
        np.save(tmp_path / name, arr)
        out = tmp_path / "logits.npy"
        assert predict.main(["--checkpoint", str(model_dir), str(tmp_path / name),
                             "--output", str(out)]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "" and not out.exists(), (name, captured.out)  # no results
        assert captured.err.count("\n") == 1 and str(tmp_path / name) in captured.err
    assert "image 1 (of 3) holds NaN or inf" in _err_of(predict, model_dir, tmp_path / "nan.npy",
                                                        capsys)
    assert "image 2 (of 3) holds NaN or inf" in _err_of(predict, model_dir, tmp_path / "inf.npy",
                                                        capsys)


def _err_of(predict, model_dir, path, capsys):  # noqa: F811
    predict.main(["--checkpoint", str(model_dir), str(path)])
    return capsys.readouterr().err
