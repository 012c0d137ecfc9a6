from deepvit_jax.models.deepvit import DeepViT, ModelConfig, count_params
from deepvit_jax.models.registry import VARIANTS, create_model, get_config, list_models

__all__ = [
           "VARIANTS",
           "DeepViT",
           "ModelConfig",
           "count_params",
           "create_model",
           "get_config",
           "list_models",
]
