"""ImageNet-1k pre-training at 224 px with the official recipe: every released DeepViT and
the paper's ViT baselines, one argument each.

    python -m deepvit_jax.main --config configs/i1k.py:deepvit_16b --workdir runs/deepvit_16b

Arguments (``RECIPES`` below; the expected top-1 is ImageNet-1k val at 224 px with the EMA
weights, from the paper and the official release):

    deepvit_16b 79.10   deepvit_24b 79.99   deepvit_32b 80.90
    vit_16b     78.88   vit_24b     79.35   vit_32b     79.27
    deepvit_s   82.3    deepvit_l   83.1

Recipe: the official one (``deepvit_jax.train.config.imagenet_config``): AdamW lr 5e-4,
weight decay 0.05, 300 + 10 epochs with 5 warm-up, global batch 512, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1,
drop path 0.2, EMA 0.99996, BatchNorm re-estimated on 50 x 256 training images before each
evaluation. DeepViT-32 differs: mixup 0.1 without cutmix, mixed precision (bfloat16 here,
float16 AMP in the original) and the cosine regulariser (weight 0.1 over the first 12
consecutive block pairs). The ViT baselines were never released; their recipe is the common
one.

Sized for: 16 GPUs with >= 40 GB each (A100/H100; 32 images per GPU, the official per-GPU
batch) or a TPU v4-16 / v5p-16 slice. On fewer devices keep the global batch with
``--config.optim.grad_accum_steps=K --config.batch_size=512/K``. Compiled for TPUs without
one (README, "Will it fit?"; benchmarks/results/aot_tpu.json, libtpu 0.0.42.1), at the full
batch: every recipe fits a v5p-8 (128 images per chip) and a v6e-8 (64 per chip; DeepViT-32
there compiles with libtpu 0.0.52, 23.4 of 32 GiB, while 0.0.42.1 fails inside its
compiler); on a v5e-8 (64 per 16-GiB chip) and a v4-8 (128 per 32-GiB chip) all but
DeepViT-32, ViT-32 and DeepViT-L, which fit there with ``--config.batch_size=256
--config.optim.grad_accum_steps=2`` (recommended: the same FLOPs per image; DeepViT-32
12.1 GiB per v5e chip) or with ``--config.model.remat=True`` (the least memory, DeepViT-32
7.6 GiB, but the forward computed twice: 23-25% more FLOPs per image). Data:
``python -m deepvit_jax.data prepare imagenet2012 --manual-dir DIR --data-dir TFDS_DIR``
then ``--config.data.data_dir=TFDS_DIR``.
"""

from deepvit_jax.train import config as config_lib

# Published top-1 (%) of each recipe: the paper's tables and the official release.
RECIPES = {
    "deepvit_16b": 79.10, "deepvit_24b": 79.99, "deepvit_32b": 80.90,
    "vit_16b": 78.88, "vit_24b": 79.35, "vit_32b": 79.27,
    "deepvit_s": 82.3, "deepvit_l": 83.1,
}


def get_config(arg: str = "deepvit_16b"):
    if arg not in RECIPES:
        raise ValueError(f"configs/i1k.py:{arg}: unknown recipe; use one of {sorted(RECIPES)}")
    c = config_lib.imagenet_config(arg)
    c.expected_top1 = RECIPES[arg]
    if arg == "deepvit_32b":
        c.mix.mixup_alpha = 0.1
        c.mix.cutmix_alpha = 0.0
        c.model.dtype = "bfloat16"
        c.loss.cosine_reg_weight = 0.1
        c.loss.cosine_reg_pairs = 12
    return config_lib.lock(c)
