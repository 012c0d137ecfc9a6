"""Small helpers that several modules share, each in one place."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import jax


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


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, replace: bool = True,
                  primary: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (``path + '.partial'``) to write a file or a
    directory into; on success it is renamed onto ``path``, on any error removed, so ``path``
    is never half-written. ``replace=False`` refuses an existing ``path`` before anything is
    written (FileExistsError). In a multi-process write (every process saving its shards into
    the same directory) only the ``primary`` process cleans up and renames."""
    path = os.path.abspath(os.fspath(path))
    if not replace and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists")
    tmp = path + ".partial"
    if primary:
        _remove(tmp)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        yield tmp
        if primary:
            if os.path.isdir(tmp) and os.path.lexists(path):
                _remove(path)  # os.replace cannot replace a directory
            os.replace(tmp, path)
    except BaseException:
        if primary:
            _remove(tmp)
        raise
