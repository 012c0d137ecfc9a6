"""Pieces shared by every training config.

A config is one flat, locked ``ml_collections.ConfigDict``: the training fields below, the
data-pipeline fields of :func:`deepvit_jax.data.config.default_data_config` (``dataset``,
augmentation, mixup, ...) at the top level, ``model_overrides`` (any ModelConfig field;
unset fields keep the named variant's value) and ``mesh``. Any field can be overridden on
the command line (``--config.batch_size=256``, ``--config.model_overrides.depth=4``); a
misspelled field is an error.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from deepvit_jax.data.config import default_data_config
from deepvit_jax.models import ModelConfig

# ModelConfig fields the training config sets elsewhere (num_classes comes from the dataset,
# dtype from compute_dtype, name from `model`).
_NOT_OVERRIDABLE = ("name", "num_classes", "dtype")
_TYPES = {"head_dim": int, "mlp_dim": int, "reattn_blocks": tuple, "mean": tuple,
          "std": tuple}


def model_overrides() -> ml_collections.ConfigDict:
    """One placeholder (None = keep the variant's value) per ModelConfig field."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(ModelConfig):
        if f.name in _NOT_OVERRIDABLE:
            continue
        typ = _TYPES.get(f.name, type(f.default))
        c[f.name] = config_dict.placeholder(typ)
    return c


def base_config(model: str = "deepvit_16b") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # --- model ---------------------------------------------------------------------------
    c.model = model  # a name from deepvit_jax.list_models()
    c.model_overrides = model_overrides()
    c.compute_dtype = "float32"  # 'bfloat16' = mixed precision (float32 parameters)
    c.init_from = ""  # a deepvit_jax.checkpoint model directory to start from
    # --- data (deepvit_jax/data/config.py; flattened in) ---------------------------------
    for key, value in default_data_config().items():
        # None-valued fields become typed placeholders so the command line can set them.
        c[key] = config_dict.placeholder(str) if value is None else value
    c.batch_size = 512  # global, per train_step call (= per update without accumulation)
    c.eval_batch_size = 0  # 0: same as batch_size
    # --- optimisation (official recipe, reference section 6) ------------------------------
    c.num_epochs = 300
    c.cooldown_epochs = 10
    c.warmup_epochs = 5
    c.total_steps = 0  # > 0: run exactly this many steps (schedule compressed to fit)
    c.learning_rate = 5e-4
    c.warmup_lr = 1e-6
    c.min_lr = 1e-5
    c.weight_decay = 0.05
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.grad_clip_norm = 0.0  # 0: no clipping (official)
    c.grad_accum_steps = 1  # > 1: optax.MultiSteps; effective batch = k * batch_size
    c.ema_decay = 0.99996  # 0: no EMA
    c.cosine_reg_weight = 0.0  # DeepViT-32: 0.1
    c.cosine_reg_pairs = 12
    # Before each evaluation, re-estimate every BatchNorm's statistics (live and EMA model)
    # on this many training batches; 0: evaluate with the running statistics as they are.
    c.bn_recalibration_batches = 0
    c.bn_recalibration_batch_size = 0  # 0: same as batch_size
    # --- parallelism -----------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # --- bookkeeping ---------------------------------------------------------------------------
    c.log_every_steps = 100
    c.eval_every_steps = 5004  # 2 epochs at batch 512
    c.checkpoint_every_steps = 2502  # 1 epoch at batch 512
    c.keep_checkpoints = 3  # the last K, plus the best by EMA top-1
    c.seed = 42
    return c


def imagenet_config(model: str) -> ml_collections.ConfigDict:
    """The official ImageNet-1k recipe (timm 0.3.2 yaml files of the release).

    Global batch 512 = 32 images per GPU on 16 GPUs with >= 40 GB each (A100/H100), the
    official per-GPU batch, or a TPU v4-16 / v5p-16 slice. On fewer devices keep the global
    batch with ``--config.grad_accum_steps=K --config.batch_size=512/K``. Needs ImageNet
    prepared for TFDS: ``python -m deepvit_jax.data prepare imagenet2012 --manual-dir ...``.
    """
    c = base_config(model)
    c.dataset = "imagenet2012"
    c.train_split = "train"
    c.eval_split = "validation"
    c.cache = False
    c.model_overrides.drop_path_rate = 0.2
    c.bn_recalibration_batches = 50  # the official script: 50 batches of 256 before each eval
    c.bn_recalibration_batch_size = 256
    return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.lock()
    return c
