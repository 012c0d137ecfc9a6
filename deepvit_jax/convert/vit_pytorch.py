"""The vit-pytorch layout: lucidrains' ``vit_pytorch.deepvit.DeepViT``.

Keys ``transformer.layers.L.0.*`` (Re-attention), ``transformer.layers.L.1.*`` (MLP),
``to_patch_embedding.*`` and ``mlp_head.*`` (``shared/reference/deepvit.md`` section 5);
every size is inferred from the shapes. This module holds the key rules, the config read
from the shapes, and which models can be written in this layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from deepvit_jax.convert.rules import block_indices
from deepvit_jax.errors import ConversionError
from deepvit_jax.models.deepvit import ModelConfig, pos_embed_grid

# Each entry: (torch key, our path, transform).
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


def infer_vit_pytorch_config(sd: Mapping[str, np.ndarray], **overrides) -> ModelConfig:
    """ModelConfig of a vit-pytorch DeepViT from its shapes. Pooling ('cls' / 'mean') cannot
    be inferred: pass ``pool=``."""
    try:
        depth = len(block_indices(sd, r"transformer\.layers\.(\d+)\."))
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


def layout_needs(cfg: ModelConfig) -> dict[str, tuple]:
    """The config values a model needs to be written in the vit-pytorch layout."""
    return dict(patch_embed=("linear",), reattn_norm=("layernorm",), reattn_bias=(False,),
                qkv_bias=(False,), adjust_ratio=(1.0,), transform_scale=(False,),
                head_norm=("after_pool",), reattn_indices=(tuple(range(cfg.depth)),))
