"""PyTorch state dicts <-> deepvit-jax weights: one table of key rules per source.

Sources (``shared/reference/deepvit.md`` sections 4-5):

* ``official``: zhoudaquan/dvit_repo (timm 0.3.2) DeepViT checkpoints: ``blocks.i.attn.qkv``,
  ``blocks.i.attn.reatten_matrix`` (1x1 Conv2d = Theta), ``blocks.i.attn.var_norm``
  (BatchNorm2d), CNN stem ``patch_embed.{conv1,bn1,conv2,bn2,proj}``, ...
* ``vit-pytorch``: lucidrains' ``vit_pytorch.deepvit.DeepViT``: ``transformer.layers.L.0.*``,
  ``to_patch_embedding.*``, ``mlp_head.*``; every size is inferred from the shapes.
* ``timm``: a timm ViT/DeiT (``VisionTransformer``); same key names as a plain official block.
  Converted into our ViT, or into a DeepViT whose extra Re-attention blocks start as the
  identity (Theta = I, zero bias, identity BatchNorm) so the network computes the ViT's
  function exactly.

A rule is ``(torch key template, our state path template, transform)``; ``{i}`` matches a
block index and the other ``{name}`` fields one of a few alternatives (``FIELDS``). The same
tables map both ways, so ``to_pytorch`` is the exact inverse of ``from_pytorch``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any
from collections.abc import Callable, Mapping

import numpy as np

from deepvit_jax.errors import ConversionError
from deepvit_jax.model_dir import (Path, describe_problems, model_arrays, model_from_arrays,
                                   weight_shapes)
from deepvit_jax.models.deepvit import DeepViT, ModelConfig, pos_embed_grid, resample_pos_embed
from deepvit_jax.models.registry import VARIANTS, get_config
from deepvit_jax.utils import atomic_output, path_str

log = logging.getLogger(__name__)

SOURCES = ("official", "vit-pytorch", "timm")


# --------------------------------------------------------------------------------------
# Tensor transforms: (torch -> ours, ours -> torch)
# --------------------------------------------------------------------------------------

TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray],
                            Callable[[np.ndarray], np.ndarray]]] = {
    "id": (lambda a: a, lambda a: a),
    # nn.Linear weight (out, in) <-> Dense kernel (in, out)
    "linear": (lambda a: a.T, lambda a: a.T),
    # nn.Conv2d weight (out, in, kh, kw) <-> NHWC conv kernel (kh, kw, in, out)
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    # official Theta: Conv2d(H, H, 1) weight (out, in, 1, 1) <-> W[out, in]
    "conv1x1": (lambda a: a[:, :, 0, 0], lambda a: a[:, :, None, None]),
    # vit-pytorch Theta: einsum('bhij,hg->bgij', A, W) uses W[in, out] <-> W[out, in]
    "transpose": (lambda a: a.T, lambda a: a.T),
}

FIELDS = {
    "i": r"\d+",
    "conv": r"conv1|conv2|proj",
    "bn": r"bn1|bn2",
    "ln": r"norm1|norm2",
    "lin": r"qkv|proj",
    "fc": r"fc1|fc2",
    "bnw": r"weight|bias|running_mean|running_var",
}
# BatchNorm / LayerNorm parameter names: torch -> ours
_NORM = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}

# ---- the tables ----------------------------------------------------------------------
# Each entry: (torch key, our path, transform). A '{bnw}' torch field maps through _NORM.

_VIT_RULES = (  # timm VisionTransformer layout, shared by the official release
    ("cls_token", "cls_token", "id"),
    ("pos_embed", "pos_embed", "id"),
    ("patch_embed.proj.weight", "patch_embed.proj.kernel", "conv"),
    ("patch_embed.proj.bias", "patch_embed.proj.bias", "id"),
    ("blocks.{i}.{ln}.weight", "blocks.{i}.{ln}.scale", "id"),
    ("blocks.{i}.{ln}.bias", "blocks.{i}.{ln}.bias", "id"),
    ("blocks.{i}.attn.{lin}.weight", "blocks.{i}.attn.{lin}.kernel", "linear"),
    ("blocks.{i}.attn.{lin}.bias", "blocks.{i}.attn.{lin}.bias", "id"),
    ("blocks.{i}.mlp.{fc}.weight", "blocks.{i}.mlp.{fc}.kernel", "linear"),
    ("blocks.{i}.mlp.{fc}.bias", "blocks.{i}.mlp.{fc}.bias", "id"),
    ("norm.weight", "norm.scale", "id"),
    ("norm.bias", "norm.bias", "id"),
    ("head.weight", "head.kernel", "linear"),
    ("head.bias", "head.bias", "id"),
)

OFFICIAL_RULES = (
    *_VIT_RULES,
    # CNN stem of DeepViT-S/L (patch_embed.proj is covered above)
    ("patch_embed.{conv}.weight", "patch_embed.{conv}.kernel", "conv"),
    ("patch_embed.{bn}.{bnw}", "patch_embed.{bn}.{bnw}", "id"),
    # Re-attention: Theta = 1x1 conv with bias, Norm = BatchNorm2d over heads
    ("blocks.{i}.attn.reatten_matrix.weight", "blocks.{i}.attn.reattn_weight", "conv1x1"),
    ("blocks.{i}.attn.reatten_matrix.bias", "blocks.{i}.attn.reattn_bias", "id"),
    ("blocks.{i}.attn.var_norm.{bnw}", "blocks.{i}.attn.reattn_norm.{bnw}", "id"),
)

TIMM_RULES = _VIT_RULES

VIT_PYTORCH_RULES = (
    ("cls_token", "cls_token", "id"),
    ("pos_embedding", "pos_embed", "id"),
    ("to_patch_embedding.1.weight", "patch_embed.norm_in.scale", "id"),
    ("to_patch_embedding.1.bias", "patch_embed.norm_in.bias", "id"),
    ("to_patch_embedding.2.weight", "patch_embed.proj.kernel", "linear"),
    ("to_patch_embedding.2.bias", "patch_embed.proj.bias", "id"),
    ("to_patch_embedding.3.weight", "patch_embed.norm_out.scale", "id"),
    ("to_patch_embedding.3.bias", "patch_embed.norm_out.bias", "id"),
    ("transformer.layers.{i}.0.norm.weight", "blocks.{i}.norm1.scale", "id"),
    ("transformer.layers.{i}.0.norm.bias", "blocks.{i}.norm1.bias", "id"),
    ("transformer.layers.{i}.0.to_qkv.weight", "blocks.{i}.attn.qkv.kernel", "linear"),
    ("transformer.layers.{i}.0.reattn_weights", "blocks.{i}.attn.reattn_weight", "transpose"),
    ("transformer.layers.{i}.0.reattn_norm.1.weight", "blocks.{i}.attn.reattn_norm.scale", "id"),
    ("transformer.layers.{i}.0.reattn_norm.1.bias", "blocks.{i}.attn.reattn_norm.bias", "id"),
    ("transformer.layers.{i}.0.to_out.0.weight", "blocks.{i}.attn.proj.kernel", "linear"),
    ("transformer.layers.{i}.0.to_out.0.bias", "blocks.{i}.attn.proj.bias", "id"),
    ("transformer.layers.{i}.1.net.0.weight", "blocks.{i}.norm2.scale", "id"),
    ("transformer.layers.{i}.1.net.0.bias", "blocks.{i}.norm2.bias", "id"),
    ("transformer.layers.{i}.1.net.1.weight", "blocks.{i}.mlp.fc1.kernel", "linear"),
    ("transformer.layers.{i}.1.net.1.bias", "blocks.{i}.mlp.fc1.bias", "id"),
    ("transformer.layers.{i}.1.net.4.weight", "blocks.{i}.mlp.fc2.kernel", "linear"),
    ("transformer.layers.{i}.1.net.4.bias", "blocks.{i}.mlp.fc2.bias", "id"),
    ("mlp_head.0.weight", "norm.scale", "id"),
    ("mlp_head.0.bias", "norm.bias", "id"),
    ("mlp_head.1.weight", "head.kernel", "linear"),
    ("mlp_head.1.bias", "head.bias", "id"),
)

RULES = {"official": OFFICIAL_RULES, "vit-pytorch": VIT_PYTORCH_RULES, "timm": TIMM_RULES}


def _compile(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{FIELDS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


class _Table:
    """A rule table compiled for both directions."""

    def __init__(self, rules):
        self.rules = [(_compile(t), _compile(j), t, j, tf) for t, j, tf in rules]

    def to_ours(self, key: str) -> tuple[str, str] | None:
        for rt, _, _, j, tf in self.rules:
            m = rt.match(key)
            if m:
                g = m.groupdict()
                if "bnw" in g:
                    g["bnw"] = _NORM[g["bnw"]]
                return j.format(**g), tf
        return None

    def to_torch(self, path: str) -> tuple[str, str] | None:
        inv = {v: k for k, v in _NORM.items()}
        for _, rj, t, _, tf in self.rules:
            if "{bnw}" in t:
                rj = re.compile(rj.pattern.replace(FIELDS["bnw"], "scale|bias|mean|var"))
            m = rj.match(path)
            if m:
                g = m.groupdict()
                if "bnw" in g:
                    g["bnw"] = inv[g["bnw"]]
                return t.format(**g), tf
        return None


_TABLES = {src: _Table(rules) for src, rules in RULES.items()}


def _path(s: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in s.split("."))


# --------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------


MIN_TORCH = (2, 6)  # pyproject.toml's torch floor


def _torch():
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
    torch = _torch()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, disallowed pickled classes, ...
        # The weights-only unpickler names a disallowed global; other failures (random bytes,
        # a truncated file) are unreadable files, not hostile ones.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found and "Weights only load failed" in str(e):
            raise ConversionError(
                f"{path}: refused: the file holds Python objects other than tensors "
                f"({found.group(1)}) that could run code "
                "when loaded. If you trust its source, load it in PyTorch and save only its "
                "state_dict (torch.save(model.state_dict(), ...)) or use .safetensors") from e
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}). "
            "Is the file complete (compare its size with the download) and a torch.save "
            "file (.pth / .pth.tar / .pt) or .safetensors?") from e


def extract_state_dict(obj: Any, *, ema: bool = False, name: str = "checkpoint"
                       ) -> dict[str, np.ndarray]:
    """The weights inside a loaded checkpoint as ``{key: float32 numpy array}``.

    Accepts timm training files (``state_dict`` / ``state_dict_ema``, plus ``args``,
    ``optimizer``, ...), ``{'model': ...}`` / ``{'model_ema': ...}`` and bare state dicts;
    strips ``module.`` prefixes (DataParallel / DDP) and drops ``num_batches_tracked``.
    ``ema=True`` selects the EMA weights and fails if the file has none.
    """
    torch = _torch()
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{name}: expected a dict of tensors, got {type(obj).__name__}")
    sd = obj
    if ema:
        for k in ("state_dict_ema", "model_ema", "ema"):
            if isinstance(obj.get(k), Mapping):
                sd = obj[k]
                break
        else:
            raise ConversionError(f"{name}: ema=True but the file holds no EMA weights "
                                  f"(no 'state_dict_ema' / 'model_ema'); top-level keys: "
                                  f"{sorted(map(str, obj))[:20]}")
    else:
        for k in ("state_dict", "model"):
            if isinstance(obj.get(k), Mapping):
                sd = obj[k]
                break
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


# --------------------------------------------------------------------------------------
# Recognising sources and variants
# --------------------------------------------------------------------------------------


def detect_source(sd: Mapping[str, Any]) -> str:
    """'vit-pytorch' for its key layout; 'official' when Re-attention or the CNN stem is
    present; otherwise 'timm' (a plain ViT: the layouts are the same)."""
    if any(k.startswith(("transformer.layers.", "to_patch_embedding.")) for k in sd):
        return "vit-pytorch"
    if any(".reatten_matrix." in k or k.startswith("patch_embed.conv1") for k in sd):
        return "official"
    return "timm"


def _block_indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def guess_official_variant(sd: Mapping[str, np.ndarray]) -> str | None:
    """The registry name whose structure the official-layout ``sd`` has, or None."""
    try:
        depth = len(_block_indices(sd, r"blocks\.(\d+)\."))
        reattn = tuple(_block_indices(sd, r"blocks\.(\d+)\.attn\.reatten_matrix\."))
        dim = int(sd["cls_token"].shape[-1])
        stem = "patch_embed.conv1.weight" in sd
        grid = pos_embed_grid(sd["pos_embed"].shape)
    except (KeyError, IndexError):
        return None
    for name, cfg in VARIANTS.items():
        if (cfg.depth, cfg.reattn_indices, cfg.embed_dim, cfg.patch_embed == "cnn_stem") == (
                depth, reattn, dim, stem) and cfg.grid_size == grid:
            return name
    for name, cfg in VARIANTS.items():  # same network, other image size
        if (cfg.depth, cfg.reattn_indices, cfg.embed_dim, cfg.patch_embed == "cnn_stem") == (
                depth, reattn, dim, stem):
            return name
    return None


def infer_vit_pytorch_config(sd: Mapping[str, np.ndarray], **overrides) -> ModelConfig:
    """ModelConfig of a vit-pytorch DeepViT from its shapes. Pooling ('cls' / 'mean') cannot
    be inferred: pass ``pool=``."""
    try:
        depth = len(_block_indices(sd, r"transformer\.layers\.(\d+)\."))
        heads = int(sd["transformer.layers.0.0.reattn_weights"].shape[0])
        dim = int(sd["cls_token"].shape[-1])
        inner = int(sd["transformer.layers.0.0.to_qkv.weight"].shape[0]) // 3
        mlp = int(sd["transformer.layers.0.1.net.1.weight"].shape[0])
        patch_dim = int(sd["to_patch_embedding.1.weight"].shape[0])
        num_classes = int(sd["mlp_head.1.weight"].shape[0])
        grid = pos_embed_grid(sd["pos_embedding"].shape)
    except KeyError as e:
        raise ConversionError(f"not a vit-pytorch DeepViT state dict: no key {e}") from e
    patch = round((patch_dim / 3) ** 0.5)
    if 3 * patch * patch != patch_dim or grid is None:
        raise ConversionError(f"vit-pytorch state dict: patch dim {patch_dim} is not 3*p*p "
                              f"or pos_embedding {tuple(sd['pos_embedding'].shape)} is not a "
                              "square grid + class token")
    base = dict(name="vit_pytorch_deepvit", image_size=grid * patch, patch_size=patch,
                num_classes=num_classes, embed_dim=dim, depth=depth, num_heads=heads,
                head_dim=inner // heads, mlp_dim=mlp, qkv_bias=False,
                reattn_blocks="all", reattn_bias=False, reattn_norm="layernorm",
                reattn_norm_eps=1e-5, patch_embed="linear", pool="cls",
                head_norm="after_pool", ln_eps=1e-5)
    return ModelConfig(**{**base, **overrides})


def infer_timm_config(sd: Mapping[str, np.ndarray], **overrides) -> ModelConfig:
    """ModelConfig of a timm ViT/DeiT from its shapes. The head count cannot be inferred:
    pass ``num_heads=`` (ViT/DeiT-Ti 3, -S 6, -B 12). ``reattn_blocks=`` adds identity
    Re-attention on those blocks."""
    extra = sorted(k for k in sd if k.startswith(("dist_token", "head_dist", "fc_norm",
                                                  "reg_token", "norm_pre", "attn_pool")))
    if extra:
        raise ConversionError(f"timm checkpoint with parts DeepViT has no counterpart for "
                              f"(distillation token / global-pool norm / registers): {extra}")
    if "num_heads" not in overrides:
        raise ConversionError("a timm ViT's number of heads cannot be read from its shapes: "
                              "pass num_heads (ViT/DeiT-Ti: 3, -S: 6, -B: 12; CLI --num-heads)")
    try:
        dim = int(sd["cls_token"].shape[-1])
        depth = len(_block_indices(sd, r"blocks\.(\d+)\."))
        mlp = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
        patch = int(sd["patch_embed.proj.weight"].shape[-1])
        num_classes = int(sd["head.weight"].shape[0])
        grid = pos_embed_grid(sd["pos_embed"].shape)
    except KeyError as e:
        raise ConversionError(f"not a timm ViT state dict: no key {e}") from e
    if grid is None:
        raise ConversionError(f"timm pos_embed {tuple(sd['pos_embed'].shape)} is not a class "
                              "token + square grid")
    base = dict(name="timm_vit", image_size=grid * patch, patch_size=patch,
                num_classes=num_classes, embed_dim=dim, depth=depth, mlp_dim=mlp,
                qkv_bias="blocks.0.attn.qkv.bias" in sd, reattn_blocks=(), ln_eps=1e-6,
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875)
    return ModelConfig(**{**base, **overrides})


# --------------------------------------------------------------------------------------
# Identity Re-attention (for a ViT turned into a DeepViT)
# --------------------------------------------------------------------------------------


def identity_reattention(cfg: ModelConfig, block: int) -> dict[Path, np.ndarray]:
    """Weights that make Re-attention in ``block`` the identity on the attention map, exactly
    in float32: Theta = I, bias 0, BatchNorm gamma 1, beta 0, running mean 0 and a running
    var v with float32(v + eps) == 1 so that rsqrt(v + eps) is exactly 1 (var = 1 would
    scale by 1/sqrt(1 + eps)). Exact in eval mode - bit for bit with
    ``attention_impl='reference'``, which applies the formulas in order; the default fused
    path mixes the heads in another order and matches to rounding (~1e-6). In train mode the
    batch statistics normalise the map, as for any freshly added BatchNorm."""
    if cfg.transform_scale:
        raise ConversionError("identity Re-attention needs transform_scale=False "
                              "(it multiplies the map by head_dim**-0.5)")
    if cfg.reattn_norm != "batchnorm":
        raise ConversionError("identity Re-attention is defined for reattn_norm='batchnorm'")
    h = cfg.num_heads
    eps = np.float32(cfg.reattn_norm_eps)
    var = np.float32(1.0) - eps
    while np.float32(var + eps) > np.float32(1.0):
        var = np.nextafter(var, np.float32(0.0))
    while np.float32(var + eps) < np.float32(1.0):
        var = np.nextafter(var, np.float32(2.0))
    p = ("blocks", block, "attn")
    out = {(*p, "reattn_weight"): np.eye(h, dtype=np.float32),
           (*p, "reattn_norm", "scale"): np.ones(h, np.float32),
           (*p, "reattn_norm", "bias"): np.zeros(h, np.float32),
           (*p, "reattn_norm", "mean"): np.zeros(h, np.float32),
           (*p, "reattn_norm", "var"): np.full(h, var, np.float32)}
    if cfg.reattn_bias:
        out[(*p, "reattn_bias")] = np.zeros(h, np.float32)
    return out


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------


def _torch_shape(shape, transform: str) -> tuple[int, ...]:
    return tuple(TRANSFORMS[transform][1](np.broadcast_to(np.float32(0), shape)).shape)


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
    raise ConversionError(_listing(
        f"{what}: {len(problems)} tensor(s) hold NaN/inf values (a diverged or damaged "
        "checkpoint?)", problems,
        "Pass --allow-nonfinite (allow_nonfinite=True) to convert them anyway."))


def _listing(title: str, items: list[str], hint: str, limit: int = 10) -> str:
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return "\n".join([title + ":", *(f"  {x}" for x in items[:limit]), *more, hint])


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
    if source not in _TABLES:
        raise ConversionError(f"unknown source {source!r}; one of {SOURCES}")
    table = _TABLES[source]
    target = weight_shapes(cfg)
    out: dict[Path, np.ndarray] = {}
    unexpected, mismatched, not_float, mapped = [], [], [], []
    for key, value in sd.items():
        hit = table.to_ours(key)
        path = _path(hit[0]) if hit else None
        if path not in target:
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            not_float.append(f"{key}: {np.asarray(value).dtype}")
            continue
        tf = hit[1]
        want = target[path][0]
        arr = np.ascontiguousarray(TRANSFORMS[tf][0](np.asarray(value)), dtype=np.float32)
        if path == ("pos_embed",) and arr.shape != want and arr.shape[-1] == want[-1] and \
                pos_embed_grid(arr.shape) is not None:
            new_grid = pos_embed_grid(want)
            log.warning("resampling pos_embed from a %dx%d to a %dx%d token grid "
                        "(image size %d)", pos_embed_grid(arr.shape), pos_embed_grid(arr.shape),
                        new_grid, new_grid, cfg.image_size)
            arr = resample_pos_embed(arr, new_grid)
        if arr.shape != want:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model expects "
                              f"{_torch_shape(want, tf)}")
            continue
        out[path] = arr
        mapped.append(key)
    if not_float:
        raise ConversionError(_listing(
            f"{len(not_float)} of the {source} checkpoint's weights are not floating-point "
            "tensors (weights are float32, float16 or bfloat16)", not_float,
            "Is this a state dict of weights (not one cast to integers, or of indices / "
            "masks)? Convert the original float checkpoint."))
    if identity_reattn:
        for b in cfg.reattn_indices:
            for p, a in identity_reattention(cfg, b).items():
                out.setdefault(p, a)
    missing = []
    for p, (shape, _) in target.items():
        if p not in out:
            hit = table.to_torch(path_str(p, "."))
            missing.append(f"{hit[0]} {_torch_shape(shape, hit[1])}" if hit
                           else f"{path_str(p, '.')} {shape} (no {source} key maps to it)")
    if missing or unexpected or mismatched:
        hint = ""
        if source == "official":
            guess = guess_official_variant(sd)
            if guess and guess != cfg.name:
                hint = (f"The file looks like {guess!r}; the target is {cfg.name!r} "
                        f"(pass --model {guess}).")
        raise ConversionError(describe_problems(
            f"{source} checkpoint does not fit model {cfg.name!r} "
            f"(depth {cfg.depth}, dim {cfg.embed_dim}, re-attention blocks "
            f"{list(cfg.reattn_indices)})", missing=missing, unexpected=unexpected,
            mismatched=mismatched, hint=hint))
    check_finite({k: sd[k] for k in mapped}, f"the {source} checkpoint",
                 allow_nonfinite=allow_nonfinite)
    return out


def _target_config(sd, model, source, image_size, overrides) -> ModelConfig:
    if model is not None:
        cfg = get_config(model, **overrides)
    elif source == "vit-pytorch":
        cfg = infer_vit_pytorch_config(sd, **overrides)
    elif source == "timm":
        cfg = infer_timm_config(sd, **overrides)
    else:
        guess = guess_official_variant(sd)
        if guess is None:
            raise ConversionError("cannot tell which DeepViT variant this official checkpoint "
                                  f"is: pass model= (one of {', '.join(VARIANTS)})")
        grid = pos_embed_grid(sd["pos_embed"].shape)
        cfg = get_config(guess, **overrides)
        if grid and cfg.grid_size != grid and image_size is None:
            cfg = cfg.replace(image_size=grid * cfg.patch_size)
        log.info("official checkpoint recognised as %s", guess)
    if image_size is not None:
        cfg = cfg.replace(image_size=int(image_size))
    return cfg


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
    cfg = _target_config(sd, model, source, image_size, overrides)
    arrays = convert_state_dict(sd, cfg, source, identity_reattn=(source == "timm"),
                                allow_nonfinite=allow_nonfinite)
    return model_from_arrays(cfg, arrays, what=f"converted {source} weights")


# --------------------------------------------------------------------------------------
# Back to PyTorch
# --------------------------------------------------------------------------------------


def _layout_problems(cfg: ModelConfig, layout: str) -> list[str]:
    want = {
        "official": dict(patch_embed=("conv", "cnn_stem"), reattn_norm=("batchnorm",),
                         reattn_bias=(True,), pool=("cls",), head_norm=("before_pool",)),
        "vit-pytorch": dict(patch_embed=("linear",), reattn_norm=("layernorm",),
                            reattn_bias=(False,), qkv_bias=(False,), adjust_ratio=(1.0,),
                            transform_scale=(False,), head_norm=("after_pool",),
                            reattn_indices=(tuple(range(cfg.depth)),)),
    }[layout]
    return [f"{k}={getattr(cfg, k)!r} (the {layout} layout needs "
            f"{' or '.join(map(repr, v)) if k != 'reattn_indices' else 'all blocks'})"
            for k, v in want.items() if getattr(cfg, k) not in v]


def to_pytorch(model: DeepViT, layout: str | None = None) -> dict[str, Any]:
    """Our model -> a PyTorch state dict (``{key: torch.Tensor}``, float32, CPU).

    ``layout`` 'official' (default for conv / CNN-stem models: the dvit_repo keys of spec
    section 4, incl. ``num_batches_tracked`` = 0 for every BatchNorm) or 'vit-pytorch'
    (default for models converted from vit-pytorch). Values are bit-exact copies.
    """
    torch = _torch()
    cfg = model.config
    if layout is None:
        layout = "vit-pytorch" if cfg.patch_embed == "linear" else "official"
    if layout not in ("official", "vit-pytorch"):
        raise ConversionError(f"unknown layout {layout!r}: 'official' or 'vit-pytorch'")
    problems = _layout_problems(cfg, layout)
    if problems:
        raise ConversionError(f"model {cfg.name!r} cannot be written in the {layout} layout: "
                              + "; ".join(problems))
    table = _TABLES[layout]
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


def save_pytorch(state_dict: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write a state dict as ``.safetensors`` (by extension) or ``torch.save`` otherwise,
    through a temporary file renamed into place (``utils.atomic_output``: claimed first).

    The file is serialised in memory and written by Python: torch's own file writer
    reports a full disk as ``enforce fail ... unexpected pos`` (no errno), safetensors' as
    its own error type; Python's write raises ``OSError(ENOSPC)`` with the file named, the
    one-line exit 4 of every command."""
    import io

    path = os.path.abspath(os.fspath(path))
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in state_dict.items()})
    else:
        buf = io.BytesIO()
        _torch().save(dict(state_dict), buf)
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

