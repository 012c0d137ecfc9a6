"""Attention collapse at CPU scale: a deep, narrow plain ViT against a DeepViT of the same
depth on the embedded digits (docs/collapse.md).

    python -m deepvit_jax.main --config configs/collapse.py:vit --workdir runs/collapse_vit
    python -m deepvit_jax.main --config configs/collapse.py:deepvit --workdir runs/collapse_deepvit

The digits are upscaled to 64x64 and cut into 8x8-px patches: 64 tokens + the class token,
enough for the attention maps to have structure. Both models: 12 blocks, 64-d, 4 heads
(head dim 16), MLP 3C; ``deepvit`` uses Re-attention in every block, ``vit`` in none. Same
recipe for both (the default config's: AdamW, warm-up + cosine, no mixup / RandAugment),
no EMA (the analysis looks at the trained weights), checkpoints kept along the way so the
analysis can follow the maps during training. 550 steps of 64 images each.
"""

from deepvit_jax.data.config import digits_data_config
from deepvit_jax.train import config as config_lib

ARGS = {"vit": "vit_16b", "deepvit": "deepvit_16b"}


def get_config(arg: str = "deepvit"):
    if arg not in ARGS:
        raise ValueError(f"configs/collapse.py:{arg}: use one of {sorted(ARGS)}")
    c = config_lib.base_config(ARGS[arg])
    c.data.update(digits_data_config())
    c.mix.mixup_alpha = 0.0
    c.mix.cutmix_alpha = 0.0
    m = c.model
    m.image_size = 64
    m.patch_size = 8
    m.embed_dim = 64
    m.depth = 12
    m.num_heads = 4
    m.crop_pct = 1.0
    # reattn_blocks is left to the variant: 'all' for deepvit_16b, none for vit_16b.
    c.batch_size = 64
    c.num_epochs = 25
    c.cooldown_epochs = 0
    c.warmup_epochs = 2
    c.optim.learning_rate = 1e-3
    c.optim.min_lr = 1e-5
    c.ema_decay = 0.0
    c.eval.bn_recalibration_batches = 10
    c.log_every_steps = 22
    c.eval.every_steps = 110  # 5 epochs of 22 steps
    c.checkpoint.every_steps = 110
    c.checkpoint.keep = 10  # every evaluation kept: the analysis follows the training
    c.seed = 0
    return config_lib.lock(c)
