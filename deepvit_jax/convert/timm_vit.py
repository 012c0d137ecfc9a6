"""The timm ViT/DeiT layout (``VisionTransformer``): its key rules, the config read from its
shapes, and the identity Re-attention weights that turn it into a DeepViT.

A timm ViT has the same key names as a plain official block (``shared/reference/deepvit.md``
sections 4-5). It converts into our ViT, or into a DeepViT whose extra Re-attention blocks
start as the identity (Theta = I, zero bias, identity BatchNorm), so that the network
computes the ViT's function exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from deepvit_jax.convert.rules import block_indices
from deepvit_jax.errors import ConversionError
from deepvit_jax.model_dir import Path
from deepvit_jax.models.deepvit import ModelConfig, pos_embed_grid

# Each entry: (torch key, our path, transform). A '{bnw}' torch field maps through
# rules.NORM_NAMES.
VIT_RULES = (  # timm VisionTransformer layout, shared by the official release
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

TIMM_RULES = VIT_RULES


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
        depth = len(block_indices(sd, r"blocks\.(\d+)\."))
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
