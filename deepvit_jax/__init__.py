"""deepvit-jax: DeepViT (Re-attention vision transformers) in JAX / Flax NNX."""

from deepvit_jax.models import (DeepViT, ModelConfig, count_params, create_model, get_config,
                                list_models)

__version__ = "0.1.0"
__all__ = ["DeepViT", "ModelConfig", "count_params", "create_model", "get_config",
           "list_models"]
