"""Checks on the weights a conversion reads or writes: floating-point dtypes, finite values,
and a per-group summary for a reader to spot a zeroed or exploded group."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepvit_jax.errors import ConversionError
from deepvit_jax.utils import path_str

log = logging.getLogger(__name__)


def listing(title: str, items: list[str], hint: str, limit: int = 10) -> str:
    """``title:``, the first ``limit`` items indented (and how many more), then ``hint``."""
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return "\n".join([title + ":", *(f"  {x}" for x in items[:limit]), *more, hint])


def check_float(not_float: list[str], source: str) -> None:
    """Refuse integer or boolean tensors where weights belong (``not_float``: one
    ``'key: dtype'`` each): the float32 cast would write truncated or zeroed weights."""
    if not not_float:
        return
    raise ConversionError(listing(
        f"{len(not_float)} of the {source} checkpoint's weights are not floating-point "
        "tensors (weights are float32, float16 or bfloat16)", not_float,
        "Is this a state dict of weights (not one cast to integers, or of indices / "
        "masks)? Convert the original float checkpoint."))


def nonfinite_problems(arrays: Mapping[Any, np.ndarray]) -> list[str]:
    """``'key: n of m values are NaN/inf'`` for every array holding a non-finite value."""
    out = []
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "fc":
            continue
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            name = path_str(key, ".") if isinstance(key, tuple) else key
            out.append(f"{name}: {bad} of {a.size} values are NaN/inf")
    return out


def check_finite(arrays: Mapping[Any, np.ndarray], what: str, *,
                 allow_nonfinite: bool = False) -> None:
    """Refuse weights holding NaN or inf (a diverged or damaged checkpoint) unless
    ``allow_nonfinite``, then only warn."""
    problems = nonfinite_problems(arrays)
    if not problems:
        return
    if allow_nonfinite:
        log.warning("%s: %d tensor(s) hold NaN/inf (kept: allow_nonfinite): %s", what,
                    len(problems), "; ".join(problems[:5]))
        return
    raise ConversionError(listing(
        f"{what}: {len(problems)} tensor(s) hold NaN/inf values (a diverged or damaged "
        "checkpoint?)", problems,
        "Pass --allow-nonfinite (allow_nonfinite=True) to convert them anyway."))


def weight_summary(arrays: Mapping[Any, np.ndarray]) -> list[str]:
    """A table, one line per group of tensors (block indices folded into ``*``, the last
    name dropped: ``blocks.*.attn.qkv``): tensor and value counts, dtypes, value range,
    mean |value| and the count of non-finite values, for a reader to spot a zeroed or
    exploded group. The first line is the header."""
    groups: dict[str, list[np.ndarray]] = {}
    for key, a in arrays.items():
        parts = [str(p) for p in (key if isinstance(key, tuple) else key.split("."))]
        name = ".".join("*" if p.isdigit() else p for p in parts[:-1]) or parts[-1]
        groups.setdefault(name, []).append(np.asarray(a))
    lines = [f"{'group':<30}{'tensors':>8}{'values':>11}  {'dtype':<9}{'min':>11}{'max':>11}"
             f"{'mean |x|':>11}  non-finite"]
    for name, arrs in groups.items():
        size = sum(a.size for a in arrs)
        dtypes = ",".join(sorted({str(a.dtype) for a in arrs}))
        vals = np.concatenate([(a[np.isfinite(a)] if a.dtype.kind == "f" else a)
                               .ravel().astype(np.float64) for a in arrs])
        lo, hi = (vals.min(), vals.max()) if vals.size else (np.nan, np.nan)
        mean = np.abs(vals).mean() if vals.size else np.nan
        lines.append(f"{name:<30}{len(arrs):>8}{size:>11}  {dtypes:<9}{lo:>11.4g}{hi:>11.4g}"
                     f"{mean:>11.4g}  {size - vals.size}")
    return lines
