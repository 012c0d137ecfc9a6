"""Training on a Colab runtime (``colab/train_tpu.ipynb``): one recipe per runtime and dataset.

    python -m deepvit_jax.main --config configs/colab.py:tpu_v5e1,imagenette --workdir DIR

The argument is ``RUNTIME[,DATASET]``:

=============  ==================================================================
``tpu_v5e1``   Colab TPU v5e-1 (1 chip, 16 GB HBM): DeepViT-16 at 160 px, batch 256,
               bfloat16, augmentation on the device (the runtime's host CPUs are few)
``tpu_v2_8``   Colab TPU v2-8 (8 cores, 8 GB each): batch 512 (64 per core), bfloat16
``gpu``        Colab GPU (T4 16 GB; also L4 / A100): batch 128, float32 because a T4
               has no fast bfloat16 (on an L4 / A100 add ``model.dtype='bfloat16'``)
``cpu_small``  no accelerator: the digits-sized model of ``configs/default.py`` (4 blocks,
               64-d, 8x8-px patches; 64 px for a downloaded dataset) and fewer epochs
=============  ==================================================================

Datasets (all download through TFDS on first use, except digits which ships with the package):
``imagenette`` (``imagenette/160px-v2``, 10 ImageNet classes, 9,469 / 3,925 images; default),
``oxford_flowers102`` (102 classes; trains on ``train+validation`` = 2,040 images and
evaluates on the 6,149 ``test`` images; from scratch a ViT learns little from 2,040 images,
imagenette is the better demonstration) and ``digits`` (the embedded set, for CI and
``cpu_small``). Download first: ``python -m deepvit_jax.data prepare imagenette/160px-v2``.

The recipe is the official one (AdamW, warm-up + cosine, RandAugment, random erasing,
mixup / cutmix, label smoothing) scaled to a small dataset: learning rate 5e-4 x batch / 512
(the official linear rule), drop path 0.1, EMA 0.999 (the official 0.99996 is meant for
750k steps; a Colab run has a few thousand) with BatchNorm statistics re-estimated on 10
training batches before each evaluation. A checkpoint is written every epoch, so a
disconnected runtime loses at most one epoch when it resumes from the same workdir.

These sizes are estimates from FLOP counts and memory, not measured on a Colab runtime.
"""

from deepvit_jax.data.config import digits_data_config
from deepvit_jax.train import config as config_lib

# Runtime -> global batch size, compute dtype, host or device augmentation.
RUNTIMES = {
    "tpu_v5e1": {"batch_size": 256, "dtype": "bfloat16", "device_augment": True},
    "tpu_v2_8": {"batch_size": 512, "dtype": "bfloat16", "device_augment": True},
    "gpu": {"batch_size": 128, "dtype": "float32", "device_augment": True},
    "cpu_small": {"batch_size": 128, "dtype": "float32", "device_augment": False},
}

# Dataset -> TFDS name, splits, training images (for the cadence), epochs at full size.
DATASETS = {
    "imagenette": {"dataset": "imagenette/160px-v2", "train_split": "train",
                   "eval_split": "validation", "num_train": 9469, "epochs": 100},
    "oxford_flowers102": {"dataset": "oxford_flowers102", "train_split": "train+validation",
                          "eval_split": "test", "num_train": 2040, "epochs": 300},
    "digits": {"dataset": "digits", "train_split": "train", "eval_split": "test",
               "num_train": 1437, "epochs": 50},
}


def _parse(arg: str) -> tuple[str, str]:
    runtime, _, dataset = arg.partition(",")
    runtime, dataset = runtime.strip(), dataset.strip() or "imagenette"
    if runtime not in RUNTIMES:
        raise ValueError(f"configs/colab.py:{arg}: unknown runtime {runtime!r}; use one of "
                         f"{sorted(RUNTIMES)} (optionally ',DATASET')")
    if dataset not in DATASETS:
        raise ValueError(f"configs/colab.py:{arg}: unknown dataset {dataset!r}; use one of "
                         f"{sorted(DATASETS)}")
    return runtime, dataset


def get_config(arg: str = "tpu_v5e1,imagenette"):
    runtime, dataset = _parse(arg)
    rt, ds = RUNTIMES[runtime], DATASETS[dataset]
    small = runtime == "cpu_small"
    c = config_lib.base_config("deepvit_16b")
    m = c.model
    if dataset == "digits":
        # The digits recipe of configs/default.py: no flips / RandAugment / erasing / mixing
        # (they destroy 8x8 digits).
        c.data.update(digits_data_config())
        c.mix.mixup_alpha = 0.0
        c.mix.cutmix_alpha = 0.0
        m.image_size = 32
        m.patch_size = 8
        m.crop_pct = 1.0
    else:
        c.data.dataset = ds["dataset"]
        c.data.shuffle_buffer = 4096
        m.image_size = 64 if small else 160  # 160 px: 10 x 10 patches of 16 px
        if small:
            m.patch_size = 8
    c.data.train_split = ds["train_split"]
    c.data.eval_split = ds["eval_split"]
    c.data.device_augment = rt["device_augment"] and dataset != "digits"
    if small or dataset == "digits":
        # configs/default.py's model: 4 blocks, 64-d, 4 heads, Re-attention in every block.
        m.embed_dim = 64
        m.depth = 4
        m.num_heads = 4
        m.reattn_blocks = (0, 1, 2, 3)
    m.dtype = rt["dtype"]
    m.drop_path_rate = 0.0 if small or dataset == "digits" else 0.1

    c.batch_size = rt["batch_size"]
    c.num_epochs = ds["epochs"] if not small or dataset == "digits" else 10
    c.warmup_epochs = 3 if dataset == "digits" or small else 5
    c.cooldown_epochs = 0
    if dataset == "digits":
        c.optim.learning_rate = 2e-3  # configs/default.py's value for the 64-d model
    else:
        c.optim.learning_rate = 5e-4 * c.batch_size / 512
    c.ema_decay = 0.99 if dataset == "digits" else 0.999
    c.eval.bn_recalibration_batches = 10

    steps_per_epoch = max(ds["num_train"] // c.batch_size, 1)
    c.checkpoint.every_steps = steps_per_epoch
    c.checkpoint.keep = 2
    c.eval.every_steps = steps_per_epoch * (10 if dataset == "digits" else 5)
    c.log_every_steps = min(20, steps_per_epoch)
    c.seed = 0
    return config_lib.lock(c)
