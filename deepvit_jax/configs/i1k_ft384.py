"""ImageNet-1k fine-tuning at 384 px from a 224-px model (DeepViT-L -> DeepViT-L 384).

    python -m deepvit_jax.main --config configs/i1k_ft384.py:deepvit_l_384 \
        --workdir runs/deepvit_l_384 --config.init_from=PATH_TO_DEEPVIT_L_224_MODEL

PATH is a model directory (``deepvit_jax.model_dir.save_model``): the converted official
DViT_83_32b.pth.tar, or the exported EMA weights of a ``configs/i1k.py:deepvit_l`` run. The
position embedding is resized bicubically from 14x14 to 24x24; everything else is copied.

Expected top-1 (ImageNet-1k val, 384 px, crop fraction 1.0): 84.25 (paper; this model was
never released). The fine-tuning recipe is not recorded by the release; this uses DeiT's
384-px fine-tuning recipe: 30 epochs at a constant lr 5e-6, weight decay 1e-8, no warm-up,
the same augmentation / mixup / label smoothing / drop path 0.2 / EMA as pre-training.
Sized for: 16 GPUs with 80 GB each (A100/H100; 32 images per GPU = global batch 512) with
per-block rematerialisation (577 tokens make the 12x577x577 attention maps of 32 blocks the
memory bottleneck), or a TPU v4-32 / v5p-32 slice. Compiled for TPUs without one (README,
"Will it fit?"; benchmarks/results/aot_tpu.json, libtpu 0.0.42.1): at the full batch it fits
a v5e-8 (64 images per chip: 14.7 of 16 GiB with the default attention, 10.9 GiB with
``--config.model.attention_impl=pallas``), a v4-8 (23.8 GiB) and a v5p-8 (23.9 GiB); for
v6e-8, libtpu 0.0.42.1 fails inside its compiler on it and libtpu 0.0.52 compiles it
(11.5 GiB).
"""

from ml_collections import config_dict

from deepvit_jax.train import config as config_lib

RECIPES = {"deepvit_l_384": 84.25}


def get_config(arg: str = "deepvit_l_384"):
    if arg not in RECIPES:
        raise ValueError(f"configs/i1k_ft384.py:{arg}: unknown recipe; use one of "
                         f"{sorted(RECIPES)}")
    c = config_lib.imagenet_config(arg)
    c.expected_top1 = RECIPES[arg]
    # Required (validate() refuses a run without it): --config.init_from=PATH, a 224-px
    # DeepViT-L model directory.
    c.init_from = config_dict.placeholder(str)
    c.model.remat = True
    c.num_epochs = 30
    c.cooldown_epochs = 0
    c.warmup_epochs = 0
    c.optim.learning_rate = 5e-6
    c.optim.min_lr = 5e-6
    c.optim.warmup_lr = 5e-6
    c.optim.weight_decay = 1e-8
    return config_lib.lock(c)
