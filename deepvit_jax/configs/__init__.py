"""The training recipes, shipped inside the package (``deepvit_jax/configs/*.py``; in a git
checkout ``configs/`` links here, so ``--config configs/default.py`` keeps working).

``--config`` takes a file path or a recipe name: ``default``, ``i1k:deepvit_16b``,
``colab.py:gpu,imagenette``, ``configs/i1k.py:deepvit_l`` (:func:`resolve`).
"""

from __future__ import annotations

import os
from pathlib import Path

DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """The recipe names (``default``, ``i1k``, ...)."""
    return sorted(p.stem for p in DIR.glob("*.py") if not p.stem.startswith("_"))


def resolve(spec: str) -> str:
    """``FILE[:ARG]`` as a path ``ml_collections`` can load: an existing file path is kept;
    otherwise a recipe of this package by name (``default``, ``i1k.py``, ``configs/i1k.py``,
    ``deepvit_jax/configs/i1k.py``), with ``:ARG`` kept. Unknown names are returned unchanged
    (the config loader then names the missing file)."""
    path, sep, arg = spec.partition(":")
    if not path or os.path.exists(path):
        return spec
    name = Path(path).name
    if not name.endswith(".py"):
        name += ".py"
    parent = Path(path).parent.as_posix()
    if parent not in (".", "configs", "deepvit_jax/configs"):
        return spec
    candidate = DIR / name
    if candidate.is_file() and not name.startswith("_"):
        return f"{candidate}{sep}{arg}"
    return spec
