"""The official DeepViT checkpoint layout: zhoudaquan/dvit_repo (timm 0.3.2).

Keys (``shared/reference/deepvit.md`` section 4): the timm ViT keys (``blocks.i.attn.qkv``,
...) plus ``blocks.i.attn.reatten_matrix`` (1x1 Conv2d = Theta),
``blocks.i.attn.var_norm`` (BatchNorm2d) and the CNN stem
``patch_embed.{conv1,bn1,conv2,bn2,proj}``. This module holds the key rules, recognises
which registry variant a file is, and says which models can be written in this layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from deepvit_jax.convert.rules import block_indices
from deepvit_jax.convert.timm_vit import VIT_RULES
from deepvit_jax.errors import ConversionError
from deepvit_jax.models.deepvit import ModelConfig, pos_embed_grid
from deepvit_jax.models.registry import VARIANTS, get_config

log = logging.getLogger(__name__)

OFFICIAL_RULES = (
    *VIT_RULES,
    # CNN stem of DeepViT-S/L (patch_embed.proj is covered above)
    ("patch_embed.{conv}.weight", "patch_embed.{conv}.kernel", "conv"),
    ("patch_embed.{bn}.{bnw}", "patch_embed.{bn}.{bnw}", "id"),
    # Re-attention: Theta = 1x1 conv with bias, Norm = BatchNorm2d over heads
    ("blocks.{i}.attn.reatten_matrix.weight", "blocks.{i}.attn.reattn_weight", "conv1x1"),
    ("blocks.{i}.attn.reatten_matrix.bias", "blocks.{i}.attn.reattn_bias", "id"),
    ("blocks.{i}.attn.var_norm.{bnw}", "blocks.{i}.attn.reattn_norm.{bnw}", "id"),
)


def guess_official_variant(sd: Mapping[str, np.ndarray]) -> str | None:
    """The registry name whose structure the official-layout ``sd`` has, or None."""
    try:
        depth = len(block_indices(sd, r"blocks\.(\d+)\."))
        reattn = tuple(block_indices(sd, r"blocks\.(\d+)\.attn\.reatten_matrix\."))
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


def official_config(sd: Mapping[str, np.ndarray], image_size: int | None = None,
                    **overrides) -> ModelConfig:
    """The registry config an official checkpoint was trained as; without ``image_size``
    its image size follows the file's ``pos_embed`` grid."""
    guess = guess_official_variant(sd)
    if guess is None:
        raise ConversionError("cannot tell which DeepViT variant this official checkpoint "
                              f"is: pass model= (one of {', '.join(VARIANTS)})")
    grid = pos_embed_grid(sd["pos_embed"].shape)
    cfg = get_config(guess, **overrides)
    if grid and cfg.grid_size != grid and image_size is None:
        cfg = cfg.replace(image_size=grid * cfg.patch_size)
    log.info("official checkpoint recognised as %s", guess)
    return cfg


def layout_needs(cfg: ModelConfig) -> dict[str, tuple]:
    """The config values a model needs to be written in the official layout."""
    del cfg  # the official layout fits every depth
    return dict(patch_embed=("conv", "cnn_stem"), reattn_norm=("batchnorm",),
                reattn_bias=(True,), pool=("cls",), head_norm=("before_pool",))
