"""The training loop: ``train_and_evaluate(config, workdir)`` is the whole job, and
``python -m deepvit_jax.main`` calls it.

:func:`setup` turns the config into everything a run needs, checking every value before
anything is compiled: the dataset (resolved once), the model config, the mesh, the run
length, the initial or restored state, the compiled train step, the evaluator and the
iterators. :func:`train_and_evaluate` is then a short loop: one train step per batch, and
one line per periodic action (log, evaluate, checkpoint, preemption).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deepvit_jax import parallel
from deepvit_jax.errors import ConfigError
from deepvit_jax.models import ModelConfig, get_config
from deepvit_jax.train import config as config_lib
from deepvit_jax.train import evaluation
from deepvit_jax.train import state as state_lib
from deepvit_jax.train import step as step_lib
from deepvit_jax.train.checkpoints import Checkpointer, abstract_like
from deepvit_jax.train.reporting import MetricWriter, NonFiniteLossError, Preemption, StepMeter

log = logging.getLogger(__name__)


def model_config(config, num_classes: int) -> ModelConfig:
    """The ModelConfig of ``config.model_name`` with the ``config.model`` overrides."""
    overrides = {k: v for k, v in config.model.items() if v is not None}
    try:
        get_config(config.model_name)
    except ValueError as e:
        raise ConfigError(f"config.model_name={config.model_name!r}: {e}") from None
    try:
        return get_config(config.model_name, num_classes=num_classes, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def _batch_size(config, field: str, value: int, mesh, num_train: int) -> int:
    """``value`` if the mesh and the processes can split it and the split holds it."""
    shards = parallel.batch_size_per_shard(mesh)
    if value % shards or value % jax.process_count():
        raise ConfigError(
            f"config.{field}={value} cannot be split over the mesh: it must be a multiple of "
            f"data x fsdp = {shards} (mesh {dict(mesh.shape)}) and of the process count "
            f"{jax.process_count()}")
    if field != "eval.batch_size" and value > num_train:
        raise ConfigError(f"config.{field}={value} is larger than the {num_train} training "
                          f"images of {config.data.dataset!r}")
    return value


@dataclasses.dataclass
class Run:
    """Everything a training run needs, built by :func:`setup`."""

    config: Any
    workdir: str
    model_cfg: ModelConfig
    length: config_lib.RunLength
    state: Any  # TrainState (initialised, restored or loaded from init_from)
    rest: Any  # the model's RNG-stream variables
    start_step: int
    resumed: bool
    train_step: Callable
    train_iter: Any
    evaluator: evaluation.Evaluator
    checkpointer: Checkpointer
    meta: dict
    preemption: Preemption | None = None

    def save(self, step: int, metrics: dict | None = None) -> None:
        self.checkpointer.save(step, self.state, self.train_iter.get_state(),
                               dict(self.meta, step=step), metrics)


def setup(config, workdir: str) -> Run:
    """Check the config and build the run (restoring ``workdir``'s latest checkpoint)."""
    from deepvit_jax.data import pipeline

    config_lib.validate(config)
    try:
        dataset = pipeline.dataset_info(config.data)
    except Exception as e:  # any failure to resolve the dataset is a config error
        raise ConfigError(f"config.data.dataset={config.data.dataset!r}: {e}") from None
    mcfg = model_config(config, dataset.num_classes)
    mesh = parallel.make_mesh(config.mesh)
    batch_size = _batch_size(config, "batch_size", config.batch_size, mesh, dataset.num_train)
    length = config_lib.run_length(config, dataset.num_train)
    eval_bs = _batch_size(config, "eval.batch_size", config.eval.batch_size or batch_size,
                          mesh, dataset.num_train)
    recal_bs = config.eval.bn_recalibration_batch_size or batch_size
    if config.eval.bn_recalibration_batches:
        _batch_size(config, "eval.bn_recalibration_batch_size", recal_bs, mesh,
                    dataset.num_train)
    if config.loss.cosine_reg_weight and mcfg.depth < 2:
        raise ConfigError("config.loss.cosine_reg_weight needs a model with at least 2 blocks")
    log.info("model %s (%s), dataset %s (%d train / %d eval, %d classes), mesh %s, %d steps "
             "(%d per epoch)", config.model_name, mcfg.to_dict(), dataset.name,
             dataset.num_train, dataset.num_eval, dataset.num_classes, dict(mesh.shape),
             length.total_steps, length.steps_per_epoch)

    schedule = step_lib.make_schedule(config.optim, length)
    tx = step_lib.make_optimizer(config.optim, schedule)
    model_def = state_lib.make_model_def(mcfg)

    def init_fn():
        return state_lib.init_state(mcfg, tx, config.seed, ema=config.ema_decay > 0)

    abstract_state, abstract_rest = jax.eval_shape(init_fn)
    state_sh = parallel.tree_shardings(abstract_state, mesh)
    rest_sh = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_rest)
    state, rest = jax.jit(init_fn, out_shardings=(state_sh, rest_sh))()

    data_sh = parallel.batch_sharding(mesh)
    spec = pipeline.ImageSpec.of(mcfg)
    train_iter = pipeline.make_train_iterator(config.data, global_batch_size=batch_size,
                                              spec=spec, sharding=data_sh, seed=config.seed,
                                              dataset=dataset)
    best = "eval/ema_top1" if config.ema_decay > 0 else "eval/top1"
    ckpt = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                        keep=config.checkpoint.keep, best_metric=best)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, abstract_like(abstract_state, state_sh))
        train_iter.set_state(data_state)
        log.info("resumed from %s/%d", ckpt.directory, latest)
    elif config.init_from:
        state = _init_from(config, state, tx, state_sh)

    augment_fn = None
    if config.data.get("device_augment"):
        from deepvit_jax.data.device_augment import make_device_augment

        augment_fn = make_device_augment(config.data, image_size=mcfg.image_size,
                                         mean=mcfg.mean, std=mcfg.std)
    batch_sh = {"image": data_sh, "label": data_sh}
    train_step = jax.jit(
        step_lib.make_train_step(model_def, tx, schedule, config, augment_fn=augment_fn),
        in_shardings=(state_sh, rest_sh, batch_sh),
        out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=(0,))
    evaluator = evaluation.make_evaluator(
        config, model_def=model_def, dataset=dataset, mesh=mesh, eval_batch_size=eval_bs,
        recal_batch_size=recal_bs, state_shardings=state_sh, rest=rest, rest_shardings=rest_sh)
    meta = {"config": json.loads(config.to_json_best_effort()), "model_config": mcfg.to_dict()}
    return Run(config, workdir, mcfg, length, state, rest, int(jax.device_get(state.step)),
               latest is not None, train_step, train_iter, evaluator, ckpt, meta)


def _init_from(config, state, tx, state_sh):
    """``state`` with the weights of the model directory ``config.init_from``."""
    params, stats = state_lib.load_pretrained(jax.device_get(state.params),
                                              jax.device_get(state.batch_stats),
                                              config.init_from)
    params = jax.device_put(params, state_sh.params)
    stats = jax.device_put(stats, state_sh.batch_stats)
    ema = config.ema_decay > 0
    log.info("initialised from %s", config.init_from)
    return state.replace(
        params=params, batch_stats=stats,
        opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        ema_batch_stats=jax.tree.map(jnp.copy, stats) if ema else None)


def train_and_evaluate(config, workdir: str, *,
                       on_step: Callable[[int, Run], None] | None = None) -> dict[str, float]:
    """Train (resuming if ``workdir`` holds a checkpoint); returns the last eval metrics.
    ``on_step(step, run)`` is called after each step's periodic actions (tests use it)."""
    run = setup(config, workdir)
    total, c = run.length.total_steps, config
    writer = MetricWriter(workdir, resume_step=run.start_step if run.resumed else None)
    meter = StepMeter(c.batch_size, run.length.steps_per_epoch)
    run.preemption = Preemption()
    bar = _progress_bar(total, run.start_step)
    last_eval: dict[str, float] = {}
    try:
        for step in range(run.start_step + 1, total + 1):
            t = time.perf_counter()
            batch = next(run.train_iter)
            wait = time.perf_counter() - t
            run.state, metrics = run.train_step(run.state, run.rest, batch)
            meter.add(step, metrics, wait)
            bar.update(1)
            last = step == total
            if step % c.log_every_steps == 0 or last:
                row = meter.summary(step)
                writer.write(step, row)
                bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.2e}",
                                img_s=f"{row['img_per_sec']:.0f}", refresh=False)
            evaluated = step % c.eval.every_steps == 0 or last
            if evaluated:
                last_eval = run.evaluator.state(run.state)
                writer.write(step, last_eval)
                _say(bar, _eval_line(step, last_eval))
                meter.pause()
            if step % c.checkpoint.every_steps == 0 or evaluated:
                meter.check()
                run.save(step, last_eval if evaluated else None)
            if on_step is not None:
                on_step(step, run)
            if not last and run.preemption.reached():
                meter.check()
                run.save(step)
                run.checkpointer.wait()
                _say(bar, f"SIGTERM: saved step {step} to {run.checkpointer.directory}; exiting")
                break
        run.checkpointer.wait()
    except NonFiniteLossError as e:
        run.checkpointer.wait()
        raise NonFiniteLossError(f"{e}: stopping. The last good checkpoint is step "
                                 f"{run.checkpointer.latest_step()} in "
                                 f"{run.checkpointer.directory}") from None
    finally:
        run.preemption.close()
        bar.close()
        writer.close()
        run.checkpointer.close()
    return last_eval


def _eval_line(step: int, m: dict[str, float]) -> str:
    line = f"step {step}: eval top-1 {m['eval/top1']:.2f}%"
    if "eval/ema_top1" in m:
        line += f", EMA top-1 {m['eval/ema_top1']:.2f}%"
    log.info("step %d: %s", step, {k: round(v, 4) for k, v in m.items()})
    return line


def _say(bar, line: str) -> None:
    if jax.process_index() == 0:
        bar.write(line)


def _progress_bar(total: int, initial: int):
    """tqdm on process 0 (step, loss, lr, img/s, ETA); a silent stand-in elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0)
