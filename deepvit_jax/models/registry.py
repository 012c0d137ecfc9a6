"""Named variants: the six released DeepViT models and the paper's plain-ViT baselines."""

from __future__ import annotations

from flax import nnx

from deepvit_jax.models.deepvit import DeepViT, ModelConfig

_BASE = ModelConfig()  # 384-d, 12 heads, MLP 3C, qkv bias, patch 16, LN eps 1e-6


def _plain(depth: int) -> ModelConfig:
    return _BASE.replace(name=f"vit_{depth}b", depth=depth, reattn_blocks=())


def _reattn(depth: int) -> ModelConfig:
    return _BASE.replace(name=f"deepvit_{depth}b", depth=depth, reattn_blocks="all")


_DEEPVIT_S = _BASE.replace(
    name="deepvit_s", embed_dim=396, depth=16, patch_embed="cnn_stem",
    reattn_blocks=tuple(range(11, 16)), transform_scale=True, adjust_ratio=0.5)
_DEEPVIT_L = _BASE.replace(
    name="deepvit_l", embed_dim=420, depth=32, patch_embed="cnn_stem",
    reattn_blocks=tuple(range(20, 32)), adjust_ratio=0.5)

VARIANTS: dict[str, ModelConfig] = {
    "deepvit_16b": _reattn(16),
    "deepvit_24b": _reattn(24),
    "deepvit_32b": _reattn(32),
    "vit_16b": _plain(16),
    "vit_24b": _plain(24),
    "vit_32b": _plain(32),
    "deepvit_s": _DEEPVIT_S,
    "deepvit_l": _DEEPVIT_L,
    "deepvit_l_384": _DEEPVIT_L.replace(name="deepvit_l_384", image_size=384, crop_pct=1.0),
}

# The official release's entrypoint names (dvit_repo/models/deep_vision_transformer.py).
OFFICIAL_NAMES: dict[str, str] = {
    "deepvit_patch16_224_re_attn_16b": "deepvit_16b",
    "deepvit_patch16_224_re_attn_24b": "deepvit_24b",
    "deepvit_patch16_224_re_attn_32b": "deepvit_32b",
    "deepvit_S": "deepvit_s",
    "deepvit_L": "deepvit_l",
    "deepvit_L_384": "deepvit_l_384",
}


def official_name(name: str) -> str:
    """The official entrypoint of one of our variants (``deepvit_s`` -> ``deepvit_S``); the
    ViT baselines, which the release does not name, keep their own name."""
    return {ours: official for official, ours in OFFICIAL_NAMES.items()}.get(name, name)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (official entrypoint names work too)."""
    return list(VARIANTS)


def get_config(name: str | ModelConfig, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a named variant with ``overrides`` applied."""
    if isinstance(name, ModelConfig):
        cfg = name
    else:
        key = OFFICIAL_NAMES.get(name, name)
        if key not in VARIANTS:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(VARIANTS)} "
                             f"(or the official names {', '.join(OFFICIAL_NAMES)})")
        cfg = VARIANTS[key]
    return cfg.replace(**overrides) if overrides else cfg


def create_model(name: str | ModelConfig, *, num_classes: int = 1000,
                 rngs: nnx.Rngs | None = None, **overrides) -> DeepViT:
    """Build a variant by name (or from a ModelConfig) as an ``nnx.Module``.

    ``overrides`` are ModelConfig fields, e.g. ``image_size=32``, ``dtype='bfloat16'``,
    ``drop_path_rate=0.1``, ``reattn_blocks=range(8, 16)``. The model starts in train mode
    (as ``nnx`` modules do); call ``model.eval()`` for inference.
    """
    cfg = get_config(name, num_classes=num_classes, **overrides)
    return DeepViT(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
