"""ImageNet-1k: DeepViT-32 (32 blocks, Re-attention in all of them), official recipe.

    python -m deepvit_jax.main --config configs/deepvit_32b_i1k.py --workdir runs/deepvit_32b_i1k

Expected top-1 (ImageNet-1k val, 224 px, EMA weights): 80.90 (released checkpoint: 80.90).
Recipe: the official one (reference section 6), `common.imagenet_config`.
DeepViT-32's recipe differs from the others: mixup 0.1 without cutmix, mixed precision
(bfloat16 compute here, float16 AMP in the original) and the cosine regulariser (weight 0.1,
first 12 consecutive block pairs, similarity along the head axis).
Sized for: 16 GPUs with >= 40 GB each or a TPU v4-16 / v5p-16 slice (global batch 512;
fewer devices and data preparation: see `common.imagenet_config`).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common


def get_config():
    c = common.imagenet_config("deepvit_32b")
    c.mixup_alpha = 0.1
    c.cutmix_alpha = 0.0
    c.compute_dtype = "bfloat16"
    c.cosine_reg_weight = 0.1
    c.cosine_reg_pairs = 12
    return common.lock(c)
