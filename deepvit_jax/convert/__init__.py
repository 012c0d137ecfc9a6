"""PyTorch <-> JAX weight conversion (official DeepViT, vit-pytorch DeepViT, timm ViT/DeiT).

    from deepvit_jax.convert import from_pytorch, to_pytorch
    model = from_pytorch("DViT_82_16b.pth.tar", model="deepvit_s")      # ready nnx.Module
    state_dict = to_pytorch(model)                                     # official key layout

CLI: ``python -m deepvit_jax.convert --help``.
"""

from deepvit_jax.convert.pytorch import convert_state_dict, from_pytorch, to_pytorch
from deepvit_jax.convert.sources import SOURCES, detect_source
from deepvit_jax.convert.timm_vit import identity_reattention, infer_timm_config
from deepvit_jax.convert.torch_files import load_state_dict, save_pytorch
from deepvit_jax.convert.vit_pytorch import infer_vit_pytorch_config
from deepvit_jax.errors import ConversionError
from deepvit_jax.models.deepvit import resample_pos_embed

__all__ = ["SOURCES", "ConversionError", "convert_state_dict", "detect_source", "from_pytorch",
           "identity_reattention", "infer_timm_config", "infer_vit_pytorch_config",
           "load_state_dict", "resample_pos_embed", "save_pytorch", "to_pytorch"]
