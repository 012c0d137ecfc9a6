"""ImageNet-1k: the paper's ViT-32 baseline (DeepViT-32 with every block plain), official recipe.

    python -m deepvit_jax.main --config configs/vit_32b_i1k.py --workdir runs/vit_32b_i1k

Expected top-1 (ImageNet-1k val, 224 px, EMA weights): 79.27.
Recipe: the official one (reference section 6), `common.imagenet_config`.
The baselines were never released; the recipe of the 32-block baseline is not recorded, so
this uses the common recipe (mixup 0.8 + cutmix 1.0, float32, no regulariser).
Sized for: 16 GPUs with >= 40 GB each or a TPU v4-16 / v5p-16 slice (global batch 512;
fewer devices and data preparation: see `common.imagenet_config`).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common


def get_config():
    c = common.imagenet_config("vit_32b")
    return common.lock(c)
