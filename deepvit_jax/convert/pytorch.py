"""PyTorch state dicts <-> deepvit-jax weights: the public entry points.

``from_pytorch`` reads a checkpoint of one of the ``SOURCES`` (``sources.py``) into a ready
model, ``convert_state_dict`` maps its keys with the source's rule table (``rules.py``) and
``to_pytorch`` writes our weights back with the same table, so it is the exact inverse.
The layouts live in ``official.py``, ``vit_pytorch.py`` and ``timm_vit.py``; files in
``torch_files.py``; the checks on the weights in ``checks.py``. Their public names are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepvit_jax.convert import official, vit_pytorch
from deepvit_jax.convert.checks import (check_finite, check_float, nonfinite_problems,
                                        weight_summary)
from deepvit_jax.convert.official import OFFICIAL_RULES, guess_official_variant
from deepvit_jax.convert.rules import TRANSFORMS, RuleTable, state_path, torch_shape
from deepvit_jax.convert.sources import RULES, SOURCES, TABLES, detect_source, target_config
from deepvit_jax.convert.timm_vit import TIMM_RULES, identity_reattention, infer_timm_config
from deepvit_jax.convert.torch_files import (extract_state_dict, import_torch, load_state_dict,
                                             load_torch_file, save_pytorch)
from deepvit_jax.convert.vit_pytorch import VIT_PYTORCH_RULES, infer_vit_pytorch_config
from deepvit_jax.errors import ConversionError
from deepvit_jax.model_dir import (Path, describe_problems, model_arrays, model_from_arrays,
                                   weight_shapes)
from deepvit_jax.models.deepvit import DeepViT, ModelConfig, pos_embed_grid, resample_pos_embed
from deepvit_jax.utils import path_str

log = logging.getLogger(__name__)

LAYOUT_NEEDS = {"official": official.layout_needs, "vit-pytorch": vit_pytorch.layout_needs}


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Mapped:
    """What mapping a state dict's keys onto a model's weights found."""

    arrays: dict[Path, np.ndarray] = dataclasses.field(default_factory=dict)
    keys: list[str] = dataclasses.field(default_factory=list)  # the keys in ``arrays``
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    not_float: list[str] = dataclasses.field(default_factory=list)


def _fit_pos_embed(arr: np.ndarray, want: tuple[int, ...], cfg: ModelConfig) -> np.ndarray:
    """``pos_embed`` resampled to the model's token grid when only its grid differs."""
    if arr.shape != want and arr.shape[-1] == want[-1] and pos_embed_grid(arr.shape) is not None:
        new_grid = pos_embed_grid(want)
        log.warning("resampling pos_embed from a %dx%d to a %dx%d token grid "
                    "(image size %d)", pos_embed_grid(arr.shape), pos_embed_grid(arr.shape),
                    new_grid, new_grid, cfg.image_size)
        arr = resample_pos_embed(arr, new_grid)
    return arr


def _map_weights(sd: Mapping[str, np.ndarray], table: RuleTable, target: dict,
                 cfg: ModelConfig) -> _Mapped:
    """Every key of ``sd`` through ``table`` onto the ``target`` weights of ``cfg``'s model,
    transformed to our layout and float32; what does not fit is listed, not raised."""
    found = _Mapped()
    for key, value in sd.items():
        hit = table.to_ours(key)
        path = state_path(hit[0]) if hit else None
        if path not in target:
            found.unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            found.not_float.append(f"{key}: {np.asarray(value).dtype}")
            continue
        tf = hit[1]
        want = target[path][0]
        arr = np.ascontiguousarray(TRANSFORMS[tf][0](np.asarray(value)), dtype=np.float32)
        if path == ("pos_embed",):
            arr = _fit_pos_embed(arr, want, cfg)
        if arr.shape != want:
            found.mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model expects "
                                    f"{torch_shape(want, tf)}")
            continue
        found.arrays[path] = arr
        found.keys.append(key)
    return found


def _missing_keys(target: dict, arrays: Mapping[Path, np.ndarray], table: RuleTable,
                  source: str) -> list[str]:
    """The torch key (and shape) of every ``target`` weight that ``arrays`` lacks."""
    missing = []
    for p, (shape, _) in target.items():
        if p not in arrays:
            hit = table.to_torch(path_str(p, "."))
            missing.append(f"{hit[0]} {torch_shape(shape, hit[1])}" if hit
                           else f"{path_str(p, '.')} {shape} (no {source} key maps to it)")
    return missing


def _misfit_error(sd: Mapping[str, np.ndarray], cfg: ModelConfig, source: str,
                  found: _Mapped, missing: list[str]) -> ConversionError:
    """The error listing the keys that do not fit, with the official variant the file
    looks like when that is another one."""
    hint = ""
    if source == "official":
        guess = guess_official_variant(sd)
        if guess and guess != cfg.name:
            hint = (f"The file looks like {guess!r}; the target is {cfg.name!r} "
                    f"(pass --model {guess}).")
    return ConversionError(describe_problems(
        f"{source} checkpoint does not fit model {cfg.name!r} "
        f"(depth {cfg.depth}, dim {cfg.embed_dim}, re-attention blocks "
        f"{list(cfg.reattn_indices)})", missing=missing, unexpected=found.unexpected,
        mismatched=found.mismatched, hint=hint))


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: ModelConfig, source: str, *,
                       identity_reattn: bool = False,
                       allow_nonfinite: bool = False) -> dict[Path, np.ndarray]:
    """``{torch key: array}`` -> ``{our state path: array}`` for the model ``cfg`` describes.

    Every key must map onto a weight of that model with the right shape and every weight
    must be covered; otherwise a :class:`ConversionError` lists the offending keys with
    their shapes. ``pos_embed`` is resampled when only its grid differs. With
    ``identity_reattn`` (timm), Re-attention weights absent from ``sd`` start as the
    identity. Integer or boolean tensors where weights belong are refused (the float32 cast
    would write truncated or zeroed weights), and so are NaN / inf values unless
    ``allow_nonfinite``.
    """
    if source not in TABLES:
        raise ConversionError(f"unknown source {source!r}; one of {SOURCES}")
    table = TABLES[source]
    target = weight_shapes(cfg)
    found = _map_weights(sd, table, target, cfg)
    check_float(found.not_float, source)
    if identity_reattn:
        for b in cfg.reattn_indices:
            for p, a in identity_reattention(cfg, b).items():
                found.arrays.setdefault(p, a)
    missing = _missing_keys(target, found.arrays, table, source)
    if missing or found.unexpected or found.mismatched:
        raise _misfit_error(sd, cfg, source, found, missing)
    check_finite({k: sd[k] for k in found.keys}, f"the {source} checkpoint",
                 allow_nonfinite=allow_nonfinite)
    return found.arrays


def from_pytorch(src: str | os.PathLike | Mapping, model: str | ModelConfig | None = None,
                 source: str = "auto", ema: bool = False, image_size: int | None = None,
                 allow_nonfinite: bool = False, **overrides) -> DeepViT:
    """A PyTorch checkpoint (path or state dict) -> ready :class:`DeepViT` in eval mode.

    Args:
      src: ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.safetensors`` path, a loaded checkpoint dict
        or a state dict (tensors).
      model: registry name (official entrypoint names work), a ModelConfig, or None to
        infer it (official: recognised from the keys; vit-pytorch / timm: from the shapes).
      source: 'auto', 'official', 'vit-pytorch' or 'timm'. Auto picks vit-pytorch by its
        keys, else 'official' (also for a plain ViT when ``model`` is given), else 'timm'.
      ema: take the EMA weights (``state_dict_ema``) of a timm training file.
      image_size: target image size; ``pos_embed`` is resampled when its grid differs.
      allow_nonfinite: keep NaN / inf weights (refused by default; integer or boolean
        weights are always refused).
      **overrides: ModelConfig fields, e.g. ``pool='mean'`` (vit-pytorch), ``num_heads=6`` and
        ``reattn_blocks=range(6, 12)`` (timm: identity Re-attention on those blocks),
        ``num_classes=...``.
    """
    sd = load_state_dict(src, ema=ema)
    if source == "auto":
        source = detect_source(sd)
        if source == "timm" and model is not None:
            source = "official"
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; one of {SOURCES} or 'auto'")
    cfg = target_config(sd, model, source, image_size, overrides)
    arrays = convert_state_dict(sd, cfg, source, identity_reattn=(source == "timm"),
                                allow_nonfinite=allow_nonfinite)
    return model_from_arrays(cfg, arrays, what=f"converted {source} weights")


# --------------------------------------------------------------------------------------
# Back to PyTorch
# --------------------------------------------------------------------------------------


def _layout_problems(cfg: ModelConfig, layout: str) -> list[str]:
    want = LAYOUT_NEEDS[layout](cfg)
    return [f"{k}={getattr(cfg, k)!r} (the {layout} layout needs "
            f"{' or '.join(map(repr, v)) if k != 'reattn_indices' else 'all blocks'})"
            for k, v in want.items() if getattr(cfg, k) not in v]


def to_pytorch(model: DeepViT, layout: str | None = None) -> dict[str, Any]:
    """Our model -> a PyTorch state dict (``{key: torch.Tensor}``, float32, CPU).

    ``layout`` 'official' (default for conv / CNN-stem models: the dvit_repo keys of spec
    section 4, incl. ``num_batches_tracked`` = 0 for every BatchNorm) or 'vit-pytorch'
    (default for models converted from vit-pytorch). Values are bit-exact copies.
    """
    torch = import_torch()
    cfg = model.config
    if layout is None:
        layout = "vit-pytorch" if cfg.patch_embed == "linear" else "official"
    if layout not in ("official", "vit-pytorch"):
        raise ConversionError(f"unknown layout {layout!r}: 'official' or 'vit-pytorch'")
    problems = _layout_problems(cfg, layout)
    if problems:
        raise ConversionError(f"model {cfg.name!r} cannot be written in the {layout} layout: "
                              + "; ".join(problems))
    table = TABLES[layout]
    out: dict[str, Any] = {}
    for path, arr in model_arrays(model).items():
        hit = table.to_torch(path_str(path, "."))
        if hit is None:  # guarded by _layout_problems; kept as a clear failure
            raise ConversionError(f"no {layout} key for weight {path_str(path, '.')}")
        key, tf = hit
        out[key] = torch.from_numpy(np.array(TRANSFORMS[tf][1](arr), dtype=np.float32,
                                             order="C", copy=True))
        if layout == "official" and key.endswith(".running_var"):
            out[key[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


__all__ = [
    "OFFICIAL_RULES",
    "RULES",
    "SOURCES",
    "TIMM_RULES",
    "VIT_PYTORCH_RULES",
    "ConversionError",
    "check_finite",
    "convert_state_dict",
    "detect_source",
    "extract_state_dict",
    "from_pytorch",
    "guess_official_variant",
    "identity_reattention",
    "infer_timm_config",
    "infer_vit_pytorch_config",
    "load_state_dict",
    "load_torch_file",
    "nonfinite_problems",
    "resample_pos_embed",
    "save_pytorch",
    "to_pytorch",
    "weight_summary",
]
