"""ImageNet-1k: DeepViT-L (CNN stem, 32 blocks, Re-attention in blocks 20-31), official recipe.

    python -m deepvit_jax.main --config configs/deepvit_l_i1k.py --workdir runs/deepvit_l_i1k

Expected top-1 (ImageNet-1k val, 224 px, EMA weights): 83.1 (released checkpoint DViT_83_32b: 83.1).
Recipe: the official one (reference section 6), `common.imagenet_config`.
Sized for: 16 GPUs with >= 40 GB each or a TPU v4-16 / v5p-16 slice (global batch 512;
fewer devices and data preparation: see `common.imagenet_config`).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common


def get_config():
    c = common.imagenet_config("deepvit_l")
    return common.lock(c)
