"""PyTorch checkpoint files: reading ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.safetensors``
safely into ``{key: numpy array}``, and writing a state dict atomically.

PyTorch and safetensors are optional dependencies, imported on use.
"""

from __future__ import annotations

import argparse
import io
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepvit_jax.errors import ConversionError
from deepvit_jax.utils import atomic_output

MIN_TORCH = (2, 6)  # pyproject.toml's torch floor


def import_torch():
    """The ``torch`` module, or a :class:`ConversionError` when it is missing or too old."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is an optional dependency
        raise ConversionError("reading or writing PyTorch checkpoints needs PyTorch: install "
                              "the CPU build, e.g. `pip install torch safetensors`") from e
    # torch.load(weights_only=True) can be bypassed before 2.6 (CVE-2025-32434), and
    # torch.serialization.safe_globals is newer than 2.4: refuse older versions.
    if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) < MIN_TORCH:
        raise ConversionError(f"PyTorch {torch.__version__} is too old to read checkpoints "
                              f"safely (weights_only=True is only safe from "
                              f"{'.'.join(map(str, MIN_TORCH))}, CVE-2025-32434): upgrade, e.g. "
                              "`pip install 'torch>=2.6'`")
    return torch


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a checkpoint safely (``weights_only=True``), allowing the
    ``argparse.Namespace`` that timm training files keep under ``args``; ``.safetensors``
    files are read with safetensors. Any failure is a :class:`ConversionError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ConversionError(f"{path} is a directory, not a PyTorch checkpoint file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            return load_file(path)
        except Exception as e:
            raise ConversionError(f"{path}: not a readable safetensors file "
                                  f"({type(e).__name__}: {e})") from e
    torch = import_torch()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, disallowed pickled classes, ...
        raise _load_error(path, e) from e


def _load_error(path: str, e: Exception) -> ConversionError:
    """The weights-only unpickler names a disallowed global; other failures (random bytes,
    a truncated file) are unreadable files, not hostile ones."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found and "Weights only load failed" in str(e):
        return ConversionError(
            f"{path}: refused: the file holds Python objects other than tensors "
            f"({found.group(1)}) that could run code "
            "when loaded. If you trust its source, load it in PyTorch and save only its "
            "state_dict (torch.save(model.state_dict(), ...)) or use .safetensors")
    return ConversionError(
        f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}). "
        "Is the file complete (compare its size with the download) and a torch.save "
        "file (.pth / .pth.tar / .pt) or .safetensors?")


def _select_weights(obj: Mapping, ema: bool, name: str) -> Mapping:
    """The state dict inside a training file: EMA weights when ``ema``, else
    ``state_dict`` / ``model`` if present, else ``obj`` itself."""
    if ema:
        for k in ("state_dict_ema", "model_ema", "ema"):
            if isinstance(obj.get(k), Mapping):
                return obj[k]
        raise ConversionError(f"{name}: ema=True but the file holds no EMA weights "
                              f"(no 'state_dict_ema' / 'model_ema'); top-level keys: "
                              f"{sorted(map(str, obj))[:20]}")
    for k in ("state_dict", "model"):
        if isinstance(obj.get(k), Mapping):
            return obj[k]
    return obj


def extract_state_dict(obj: Any, *, ema: bool = False, name: str = "checkpoint"
                       ) -> dict[str, np.ndarray]:
    """The weights inside a loaded checkpoint as ``{key: float32 numpy array}``.

    Accepts timm training files (``state_dict`` / ``state_dict_ema``, plus ``args``,
    ``optimizer``, ...), ``{'model': ...}`` / ``{'model_ema': ...}`` and bare state dicts;
    strips ``module.`` prefixes (DataParallel / DDP) and drops ``num_batches_tracked``.
    ``ema=True`` selects the EMA weights and fails if the file has none.
    """
    torch = import_torch()
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{name}: expected a dict of tensors, got {type(obj).__name__}")
    sd = _select_weights(obj, ema, name)
    out: dict[str, np.ndarray] = {}
    bad = []
    for key, value in sd.items():
        key = str(key)
        if key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("num_batches_tracked"):
            continue
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key}: {type(value).__name__}")
            continue
        t = value.detach().cpu()
        out[key] = (t.float() if t.is_floating_point() else t).numpy()
    if bad:
        raise ConversionError(f"{name}: entries that are not tensors (not a state dict?): "
                              f"{bad[:10]}; top-level keys: {sorted(map(str, obj))[:20]}")
    if not out:
        raise ConversionError(f"{name}: no weights found; top-level keys: "
                              f"{sorted(map(str, obj))[:20]}")
    return out


def load_state_dict(src: str | os.PathLike | Mapping, *, ema: bool = False
                    ) -> dict[str, np.ndarray]:
    """A file path or an in-memory (state) dict -> ``{key: numpy array}`` (see
    :func:`extract_state_dict`)."""
    if isinstance(src, Mapping):
        return extract_state_dict(src, ema=ema, name="state dict")
    return extract_state_dict(load_torch_file(src), ema=ema, name=os.fspath(src))


def save_pytorch(state_dict: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write a state dict as ``.safetensors`` (by extension) or ``torch.save`` otherwise,
    through a temporary file renamed into place (``utils.atomic_output``: claimed first).

    The file is serialised in memory and written by Python: torch's own file writer
    reports a full disk as ``enforce fail ... unexpected pos`` (no errno), safetensors' as
    its own error type; Python's write raises ``OSError(ENOSPC)`` with the file named, the
    one-line exit 4 of every command."""
    path = os.path.abspath(os.fspath(path))
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in state_dict.items()})
    else:
        buf = io.BytesIO()
        import_torch().save(dict(state_dict), buf)
        data = buf.getvalue()
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, path) from e  # named in the one-line error
    return path
