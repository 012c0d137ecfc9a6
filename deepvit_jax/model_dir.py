"""Model files: weights (Orbax) + the model's config (JSON), read back with no other argument.

Layout of a model directory written by :func:`save_model`::

    PATH/
      config.json   {"format": "deepvit-jax-model", "version": 1, "config": ModelConfig.to_dict()}
      state/        Orbax StandardCheckpointer tree of the nnx.Param and nnx.BatchStat state

The directory is written under a temporary name and renamed into place at the end, so an
interrupted save never leaves a half-written ``PATH``. The same format is read by
:func:`load_model` (ready module), :func:`load_model_state` (config + state, for the training
loop's ``init_from``), ``python -m deepvit_jax.predict`` and the PyTorch converter.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepvit_jax.errors import DeepViTError, ModelFileError, StorageError, storage_problem
from deepvit_jax.models.deepvit import DeepViT, ModelConfig
from deepvit_jax.utils import as_path, atomic_output, claim_output, is_local, path_str

FORMAT = "deepvit-jax-model"
VERSION = 1
CONFIG_FILE = "config.json"
STATE_DIR = "state"
WEIGHTS = (nnx.Param, nnx.BatchStat)  # what a model file holds; RNG streams are not saved

Path = tuple  # a state path, e.g. ('blocks', 3, 'attn', 'qkv', 'kernel')


# --------------------------------------------------------------------------------------
# Building a module from arrays (shared with the PyTorch converter)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _abstract_model(cfg: ModelConfig) -> DeepViT:
    # Tracing the constructor takes seconds for the 32-block models: do it once per config.
    return nnx.eval_shape(lambda: DeepViT(cfg, rngs=nnx.Rngs(0)))


def abstract_split(cfg: ModelConfig):
    """(graphdef, abstract weight state, abstract rest state) of the model ``cfg`` describes,
    without allocating or initialising any parameter (``nnx.eval_shape``). The states are
    fresh copies: filling them never touches the cached abstract model."""
    return nnx.split(nnx.clone(_abstract_model(cfg)), WEIGHTS, ...)


def weight_shapes(cfg: ModelConfig) -> dict[Path, tuple[tuple[int, ...], type]]:
    """Every weight of the model ``cfg`` describes: path -> (shape, Param or BatchStat)."""
    _, weights, _ = abstract_split(cfg)
    return {tuple(p): (tuple(v.get_value().shape), type(v))
            for p, v in nnx.to_flat_state(weights)}


def _nest(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = value
    return out


def model_from_arrays(cfg: ModelConfig, arrays: Mapping[Path, Any], *, seed: int = 0,
                      what: str = "weights") -> DeepViT:
    """A ready :class:`DeepViT` (eval mode) whose weights are ``arrays`` (path -> array).

    Built from ``nnx.eval_shape`` so no random initialisation runs (that alone takes seconds
    for the 32-block models); the dropout RNG streams get fresh keys derived from ``seed``.
    ``arrays`` must hold exactly the model's weights with their shapes.
    """
    graphdef, weights, rest = abstract_split(cfg)
    expected = {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(weights)}
    missing = sorted(path_str(p, ".") for p in expected if p not in arrays)
    unexpected = sorted(path_str(p, ".") for p in arrays if p not in expected)
    mismatched = [f"{path_str(p, '.')}: got {tuple(np.shape(a))}, model expects {expected[p]}"
                  for p, a in arrays.items() if p in expected and tuple(np.shape(a)) != expected[p]]
    if missing or unexpected or mismatched:
        raise ModelFileError(describe_problems(
            f"{what} do not match model {cfg.name!r}", missing=missing,
            unexpected=unexpected, mismatched=mismatched))
    nnx.replace_by_pure_dict(weights, _nest({p: jnp.asarray(a, jnp.float32)
                                             for p, a in arrays.items()}))
    # Fresh, distinct dropout streams (what DeepViT(cfg, rngs=nnx.Rngs(seed)) would hold in
    # spirit): one key per stream folded from the seed, counts at zero.
    rest_flat = list(nnx.to_flat_state(rest))
    base = jax.random.key(seed)
    fill = {}
    for i, (p, v) in enumerate(rest_flat):
        sds = v.get_value()
        if isinstance(v, nnx.RngKey):
            fill[tuple(p)] = jax.random.fold_in(base, i)
        else:
            fill[tuple(p)] = jnp.zeros(sds.shape, sds.dtype)
    if fill:
        nnx.replace_by_pure_dict(rest, _nest(fill))
    model = nnx.merge(graphdef, weights, rest)
    model.eval()
    return model


def model_arrays(model: nnx.Module) -> dict[Path, np.ndarray]:
    """The model's weights (params + BatchNorm statistics) as path -> numpy array."""
    return {tuple(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def describe_problems(title: str, *, missing=(), unexpected=(), mismatched=(), hint: str = "",
                      limit: int = 25) -> str:
    """One readable message listing offending keys (each list cut at ``limit``)."""
    lines = [title + ":"]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        items = list(items)
        if not items:
            continue
        lines.append(f"  {len(items)} {label}:")
        lines += [f"    {k}" for k in items[:limit]]
        if len(items) > limit:
            lines.append(f"    ... and {len(items) - limit} more")
    if hint:
        lines.append(hint)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model directory written by :func:`save_model` (its
    ``config.json`` says so); the only kind of directory ``overwrite=True`` replaces."""
    cfg_file = as_path(path) / CONFIG_FILE
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_replaceable(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Raise unless ``path`` is free, or (with ``overwrite``) a model directory."""
    p = as_path(path)
    if not p.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{p} already exists (pass overwrite=True / --overwrite to "
                              "replace a model directory)")
    if not is_model_dir(p):
        raise ModelFileError(f"{p} exists and is not a deepvit-jax model directory (no "
                             f"{CONFIG_FILE} of format {FORMAT!r}): refusing to replace it; "
                             "choose a new output path")


def save_model(model: DeepViT, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``model`` (weights + BatchNorm statistics + its ModelConfig) to directory ``path``.

    Claimed first (a concurrent writer of ``path`` fails at once, exit 3), written to a
    temporary ``NAME.deepvit-partial-<token>`` beside it and renamed at the end
    (``utils.atomic_output``). Refuses to replace an
    existing ``path`` unless ``overwrite`` and ``path`` is a model directory (never any
    other directory or file). Returns the absolute path (or the URL, e.g. ``gs://...``).
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"save_model needs a DeepViT (with a .config ModelConfig), "
                        f"got {type(model).__name__}")
    path = as_path(path)
    primary = jax.process_index() == 0
    with claim_output(path, primary=primary, collective=True):  # checked under the claim
        check_replaceable(path, overwrite=overwrite)
        state = nnx.state(model, WEIGHTS)
        if primary:
            _check_space(path, state)
        try:
            with atomic_output(path, primary=primary, collective=True) as tmp:
                _write(state, cfg, as_path(tmp), primary)
        except Exception as e:
            problem = storage_problem(e)
            if problem is None or isinstance(e, DeepViTError):
                raise
            raise StorageError(f"{problem} writing {path}: nothing was written; free space, "
                               "raise the quota or fix the permissions (or choose another "
                               "path), then run the same command again") from e
    return os.fspath(path)


def _check_space(path, state) -> None:
    """Refuse (StorageError, exit 4) before anything is written when the local filesystem
    of ``path`` has less free space than the weights need: Orbax's failed writes on a full
    disk go on in TensorStore's threads after the save has failed, and their callbacks then
    print "Event loop is closed" tracebacks. (A disk that fills during the write is still
    caught below, as every storage failure is.)"""
    import shutil

    if not is_local(path):
        return
    need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(state)) * 11 // 10 + (256 << 10)
    parent = os.fspath(path)
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    try:
        free = shutil.disk_usage(parent or ".").free
    except OSError:
        return
    if free < need:
        raise StorageError(f"no space left on the device writing {path}: the model needs "
                           f"about {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are "
                           "free; free space (or choose another path), then run the same "
                           "command again")


def _write(state, cfg: ModelConfig, tmp, primary: bool) -> None:
    ckptr = _checkpointer()
    try:
        ckptr.save(tmp / STATE_DIR, state)
        ckptr.wait_until_finished()
    except Exception:
        _settle_after_failure(tmp)
        raise
    if primary:
        with (tmp / CONFIG_FILE).open("w") as f:
            json.dump({"format": FORMAT, "version": VERSION, "config": cfg.to_dict()}, f,
                      indent=2)


def _settle_after_failure(tmp, quiet_s: float = 0.3, limit_s: float = 3.0) -> None:
    """After a failed Orbax save (a full disk): its other TensorStore writes, already
    started, still run for a moment and would recreate files under ``tmp`` after
    atomic_output removed it. Wait (at most ``limit_s``) until nothing under ``tmp``
    changed for ``quiet_s``. (Closing the checkpointer or Orbax's synchronous checkpointer
    instead print "Event loop is closed" tracebacks from those writes' callbacks.)"""
    import time

    if not is_local(tmp):
        return
    start, last, seen = time.monotonic(), time.monotonic(), None
    while time.monotonic() - start < limit_s:
        now = _tree_state(os.fspath(tmp))
        if now != seen:
            seen, last = now, time.monotonic()
        elif time.monotonic() - last >= quiet_s:
            return
        time.sleep(0.05)


def _tree_state(root: str) -> tuple:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(d, f))
                out.append((d, f, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def _not_a_model_dir(path) -> str:
    """Why ``path`` (a directory without config.json) is not a model directory, and the fix."""
    if (path / "checkpoints").is_dir() or ((path / "state").is_dir() and (
            (path / "meta").is_dir() or (path / "_CHECKPOINT_METADATA").exists())):
        return (f"{path} is a training run / checkpoint, not a model directory: export its "
                "weights first (python -m deepvit_jax.export, see the README)")
    return (f"{path}: no {CONFIG_FILE}; not a model directory written by save_model (a "
            "PyTorch file? use python -m deepvit_jax.convert)")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in model directory ``path``."""
    path = as_path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise ModelFileError(f"{path}: no such model directory (expected {CONFIG_FILE} and "
                             f"{STATE_DIR}/ written by deepvit_jax.checkpoint.save_model)")
    if not cfg_file.exists():
        raise ModelFileError(_not_a_model_dir(path))
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{cfg_file}: unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ModelFileError(f"{cfg_file}: not a {FORMAT} config (keys {sorted(meta)[:10]})"
                             if isinstance(meta, dict) else f"{cfg_file}: not a JSON object")
    if int(meta.get("version", 0)) > VERSION:
        raise ModelFileError(f"{cfg_file}: format version {meta['version']} is newer than "
                             f"this deepvit-jax reads ({VERSION})")
    try:
        return ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{cfg_file}: invalid model config: {e}") from e


def load_model_state(path: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None
                     ) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, nnx.State of params + BatchNorm statistics) stored in ``path``.

    Every array is placed with ``sharding`` (default: the first local device). The training
    loop's ``init_from`` (``train.state.load_pretrained``) copies these arrays, by path, into
    its freshly initialised parameters and BatchNorm statistics.
    """
    cfg = read_config(path)
    _, weights, _ = abstract_split(cfg)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          weights)
    state_dir = as_path(path) / STATE_DIR
    if not state_dir.is_dir():
        raise ModelFileError(f"{path}: no {STATE_DIR}/ directory (incomplete model directory)")
    try:
        restored = _checkpointer().restore(state_dir, target)
    except Exception as e:  # Orbax raises several types for structure/shape mismatches
        raise ModelFileError(f"{state_dir}: cannot restore the weights of {cfg.name!r} "
                             f"({type(e).__name__}: {e})") from e
    return cfg, restored


def load_model(path: str | os.PathLike) -> DeepViT:
    """The model stored in ``path`` as a ready ``nnx.Module`` in eval mode."""
    cfg, state = load_model_state(path)
    arrays = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    return model_from_arrays(cfg, arrays, what=f"weights in {path}")
