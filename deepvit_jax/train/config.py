"""The training config: its sections, its defaults (one per field), its checks, and the
epoch -> step arithmetic.

A config is a locked ``ml_collections.ConfigDict``. Config files (``configs/*.py``) start
from :func:`base_config` (or :func:`imagenet_config`) and change what their recipe changes.
Each section is handed as it is to the code that owns it:

=====================  =================================================================
``model_name``         a name from ``deepvit_jax.list_models()``
``model``              ModelConfig overrides (None = keep the variant's value), e.g.
                       ``model.depth``, ``model.dtype`` ('bfloat16' = mixed precision),
                       ``model.drop_path_rate`` -> ``models.get_config``
``data``               dataset, splits, reading, host augmentation -> ``data.train_stream``
``mix``                mixup / cutmix / label smoothing -> ``data.mix.mix_batch``
``optim``              AdamW, learning-rate schedule values, clipping, accumulation
                       -> ``train.step.make_optimizer`` / ``cosine_schedule``
``loss``               the cosine regulariser of the 32-block recipe -> ``train.step``
``eval``               cadence, batch size, BatchNorm re-estimation -> ``train.evaluation``
``checkpoint``         cadence and retention -> ``train.checkpoints``
``mesh``               device mesh axes -> ``parallel.make_mesh``
top level              batch size, run length (epochs or steps), EMA, seed, logging,
                       ``init_from``, ``overwrite``
=====================  =================================================================

Any field can be overridden on the command line (``--config.batch_size=256``,
``--config.model.depth=4``, ``--config.optim.learning_rate=1e-3``); a misspelled field is
an error because the config is locked.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from deepvit_jax.data.config import default_data_config, default_mix_config
from deepvit_jax.errors import ConfigError
from deepvit_jax.models import ModelConfig

# ModelConfig fields that the run sets itself: the name from `model_name`, the class count
# from the dataset.
_NOT_OVERRIDABLE = ("name", "num_classes")
_TYPES = {"head_dim": int, "mlp_dim": int, "reattn_blocks": tuple, "mean": tuple,
          "std": tuple}


def model_section() -> ml_collections.ConfigDict:
    """One placeholder (None = keep the variant's value) per ModelConfig field."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _NOT_OVERRIDABLE:
            c[f.name] = config_dict.placeholder(_TYPES.get(f.name, type(f.default)))
    return c


def _placeholders(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """None-valued fields become typed (str) placeholders so the command line can set them."""
    for key, value in section.items():
        if value is None:
            section[key] = config_dict.placeholder(str)
    return section


def base_config(model_name: str = "deepvit_16b") -> ml_collections.ConfigDict:
    """Every field with its default: the official optimizer and recipe values."""
    c = ml_collections.ConfigDict()
    c.model_name = model_name
    c.model = model_section()
    # A model directory (deepvit_jax.checkpoint.save_model) to start from. A recipe that
    # needs one sets it to a None placeholder: validate() then requires --config.init_from.
    c.init_from = ""
    # True: start over in a workdir that holds another run's files (metrics.jsonl,
    # tensorboard/, train.log) but no checkpoint to resume; they are replaced. False (the
    # default): such a workdir is refused, naming the files.
    c.overwrite = False
    c.data = _placeholders(default_data_config())
    c.mix = default_mix_config()

    c.batch_size = 512  # global, per train_step call (= per update without accumulation)
    c.num_epochs = 300
    c.warmup_epochs = 5
    c.cooldown_epochs = 10
    c.total_steps = 0  # > 0: run exactly this many steps (the schedule compressed to fit)
    c.ema_decay = 0.99996  # 0: no EMA (timm ModelEmaV2 over parameters and BN statistics)
    c.seed = 42
    c.log_every_steps = 100
    # Attention collapse monitored every this many steps (0: off): each block's similarity
    # to the next one (the paper's Eq. 2) and the similar-block count on a fixed probe batch
    # -> collapse/* in metrics.jsonl and TensorBoard (deepvit_jax.analysis.monitor).
    c.collapse_every_steps = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 5e-4
    c.optim.warmup_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 0.0  # 0: no clipping (official)
    c.optim.grad_accum_steps = 1  # > 1: optax.MultiSteps; effective batch = k * batch_size

    c.loss = ml_collections.ConfigDict()
    c.loss.cosine_reg_weight = 0.0  # DeepViT-32: 0.1
    c.loss.cosine_reg_pairs = 12

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 5004  # 2 epochs at batch 512
    c.eval.batch_size = 0  # 0: batch_size
    # Before each evaluation, re-estimate every BatchNorm's statistics (live and EMA model)
    # on this many training batches; 0: evaluate with the running statistics as they are.
    c.eval.bn_recalibration_batches = 0
    c.eval.bn_recalibration_batch_size = 0  # 0: batch_size

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 2502  # 1 epoch at batch 512
    c.checkpoint.keep = 3  # the last K, plus the best by (EMA) top-1

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # The recipe's published ImageNet-1k top-1 (%), for the record; None for other runs.
    c.expected_top1 = config_dict.placeholder(float)
    return c


def imagenet_config(model_name: str) -> ml_collections.ConfigDict:
    """The official ImageNet-1k recipe of the released models (timm 0.3.2 yaml files).

    Global batch 512 = 32 images per GPU on 16 GPUs with >= 40 GB each (A100/H100), the
    official per-GPU batch, or a TPU v4-16 / v5p-16 slice. On fewer devices keep the global
    batch with ``--config.optim.grad_accum_steps=K --config.batch_size=512/K``. Needs
    ImageNet prepared for TFDS: ``python -m deepvit_jax.data prepare imagenet2012
    --manual-dir ...``.
    """
    c = base_config(model_name)
    c.data.dataset = "imagenet2012"
    c.data.eval_split = "validation"
    c.model.drop_path_rate = 0.2
    # One block body per run of alike blocks: a TPU compile of DeepViT-16 at 224 px takes about
    # a minute instead of more than 18 (README, "Will it fit?"); same numbers and checkpoints.
    c.model.scan_blocks = True
    c.eval.bn_recalibration_batches = 50  # the official script: 50 batches of 256 per eval
    c.eval.bn_recalibration_batch_size = 256
    return c


# --------------------------------------------------------------------------------------
# Checks (field by field, no compute) and the run length
# --------------------------------------------------------------------------------------


def _positive_int(config, *fields):
    for f in fields:
        value = _get(config, f)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config.{f}={value!r}: must be a positive integer")


def _non_negative(config, *fields):
    for f in fields:
        value = _get(config, f)
        if value is None or value < 0:
            raise ConfigError(f"config.{f}={value!r}: must be >= 0")


def _positive(config, *fields):
    for f in fields:
        value = _get(config, f)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"config.{f}={value!r}: must be > 0")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


# The fields a resumed run may change (a field, or a whole section); any other change is
# refused on resume (train.checkpoints.check_resume_config): run length, cadences,
# retention, input-pipeline speed knobs, the mesh (a checkpoint restores onto any mesh),
# memory / kernel choices with the same arithmetic, and bookkeeping.
RESUMABLE_FIELDS = frozenset({
    "total_steps", "num_epochs", "cooldown_epochs", "log_every_steps", "expected_top1",
    "collapse_every_steps",
    "init_from", "overwrite", "eval.every_steps", "eval.batch_size", "checkpoint.every_steps",
    "checkpoint.keep", "mesh", "model.remat", "model.scan_blocks", "model.attention_impl",
    "data.data_dir",
    "data.num_parallel_calls", "data.prefetch_batches", "data.private_threadpool_size",
    # The saved iterator state names its reader: 'auto' resumes with it, and another
    # reader named explicitly is refused when the state is restored.
    "data.reader",
})


def validate(config) -> None:
    """Check every field that needs no dataset or device; raises ConfigError naming it."""
    if config.init_from is None:
        raise ConfigError(f"config.init_from is required by this recipe ({config.model_name}):"
                          " pass --config.init_from=PATH, a model directory (a converted "
                          "release or an exported run)")
    _positive_int(config, "batch_size", "log_every_steps", "eval.every_steps",
                  "checkpoint.every_steps", "checkpoint.keep", "optim.grad_accum_steps")
    _non_negative(config, "total_steps", "num_epochs", "warmup_epochs", "cooldown_epochs",
                  "collapse_every_steps", "ema_decay", "loss.cosine_reg_weight",
                  "optim.weight_decay", "optim.grad_clip_norm", "eval.batch_size",
                  "eval.bn_recalibration_batches", "eval.bn_recalibration_batch_size")
    if not isinstance(config.eval.bn_recalibration_batches, int):
        raise ConfigError(f"config.eval.bn_recalibration_batches="
                          f"{config.eval.bn_recalibration_batches!r}: must be an integer "
                          f"(0 = off)")
    # Values no recipe can mean: a negative learning rate ascends the loss (it trained to
    # loss 12884), eps 0 divides by zero, b1 / b2 of 1 never forget. A learning rate of 0
    # is kept: it freezes the weights (the tests of init_from and export rely on it).
    _positive(config, "optim.eps")
    _non_negative(config, "optim.learning_rate", "optim.warmup_lr", "optim.min_lr")
    for f in ("optim.b1", "optim.b2"):
        value = _get(config, f)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value < 1:
            raise ConfigError(f"config.{f}={value!r}: must be in [0, 1)")
    if config.loss.cosine_reg_weight:
        _positive_int(config, "loss.cosine_reg_pairs")
    if config.ema_decay >= 1:
        raise ConfigError(f"config.ema_decay={config.ema_decay}: must be < 1 (0 = no EMA)")
    if not config.total_steps and not config.num_epochs + config.cooldown_epochs:
        raise ConfigError("config.num_epochs + config.cooldown_epochs is 0 and "
                          "config.total_steps is 0: set one of them")


@dataclasses.dataclass(frozen=True)
class RunLength:
    """How long a run is, in train_step calls (one micro-batch each when accumulating) and
    in optimizer updates for the learning-rate schedule."""

    total_steps: int
    steps_per_epoch: int
    warmup_updates: int
    decay_updates: int


def run_length(config, num_train: int) -> RunLength:
    """Epochs -> steps, timm-style: ``num_epochs`` of cosine decay after ``warmup_epochs``
    overlaid on its start, then ``cooldown_epochs`` at ``min_lr``. ``total_steps`` > 0
    overrides the length and compresses the schedule to fit, keeping its shape."""
    k = config.optim.grad_accum_steps
    steps_per_epoch = max(num_train // config.batch_size, 1)
    updates_per_epoch = max(steps_per_epoch // k, 1)
    total_updates = (config.num_epochs + config.cooldown_epochs) * updates_per_epoch
    warmup_updates = config.warmup_epochs * updates_per_epoch
    decay_updates = max(config.num_epochs * updates_per_epoch, 1)
    if not config.total_steps:
        return RunLength(total_updates * k, steps_per_epoch, warmup_updates, decay_updates)
    scale = max(config.total_steps // k, 1) / max(total_updates, 1)
    return RunLength(config.total_steps, steps_per_epoch, round(warmup_updates * scale),
                     max(round(decay_updates * scale), 1))


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.lock()
    return c
