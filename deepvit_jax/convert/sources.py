"""The PyTorch sources a conversion knows, one rule table each, and how a state dict is
recognised: which source wrote it and which model it describes.

Sources (``shared/reference/deepvit.md`` sections 4-5): ``official`` (``official.py``),
``vit-pytorch`` (``vit_pytorch.py``) and ``timm`` (``timm_vit.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from deepvit_jax.convert.official import OFFICIAL_RULES, official_config
from deepvit_jax.convert.rules import RuleTable
from deepvit_jax.convert.timm_vit import TIMM_RULES, infer_timm_config
from deepvit_jax.convert.vit_pytorch import VIT_PYTORCH_RULES, infer_vit_pytorch_config
from deepvit_jax.models.deepvit import ModelConfig
from deepvit_jax.models.registry import get_config

SOURCES = ("official", "vit-pytorch", "timm")

RULES = {"official": OFFICIAL_RULES, "vit-pytorch": VIT_PYTORCH_RULES, "timm": TIMM_RULES}

TABLES = {src: RuleTable(rules) for src, rules in RULES.items()}


def detect_source(sd: Mapping[str, Any]) -> str:
    """'vit-pytorch' for its key layout; 'official' when Re-attention or the CNN stem is
    present; otherwise 'timm' (a plain ViT: the layouts are the same)."""
    if any(k.startswith(("transformer.layers.", "to_patch_embedding.")) for k in sd):
        return "vit-pytorch"
    if any(".reatten_matrix." in k or k.startswith("patch_embed.conv1") for k in sd):
        return "official"
    return "timm"


def target_config(sd: Mapping[str, np.ndarray], model: str | ModelConfig | None, source: str,
                  image_size: int | None, overrides: Mapping[str, Any]) -> ModelConfig:
    """The model a ``source`` state dict converts into: ``model`` (a registry name or
    config) with ``overrides``, else inferred from ``sd``; ``image_size`` replaces the
    image size last."""
    if model is not None:
        cfg = get_config(model, **overrides)
    elif source == "vit-pytorch":
        cfg = infer_vit_pytorch_config(sd, **overrides)
    elif source == "timm":
        cfg = infer_timm_config(sd, **overrides)
    else:
        cfg = official_config(sd, image_size, **overrides)
    if image_size is not None:
        cfg = cfg.replace(image_size=int(image_size))
    return cfg
