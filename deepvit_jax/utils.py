"""Small helpers that several modules share, each in one place."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import jax
from etils import epath

from deepvit_jax.errors import OutputInUseError


def path_str(path, sep: str = "/") -> str:
    """The keys of a pytree path (``jax.tree_util`` keys or a plain tuple) joined by ``sep``;
    attribute accessors such as NNX's ``.value`` are dropped."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(getattr(k, "key", k)))
    return sep.join(parts)


def flatten_dict(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{'a.b.c': leaf}`` (dotted keys)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten_dict(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def is_local(path) -> bool:
    """True for a local path, False for a URL (``gs://bucket/run``, ``s3://...``)."""
    return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """The one filesystem layer of every run path (workdir, checkpoints, metrics, model
    directories): an ``etils.epath.Path`` (the layer Orbax uses; ``gs://`` goes through
    ``tf.io.gfile`` or fsspec). Local paths are made absolute (``~`` expanded); URLs are
    kept as they are (``os.path.abspath`` would turn ``gs://b/x`` into ``./gs:/b/x``)."""
    text = os.fspath(path)
    if is_local(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    return epath.Path(text)


def _remove(path: epath.Path) -> None:
    if is_local(path):
        local = os.fspath(path)
        if os.path.isdir(local) and not os.path.islink(local):
            shutil.rmtree(local, ignore_errors=True)
        elif os.path.lexists(local):
            os.remove(local)
    else:
        try:
            if path.is_dir():
                path.rmtree()
            elif path.exists():
                path.unlink()
        except FileNotFoundError:  # an object store's directory vanishes with its last object
            pass


def _exists(path: epath.Path) -> bool:
    return os.path.lexists(os.fspath(path)) if is_local(path) else path.exists()


def _move(src: epath.Path, dst: epath.Path) -> None:
    """Rename on an object store: objects have no directories to rename, so a directory is
    moved object by object (each a copy + delete, as ``gsutil mv`` does), then removed."""
    if not src.is_dir():
        src.replace(dst)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        _move(child, dst / child.name)
    _remove(src)


# --------------------------------------------------------------------------------------
# Claimed, atomic outputs
# --------------------------------------------------------------------------------------

# Every temporary name and output lock carries this marker; nothing without it is removed.
PARTIAL_MARKER = "deepvit-partial"
LOCK_SUFFIX = ".deepvit-lock"
_TOKEN_RE = "[0-9a-f]{12}"

_claims = threading.local()  # per thread: claimed path -> [depth, token]


def _held() -> dict:
    if not hasattr(_claims, "held"):
        _claims.held = {}
    return _claims.held


def _take_lock(path: epath.Path) -> int:
    """An exclusive ``flock`` on ``PATH.deepvit-lock`` (created beside ``path``); its fd.
    The kernel drops the lock when the process dies (kill -9 included), so a lock file
    left behind is never stale: the next writer takes it. (Hand-written rather than a
    library such as ``filelock``: the workdir lock, ``workdir_lock.WorkdirLock``, already uses
    the same flock-then-check-the-inode scheme and the holder record it writes.)"""
    import fcntl
    import json
    import socket
    import time

    lock = os.fspath(path) + LOCK_SUFFIX
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    for _ in range(20):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                who = f"pid {holder['pid']} on {holder['host']}"
            except (ValueError, KeyError, TypeError, OSError):
                who = "another process"
            os.close(fd)
            raise OutputInUseError(
                f"{path} is being written by another command ({who}; lock {lock}): wait "
                "for it to finish, or write to another path") from None
        try:  # its last holder may have removed the file between our open and flock
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            with contextlib.suppress(OSError):  # best effort: the flock is the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                          "started": time.time()}).encode(), 0)
            return fd
        os.close(fd)
    raise OutputInUseError(f"{path}: could not take {lock} (other writers keep replacing "
                           "it); try again")


def _release_lock(path: epath.Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.fspath(path) + LOCK_SUFFIX)  # removed while still held: see _take_lock
    os.close(fd)


def _agree(token: str, ok: bool, collective: bool) -> tuple[str, bool]:
    """Process 0's (token, ok) on every process of a multi-process write."""
    if not collective or jax.process_count() == 1:
        return token, ok
    import numpy as np
    from jax.experimental import multihost_utils

    words = np.frombuffer(bytes.fromhex(token), np.uint16).astype(np.int32)
    out = np.asarray(multihost_utils.broadcast_one_to_all(
        np.array([int(ok), *words], np.int32)))
    return out[1:].astype(np.uint16).tobytes().hex(), bool(out[0])


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, *, primary: bool = True,
                 collective: bool = False) -> Iterator[str]:
    """Hold output ``path`` for the block: of two commands writing the same output, the
    second fails at once with ``errors.OutputInUseError`` (exit 3) naming the holder, never
    waits. Locally the claim is an ``flock`` on ``PATH.deepvit-lock``, removed on release;
    on an object store (``gs://``) there is no lock (see docs/reliability.md). Re-entrant
    within a thread (``export`` claims its ``--out`` before reading the checkpoint,
    ``save_model`` again when writing). Only the ``primary`` process takes the lock; with
    ``collective`` (every process calls this, a multi-process model save) all learn its
    outcome. Yields a token (12 hex digits) that names this write's temporary files."""
    path = as_path(path)
    key = os.fspath(path)
    held = _held()
    if key in held:
        held[key][0] += 1
        try:
            yield held[key][1]
        finally:
            held[key][0] -= 1
        return
    fd, error = None, None
    if primary and is_local(path):
        try:
            fd = _take_lock(path)
        except OutputInUseError as e:
            error = e
    token, ok = _agree(uuid.uuid4().hex[:12], error is None, collective)
    if error is not None:
        raise error
    if not ok:
        raise OutputInUseError(f"{path} is being written by another command (process 0 "
                               "could not claim it)")
    held[key] = [1, token]
    try:
        yield token
    finally:
        del held[key]
        if fd is not None:
            _release_lock(path, fd)


def _split_name(name: str) -> tuple[str, str]:
    stem, ext = os.path.splitext(name)
    if not stem:  # a dot file, e.g. '.env'
        stem, ext = name, ""
    return stem, ext


def partial_name(path: epath.Path, token: str) -> epath.Path:
    """``NAME.deepvit-partial-<token>[.ext]`` beside ``path``: marked (a user's own
    ``NAME.partial`` is never ours) and unique per write; the extension is kept for writers
    that choose a format by it."""
    stem, ext = _split_name(path.name)
    return path.parent / f"{stem}.{PARTIAL_MARKER}-{token}{ext}"


def leftover_partials(path: epath.Path) -> list[epath.Path]:
    """Temporary copies of ``path`` that killed writers left: exactly the names
    :func:`partial_name` makes (local paths only), nothing else."""
    if not is_local(path):
        return []
    stem, ext = _split_name(path.name)
    pattern = re.compile(re.escape(f"{stem}.{PARTIAL_MARKER}-") + _TOKEN_RE + re.escape(ext)
                         + "$")
    parent = os.fspath(path.parent)
    if not os.path.isdir(parent):
        return []
    return [path.parent / n for n in sorted(os.listdir(parent)) if pattern.match(n)]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, replace: bool = True, primary: bool = True,
                  collective: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write a file or a directory into; on
    success it is renamed onto ``path``, on any error removed, so ``path`` is never
    half-written.

    The output is claimed first (:func:`claim_output`: a second writer of the same ``path``
    fails at once, exit 3). The temporary name is marked and unique,
    ``NAME.deepvit-partial-<12 hex>[.ext]`` (:func:`partial_name`): a user's own files
    (``NAME.partial`` included) are never touched; copies with that marker that killed
    writers left are removed under the claim. ``replace=False`` refuses an existing
    ``path`` (FileExistsError). In a multi-process write (every process saving its shards
    into the same directory, ``collective=True``) only the ``primary`` process claims,
    cleans up and renames.

    Locally the final rename is atomic (``os.replace``; a directory that is replaced is
    removed just before). On an object store (``gs://``) a rename is a copy and a delete per
    object: ``path`` is complete once this returns, but a crash during the rename itself can
    leave a partial ``path`` next to the temporary copy (see docs/reliability.md)."""
    path = as_path(path)
    with claim_output(path, primary=primary, collective=collective) as token:
        if not replace and _exists(path):
            raise FileExistsError(f"{path} already exists")
        tmp = partial_name(path, token)
        if primary:
            for old in leftover_partials(path):
                _remove(old)
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield os.fspath(tmp)
            if primary:
                if _exists(path) and (tmp.is_dir() or not is_local(path)):
                    _remove(path)  # os.replace cannot replace a directory
                if is_local(path):
                    os.replace(tmp, path)
                else:
                    _move(tmp, path)
        except BaseException:
            if primary:
                _remove(tmp)
            raise
