"""The training loop: config checks, sharded state, steps, eval, logging, checkpoints,
preemption and the NaN stop.

``train_and_evaluate(config, workdir)`` is the whole job; ``python -m deepvit_jax.main`` calls
it. Order of events: every config value is checked (model, dataset, mesh, batch size) before
anything is compiled; the state is initialised directly with its shardings, or restored from
the latest complete checkpoint in ``workdir/checkpoints`` (else from ``config.init_from``);
then ``total_steps`` jitted train steps, with evaluation over the full eval split every
``eval_every_steps`` and asynchronous checkpoints every ``checkpoint_every_steps``, at each
evaluation, at the end and on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from deepvit_jax import parallel
from deepvit_jax.models import ModelConfig, get_config
from deepvit_jax.parallel import ConfigError
from deepvit_jax.train import state as state_lib
from deepvit_jax.train import step as step_lib
from deepvit_jax.train.checkpoints import Checkpointer, abstract_like

log = logging.getLogger(__name__)

# Test hook: after finishing this step (and its checkpoint, if any), write
# WORKDIR/paused_at_<step> and wait until SIGTERM/kill. Used by the exact-resume tests.
PAUSE_ENV = "DEEPVIT_PAUSE_AT_STEP"


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message names the step."""


# --------------------------------------------------------------------------------------
# Config -> everything static about the run (no compute)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSpec:
    model_cfg: ModelConfig
    data_cfg: ml_collections.ConfigDict
    info: Any  # deepvit_jax.data.pipeline.DatasetInfo
    mesh: jax.sharding.Mesh
    total_steps: int
    steps_per_epoch: int  # train_step calls per epoch
    warmup_updates: int
    decay_updates: int
    eval_batch_size: int
    recal_batch_size: int  # BatchNorm re-estimation batch (used when bn_recalibration_batches)


def data_config(config) -> ml_collections.ConfigDict:
    """The data-pipeline fields of the flat run config."""
    from deepvit_jax.data.config import default_data_config

    return ml_collections.ConfigDict({k: config[k] for k in default_data_config().keys()})


def model_config(config, num_classes: int) -> ModelConfig:
    try:
        get_config(config.model)
    except ValueError as e:
        raise ConfigError(f"config.model={config.model!r}: {e}") from None
    overrides = {k: v for k, v in config.model_overrides.items() if v is not None}
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.compute_dtype={config.compute_dtype!r}: use 'float32', "
                          f"'bfloat16' or 'float16'")
    try:
        return get_config(config.model, num_classes=num_classes, dtype=config.compute_dtype,
                          **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model_overrides: {e}") from None


def _positive(config, *fields):
    for f in fields:
        if not isinstance(config[f], int) or config[f] <= 0:
            raise ConfigError(f"config.{f}={config[f]!r}: must be a positive integer")


def check_config(config) -> RunSpec:
    """Validate the config and resolve everything derived from it. Raises ConfigError
    naming the field; touches no accelerator memory and compiles nothing."""
    from deepvit_jax.data import pipeline

    _positive(config, "batch_size", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps")
    if config.total_steps < 0:
        raise ConfigError(f"config.total_steps={config.total_steps}: must be >= 0 "
                          f"(0 = from num_epochs + cooldown_epochs)")
    data_cfg = data_config(config)
    try:
        info = pipeline.dataset_info(data_cfg)
    except Exception as e:  # any failure to resolve the dataset is a config error
        raise ConfigError(f"config.dataset={config.dataset!r}: {e}") from None
    model_cfg = model_config(config, info.num_classes)
    mesh = parallel.make_mesh(config.mesh)
    shards = parallel.batch_size_per_shard(mesh)
    ebs = config.eval_batch_size or config.batch_size
    for field, bs in (("batch_size", config.batch_size), ("eval_batch_size", ebs)):
        if bs % shards or bs % jax.process_count():
            raise ConfigError(
                f"config.{field}={bs} cannot be split over the mesh: it must be a multiple of "
                f"data x fsdp = {shards} (mesh {dict(mesh.shape)}) and of the process count "
                f"{jax.process_count()}")
    if config.batch_size > info.num_train:
        raise ConfigError(f"config.batch_size={config.batch_size} is larger than the "
                          f"{info.num_train} training images of {config.dataset!r}")
    # 0 = the training batch size (already checked above), so errors name the field that was set.
    recal_bs = config.bn_recalibration_batch_size or config.batch_size
    if not isinstance(config.bn_recalibration_batches, int) or config.bn_recalibration_batches < 0:
        raise ConfigError(f"config.bn_recalibration_batches={config.bn_recalibration_batches!r}: "
                          f"must be an integer >= 0 (0 = off)")
    if config.bn_recalibration_batches and (
            recal_bs < 0 or recal_bs % shards or recal_bs % jax.process_count()
            or recal_bs > info.num_train):
        raise ConfigError(
            f"config.bn_recalibration_batch_size={recal_bs}: must be a multiple of data x fsdp "
            f"= {shards} and of the process count {jax.process_count()}, and at most the "
            f"{info.num_train} training images")
    for f in ("ema_decay", "cosine_reg_weight", "weight_decay", "grad_clip_norm"):
        if config[f] < 0:
            raise ConfigError(f"config.{f}={config[f]}: must be >= 0")
    if config.ema_decay >= 1:
        raise ConfigError(f"config.ema_decay={config.ema_decay}: must be < 1 (0 = no EMA)")
    if config.cosine_reg_weight and model_cfg.depth < 2:
        raise ConfigError("config.cosine_reg_weight needs a model with at least 2 blocks")

    # Epochs -> steps. One "step" is one train_step call (one micro-batch when accumulating).
    k = config.grad_accum_steps
    steps_per_epoch = max(info.num_train // config.batch_size, 1)
    updates_per_epoch = max(steps_per_epoch // k, 1)
    epochs = config.num_epochs + config.cooldown_epochs
    total_updates = epochs * updates_per_epoch
    warmup_updates = config.warmup_epochs * updates_per_epoch
    decay_updates = config.num_epochs * updates_per_epoch
    if config.total_steps:
        # total_steps overrides the length; the schedule keeps its shape, compressed.
        new_updates = max(config.total_steps // k, 1)
        scale = new_updates / max(total_updates, 1)
        warmup_updates = round(warmup_updates * scale)
        decay_updates = max(round(decay_updates * scale), 1)
        total_steps = config.total_steps
    else:
        total_steps = total_updates * k
    return RunSpec(model_cfg=model_cfg, data_cfg=data_cfg, info=info, mesh=mesh,
                   total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                   warmup_updates=warmup_updates, decay_updates=decay_updates,
                   eval_batch_size=ebs, recal_batch_size=recal_bs)


def make_schedule(config, spec: RunSpec) -> optax.Schedule:
    return step_lib.cosine_schedule(base_lr=config.learning_rate, warmup_lr=config.warmup_lr,
                                    min_lr=config.min_lr, warmup_steps=spec.warmup_updates,
                                    decay_steps=spec.decay_updates)


def step_config(config, spec: RunSpec) -> step_lib.StepConfig:
    return step_lib.StepConfig(
        num_classes=spec.model_cfg.num_classes, mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha, mix_switch_prob=config.mix_switch_prob,
        mix_prob=config.mix_prob, label_smoothing=config.label_smoothing,
        cosine_reg_weight=config.cosine_reg_weight, cosine_reg_pairs=config.cosine_reg_pairs,
        ema_decay=config.ema_decay, grad_accum_steps=config.grad_accum_steps)


# --------------------------------------------------------------------------------------
# Logging (process 0 only)
# --------------------------------------------------------------------------------------


class MetricWriter:
    """DIR/metrics.jsonl (one JSON object per log/eval step) + TensorBoard event files."""

    def __init__(self, workdir: str, *, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            # Keep the history up to the restored step; later lines belong to lost work.
            keep_to = resume_step if resume_step is not None else -1
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_to]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        import tensorflow as tf

        self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        # tf.summary.scalar lives in the `tensorboard` package, which tensorflow-cpu does not
        # install; the generic tf.summary.write with the scalars plugin's metadata writes the
        # same event that tf.summary.scalar would.
        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self.tb.as_default():
            for k, v in metrics.items():
                tf.summary.write(k, tf.constant(float(v), tf.float32), step=int(step),
                                 metadata=meta)
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits at the next step. With
    several processes the flag is OR-ed across them so that all stop at the same step."""

    def __init__(self):
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.flag = True

    def reached(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        # One tiny all-gather per step keeps every process on the same stopping step.
        flags = multihost_utils.process_allgather(np.int32(self.flag))
        return bool(np.any(flags))

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _finite(metrics) -> bool:
    return all(np.isfinite(float(metrics[k])) for k in ("train/loss", "train/grad_norm"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (resuming if ``workdir`` holds a checkpoint); returns the last eval metrics."""
    from deepvit_jax.data import pipeline

    spec = check_config(config)
    mesh, mcfg = spec.mesh, spec.model_cfg
    is_main = jax.process_index() == 0
    log.info("model %s (%s), dataset %s (%d train / %d eval, %d classes), mesh %s, "
             "%d steps (%d per epoch)", config.model, mcfg.to_dict(), spec.info.name,
             spec.info.num_train, spec.info.num_eval, spec.info.num_classes, dict(mesh.shape),
             spec.total_steps, spec.steps_per_epoch)

    schedule = make_schedule(config, spec)
    tx = step_lib.make_optimizer(config, schedule)
    use_ema = config.ema_decay > 0
    best_metric = "eval/ema_top1" if use_ema else "eval/top1"
    model_def = state_lib.make_model_def(mcfg)

    def init_fn():
        return state_lib.init_state(mcfg, tx, config.seed, ema=use_ema)

    abstract_state, abstract_rest = jax.eval_shape(init_fn)
    state_sh = parallel.tree_shardings(abstract_state, mesh)
    rest_sh = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_rest)
    state, rest = jax.jit(init_fn, out_shardings=(state_sh, rest_sh))()

    ckpt = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                        keep=config.keep_checkpoints, best_metric=best_metric)
    data_sh = parallel.batch_sharding(mesh)
    train_it = pipeline.make_train_iterator(
        spec.data_cfg, global_batch_size=config.batch_size, image_size=mcfg.image_size,
        mean=mcfg.mean, std=mcfg.std, sharding=data_sh, seed=config.seed)
    eval_it = pipeline.make_eval_iterator(
        spec.data_cfg, global_batch_size=spec.eval_batch_size, image_size=mcfg.image_size,
        crop_pct=mcfg.crop_pct, mean=mcfg.mean, std=mcfg.std, sharding=data_sh,
        interpolation=mcfg.interpolation)

    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, abstract_like(abstract_state, state_sh))
        train_it.set_state(data_state)
        log.info("resumed from %s/%d", ckpt.directory, latest)
    elif config.init_from:
        params, stats = state_lib.load_pretrained(jax.device_get(state.params),
                                                  jax.device_get(state.batch_stats),
                                                  config.init_from)
        params = jax.device_put(params, state_sh.params)
        stats = jax.device_put(stats, state_sh.batch_stats)
        state = state.replace(
            params=params, batch_stats=stats,
            opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
            ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
            ema_batch_stats=jax.tree.map(jnp.copy, stats) if use_ema else None)
        log.info("initialised from %s", config.init_from)
    start = int(jax.device_get(state.step))

    batch_sh = {"image": data_sh, "label": data_sh}
    repl = parallel.replicated(mesh)
    train_step = jax.jit(
        step_lib.make_train_step(model_def, tx, schedule, step_config(config, spec)),
        in_shardings=(state_sh, rest_sh, batch_sh), out_shardings=(state_sh, repl),
        donate_argnums=(0,))
    eval_step = jax.jit(
        step_lib.make_eval_step(model_def),
        in_shardings=(state_sh.params, state_sh.batch_stats, rest_sh,
                      {"image": data_sh, "label": data_sh, "mask": data_sh}),
        out_shardings=repl)

    # BatchNorm re-estimation before each evaluation (the official script's 50 x 256): its own
    # training-split iterator (seed + 1), rewound to its start every time, so every evaluation
    # sees the same K batches and the run's training stream (and exact resume) is untouched.
    # Training augmentation, as the official script uses its training loader (mixup / cutmix
    # happen in the train step and are not applied); the live model's running statistics
    # describe augmented images too. The statistics are for evaluation only: the TrainState
    # (and its checkpoints) keeps the running statistics that training produced.
    has_bn = bool(jax.tree.leaves(abstract_state.batch_stats))
    num_recal = config.bn_recalibration_batches if has_bn else 0
    if config.bn_recalibration_batches and not num_recal:
        log.info("bn_recalibration_batches=%d: %s has no BatchNorm, nothing to re-estimate",
                 config.bn_recalibration_batches, config.model)
    if num_recal:
        recal_it = pipeline.make_train_iterator(
            spec.data_cfg, global_batch_size=spec.recal_batch_size, image_size=mcfg.image_size,
            mean=mcfg.mean, std=mcfg.std, sharding=data_sh, seed=config.seed + 1)
        recal_start = recal_it.get_state()
        bn_stats_step = jax.jit(
            step_lib.make_bn_stats_step(model_def),
            in_shardings=(state_sh.params, state_sh.batch_stats, rest_sh, data_sh),
            out_shardings=state_sh.batch_stats)
        log.info("BatchNorm statistics re-estimated before each evaluation (%s) on %d training "
                 "batches of %d (augmented, seed %d), averaged", "live and EMA model"
                 if use_ema else "live model", num_recal, spec.recal_batch_size, config.seed + 1)

    def recalibrate(params, stats):
        """Every BatchNorm's statistics averaged over the same K training batches."""
        recal_it.set_state(recal_start)
        images = (next(recal_it)["image"] for _ in range(num_recal))
        return step_lib.average_batch_stats(bn_stats_step, params, stats, rest, images)

    def evaluate(params, stats) -> dict[str, float]:
        if num_recal:
            stats = recalibrate(params, stats)
        sums = None
        for batch in eval_it:
            out = eval_step(params, stats, rest, batch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        sums = jax.device_get(sums)
        n = max(float(sums["count"]), 1.0)
        return {"top1": 100.0 * sums["top1"] / n, "top5": 100.0 * sums["top5"] / n,
                "loss": sums["loss"] / n, "count": n}

    def run_eval(state) -> dict[str, float]:
        out = {f"eval/{k}": v for k, v in evaluate(state.params, state.batch_stats).items()}
        if use_ema:
            ema = evaluate(state.ema_params, state.ema_batch_stats)
            out.update({f"eval/ema_{k}": v for k, v in ema.items() if k != "count"})
        return out

    meta = {"config": json.loads(config.to_json_best_effort()), "model_config": mcfg.to_dict()}

    def save(step, state, metrics=None):
        ckpt.save(step, state, train_it.get_state(), dict(meta, step=step), metrics)

    writer = MetricWriter(workdir, enabled=is_main, resume_step=start if latest else None)
    preempt = _Preemption()
    pause_at = int(os.environ.get(PAUSE_ENV, "-1"))
    pbar = None
    if is_main:
        from tqdm import tqdm

        pbar = tqdm(total=spec.total_steps, initial=start, desc="train", unit="step",
                    dynamic_ncols=True)

    def check(step, m):
        if not _finite(m):
            ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss={float(m['train/loss'])}, "
                f"grad_norm={float(m['train/grad_norm'])}): stopping. The last good checkpoint "
                f"is step {ckpt.latest_step()} in {ckpt.directory}")

    last_eval: dict[str, float] = {}
    window: list[tuple[int, Any]] = []
    prev = None  # (step, metrics) of the previous step, checked one step late (no stall)
    t_window, n_window = time.perf_counter(), 0
    step = start
    try:
        while step < spec.total_steps:
            batch = next(train_it)
            state, metrics = train_step(state, rest, batch)
            step += 1
            n_window += 1
            window.append((step, metrics))
            if prev is not None:
                check(*prev)
            prev = (step, metrics)
            if pbar is not None:
                pbar.update(1)

            is_last = step == spec.total_steps
            do_eval = step % config.eval_every_steps == 0 or is_last
            do_log = step % config.log_every_steps == 0 or is_last
            if do_log or do_eval:
                host = jax.device_get([m for _, m in window])
                for (s, _), m in zip(window, host, strict=True):
                    check(s, m)
                window.clear()
                elapsed = time.perf_counter() - t_window
                row = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                row["train/lr"] = float(host[-1]["train/lr"])
                row["img_per_sec"] = n_window * config.batch_size / max(elapsed, 1e-9)
                row["epoch"] = step / spec.steps_per_epoch
                if is_main:
                    pbar.set_postfix(loss=f"{row['train/loss']:.4f}",
                                     lr=f"{row['train/lr']:.2e}",
                                     img_s=f"{row['img_per_sec']:.0f}", refresh=False)
                writer.write(step, row)
                t_window, n_window = time.perf_counter(), 0
            eval_metrics = None
            if do_eval:
                eval_metrics = run_eval(state)
                last_eval = eval_metrics
                writer.write(step, eval_metrics)
                log.info("step %d: %s", step, {k: round(v, 4) for k, v in eval_metrics.items()})
                if is_main:
                    pbar.write(f"step {step}: eval top-1 {eval_metrics['eval/top1']:.2f}%"
                               + (f", EMA top-1 {eval_metrics['eval/ema_top1']:.2f}%"
                                  if use_ema else ""))
                t_window = time.perf_counter()  # img/s counts training time only
            if step % config.checkpoint_every_steps == 0 or do_eval:
                check(step, jax.device_get(metrics))
                save(step, state, eval_metrics)
            if step == pause_at:
                check(step, jax.device_get(metrics))
                ckpt.wait()
                open(os.path.join(workdir, f"paused_at_{step}"), "w").close()
                while not preempt.flag:
                    time.sleep(0.05)
            if preempt.reached() and not is_last:
                check(step, jax.device_get(metrics))
                save(step, state)
                ckpt.wait()
                log.warning("preempted: checkpoint of step %d saved; exiting", step)
                if is_main:
                    pbar.write(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting")
                break
        ckpt.wait()
    finally:
        preempt.restore()
        if pbar is not None:
            pbar.close()
        writer.close()
        ckpt.close()
    return last_eval
