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
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deepvit_jax import parallel
from deepvit_jax.analysis.monitor import make_probe
from deepvit_jax.errors import (ConfigError, DeepViTError, InputError, StorageError,
                                one_line, storage_message, storage_problem)
from deepvit_jax.models import ModelConfig, get_config
from deepvit_jax.train import config as config_lib
from deepvit_jax.train import evaluation
from deepvit_jax.train import state as state_lib
from deepvit_jax.train import step as step_lib
from deepvit_jax.train.checkpoints import (Checkpointer, abstract_like, check_resume_config,
                                           claim_workdir)
from deepvit_jax.train.reporting import (MetricWriter, NonFiniteLossError, Preempted, Preemption,
                                         StepMeter, check_finite_state)
from deepvit_jax.utils import as_path

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
    eval_pending: bool = False  # the restored step's evaluation was interrupted

    def save(self, step: int, metrics: dict | None = None, *, eval_pending: bool = False
             ) -> None:
        check_finite_state(step, self.state)  # never save weights that overflowed
        self.checkpointer.save(step, self.state, self.train_iter.get_state(),
                               dict(self.meta, step=step, eval_pending=eval_pending), metrics)


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

    data_sh = parallel.batch_sharding(mesh)
    spec = pipeline.ImageSpec.of(mcfg)
    try:  # a bad augmentation string etc. (data.*) is a config error, before any compile
        train_iter = pipeline.make_train_iterator(config.data, global_batch_size=batch_size,
                                                  spec=spec, sharding=data_sh,
                                                  seed=config.seed, dataset=dataset)
    except ValueError as e:
        raise ConfigError(f"config.{one_line(e)}" if str(e).startswith("data.")
                          else f"config.data: {one_line(e)}") from None
    schedule = step_lib.make_schedule(config.optim, length)
    tx = step_lib.make_optimizer(config.optim, schedule)
    model_def = state_lib.make_model_def(mcfg)

    def init_fn():
        return state_lib.init_state(mcfg, tx, config.seed, ema=config.ema_decay > 0)

    abstract_state, abstract_rest = jax.eval_shape(init_fn)
    state_sh = parallel.tree_shardings(abstract_state, mesh)
    rest_sh = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_rest)
    state, rest = jax.jit(init_fn, out_shardings=(state_sh, rest_sh))()

    best = "eval/ema_top1" if config.ema_decay > 0 else "eval/top1"
    meta = {"config": json.loads(config.to_json_best_effort()), "model_config": mcfg.to_dict()}
    ckpt = Checkpointer(as_path(workdir) / "checkpoints", keep=config.checkpoint.keep,
                        best_metric=best)
    restored = ckpt.restore_latest(
        abstract_like(abstract_state, state_sh),
        lambda saved, step: check_resume_config(saved, meta["config"],
                                                config_lib.RESUMABLE_FIELDS, ckpt.directory,
                                                step))
    latest, eval_pending = None, False
    if restored is not None:
        latest, state, data_state, saved_meta = restored
        train_iter.set_state(data_state)
        eval_pending = bool(saved_meta.get("eval_pending"))
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
    return Run(config, workdir, mcfg, length, state, rest, int(jax.device_get(state.step)),
               latest is not None, train_step, train_iter, evaluator, ckpt, meta,
               eval_pending=eval_pending)


def _init_from(config, state, tx, state_sh):
    """``state`` with the weights of the model directory ``config.init_from``."""
    try:
        params, stats = state_lib.load_pretrained(jax.device_get(state.params),
                                                  jax.device_get(state.batch_stats),
                                                  config.init_from)
    except InputError as e:  # a missing / wrong directory: name the field
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.init_from={config.init_from!r}: {one_line(e)}") from None
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
    ``on_step(step, run)`` is called after each step's periodic actions (tests use it).

    Process 0 holds ``WORKDIR/lock`` for the whole run; every process checks at start-up
    that all run the same config. SIGTERM / SIGINT stop the run at the next check (before
    a step, before an evaluation, between evaluation batches) with a checkpoint."""
    config_lib.validate(config)
    # The context mesh (jax.set_mesh) is what attention_impl='pallas' splits per shard over.
    with (claim_workdir(workdir, json.loads(config.to_json_best_effort())),
          Preemption() as preemption,
          jax.set_mesh(parallel.make_mesh(config.mesh))):
        try:
            return _train(config, workdir, preemption, on_step)
        except Exception as e:  # a full disk, a quota, a permission: exit 4 with the fix
            if isinstance(e, DeepViTError) or not storage_problem(e):
                raise
            raise StorageError(storage_message(
                e, what=f"the workdir {workdir}",
                fix="free space, raise the quota or fix the permissions there, or move the "
                    "run to another --workdir; then run the same command again: it resumes "
                    "from the last complete checkpoint")) from e


def _train(config, workdir, preemption: Preemption, on_step) -> dict[str, float]:
    run = setup(config, workdir)
    run.preemption = preemption
    total, c = run.length.total_steps, config
    if run.start_step > total:
        raise ConfigError(
            f"config.total_steps={total} is below the step {run.start_step} of the checkpoint "
            f"in {run.checkpointer.directory}: raise --config.total_steps (or num_epochs) to "
            "train longer, or use another --workdir")
    writer = MetricWriter(workdir, resume_step=run.start_step if run.resumed else None)
    meter = StepMeter(c.batch_size, run.length.steps_per_epoch)
    bar = _progress_bar(total, run.start_step)
    # Attention-collapse probe on the first eval images (built before the eval wrapper).
    probe = make_probe(run) if c.collapse_every_steps else None
    run.evaluator.eval_batches = preemption.interruptible(run.evaluator.eval_batches)
    if run.evaluator.recal_iterator is not None:
        run.evaluator.recal_iterator = preemption.interruptible(run.evaluator.recal_iterator)
    last_eval: dict[str, float] = {}

    def stop(step: int, *, eval_pending: bool = False) -> None:
        nonlocal last_eval
        last_eval = {}  # preempted: no final metrics to report
        meter.check()
        run.save(step, eval_pending=eval_pending)
        run.checkpointer.wait()
        _say(bar, f"{preemption.signal_name or 'preempted'}: saved step {step} to "
                  f"{run.checkpointer.directory}; exiting (run the same command to resume)")

    def evaluate(step: int) -> bool:
        """Evaluate and record ``step``; False when a signal interrupted it (then saved)."""
        nonlocal last_eval
        try:
            last_eval = run.evaluator.state(run.state)
        except Preempted:
            stop(step, eval_pending=True)
            return False
        writer.write(step, last_eval)
        _say(bar, _eval_line(step, last_eval))
        meter.pause()
        return True

    try:
        if run.eval_pending:  # the restored step's evaluation was interrupted: do it now
            if not evaluate(run.start_step):
                return last_eval
        elif run.start_step == total:
            _say(bar, f"nothing to do: the checkpoint in {run.checkpointer.directory} is at "
                      f"step {total} = config.total_steps; raise --config.total_steps (or "
                      "num_epochs) to train longer")
        for step in range(run.start_step + 1, total + 1):
            if step > run.start_step + 1 and preemption.reached():
                stop(step - 1)
                break
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
            if probe is not None and step % c.collapse_every_steps == 0:
                writer.write(step, probe(run.state))
            evaluated = step % c.eval.every_steps == 0 or last
            if evaluated:
                meter.check()
                if preemption.reached():  # do not start an evaluation that cannot finish
                    stop(step, eval_pending=True)
                    break
                if not evaluate(step):
                    break
            if step % c.checkpoint.every_steps == 0 or evaluated:
                meter.check()
                run.save(step, last_eval if evaluated else None)
            if on_step is not None:
                on_step(step, run)
        run.checkpointer.wait()
    except NonFiniteLossError as e:
        run.checkpointer.wait()
        raise NonFiniteLossError(f"{e}: stopping. The last good checkpoint is step "
                                 f"{run.checkpointer.latest_step()} in "
                                 f"{run.checkpointer.directory}; resuming replays the same "
                                 "steps: lower config.optim.learning_rate or set "
                                 "config.optim.grad_clip_norm") from None
    finally:
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
