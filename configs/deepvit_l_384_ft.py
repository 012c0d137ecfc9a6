"""ImageNet-1k: fine-tune DeepViT-L at 384 px from a 224-px DeepViT-L checkpoint.

    python -m deepvit_jax.main --config configs/deepvit_l_384_ft.py \
        --workdir runs/deepvit_l_384_ft \
        --config.init_from=PATH_TO_DEEPVIT_L_224_MODEL

PATH is a model directory written by `deepvit_jax.checkpoint.save_model` (e.g. the converted
DViT_83_32b.pth.tar, or the EMA weights of a configs/deepvit_l_i1k.py run). The position
embedding is resized bicubically from 14x14 to 24x24; everything else is copied.

Expected top-1 (ImageNet-1k val, 384 px, crop fraction 1.0): 84.25 (paper; this model was
never released). The fine-tuning recipe is not recorded by the release; this uses DeiT's
384-px fine-tuning recipe: 30 epochs at a constant lr 5e-6, weight decay 1e-8, no warm-up,
the same augmentation / mixup / label smoothing / drop path 0.2 / EMA as pre-training.
Sized for: 16 GPUs with 80 GB each (A100/H100; 32 images per GPU = global batch 512) with
per-block rematerialisation (577 tokens make the 12x577x577 attention maps of 32 blocks the
memory bottleneck), or a TPU v4-32 / v5p-32 slice.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common


def get_config():
    c = common.imagenet_config("deepvit_l_384")
    c.init_from = ""  # REQUIRED: --config.init_from=PATH (a 224-px DeepViT-L model directory)
    c.model_overrides.remat = True
    c.num_epochs = 30
    c.cooldown_epochs = 0
    c.warmup_epochs = 0
    c.learning_rate = 5e-6
    c.min_lr = 5e-6
    c.warmup_lr = 5e-6
    c.weight_decay = 1e-8
    return common.lock(c)
