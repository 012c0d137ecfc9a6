"""The workdir lock, ``WORKDIR/lock``: one run per training workdir (:class:`WorkdirLock`).

The lock file holds the JSON record ``{host, pid, started, token}`` of the run that owns the
workdir. Locally it is an OS lock (``fcntl.flock``) held for the whole run, so a file left by a
dead run is taken over at once; on an object store (``gs://``), which has no OS locks, the
record is written, read back after a settling time and kept only if it is still this run's,
with a grace period for an empty or unreadable record (the take-over policy is described in
:class:`WorkdirLock`). Process 0 holds it for the whole run (``workdir.claim_workdir``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import uuid

from deepvit_jax.errors import WorkdirLockedError
from deepvit_jax.utils import _exists, as_path, is_local

log = logging.getLogger(__name__)

LOCK = "lock"  # WORKDIR/lock (the workdir layout, workdir.py, names it from here)


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


