"""Small helpers that several modules share, each in one place."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
from etils import epath


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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, replace: bool = True,
                  primary: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (``path + '.partial'``, as a string) to write a
    file or a directory into; on success it is renamed onto ``path``, on any error removed,
    so ``path`` is never half-written. ``replace=False`` refuses an existing ``path`` before
    anything is written (FileExistsError). In a multi-process write (every process saving
    its shards into the same directory) only the ``primary`` process cleans up and renames.

    Locally the final rename is atomic (``os.replace``; a directory that is replaced is
    removed just before). On an object store (``gs://``) a rename is a copy and a delete per
    object: ``path`` is complete once this returns, but a crash during the rename itself can
    leave a partial ``path`` next to the ``.partial`` copy (see docs/reliability.md)."""
    path = as_path(path)
    if not replace and _exists(path):
        raise FileExistsError(f"{path} already exists")
    tmp = path.parent / (path.name + ".partial")
    if primary:
        _remove(tmp)
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
