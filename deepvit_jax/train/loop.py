"""The training loop: ``train_and_evaluate(config, workdir)`` is the whole job, and
``python -m deepvit_jax.main`` calls it.

:func:`setup` turns the config into everything a run needs, checking every value before
anything is compiled: the dataset (resolved once), the model config, the mesh, the run
length, the initial or restored state, the compiled train step, the evaluator and the
iterators. :func:`train_and_evaluate` validates the config and builds the mesh once, takes the
workdir, and hands the run to :class:`Training`, whose loop is one train step per batch and
one line per periodic action (log, collapse probe, evaluate, checkpoint, preemption), in the
style of big_vision and the Flax examples.
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

from tqdm import tqdm

from deepvit_jax import parallel
from deepvit_jax import workdir as workdir_lib
from deepvit_jax.analysis.monitor import make_probe
from deepvit_jax.data.dataset import ImageSpec, dataset_info
from deepvit_jax.data.train_stream import make_train_iterator
from deepvit_jax.errors import (ConfigError, DeepViTError, InputError, NonFiniteLossError,
                                Preempted, StorageError, one_line, storage_message,
                                storage_problem)
from deepvit_jax.models import ModelConfig
from deepvit_jax.train import config as config_lib
from deepvit_jax.train import evaluator as evaluator_lib
from deepvit_jax.train import state as state_lib
from deepvit_jax.train.program import batch_sizes, make_program, model_config
from deepvit_jax.train.reporting import (MetricWriter, Preemption, StepMeter,
                                         check_finite_state, input_advice)
from deepvit_jax.workdir import Checkpointer

log = logging.getLogger(__name__)


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
    evaluator: evaluator_lib.Evaluator
    checkpointer: Checkpointer
    meta: dict
    preemption: Preemption | None = None
    eval_pending: bool = False  # the restored step's evaluation was interrupted
    model_def: Any = None  # train.state.ModelDef

    def save(self, step: int, metrics: dict | None = None, *, eval_pending: bool = False
             ) -> None:
        check_finite_state(step, self.state)  # never save weights that overflowed
        self.checkpointer.save(step, self.state, self.train_iter.get_state(),
                               dict(self.meta, step=step, eval_pending=eval_pending), metrics)


def setup(config, workdir: str, *, mesh=None) -> Run:
    """Check the config and build the run (restoring ``workdir``'s latest checkpoint).
    ``mesh``: the run's mesh when the caller has validated the config and built it."""
    if mesh is None:
        config_lib.validate(config)
        mesh = parallel.make_mesh(config.mesh)
    dataset = _dataset_info(config)
    if dataset.num_classes < 2:  # one class trains to loss 0 and learns nothing
        raise ConfigError(
            f"config.data.dataset={config.data.dataset!r} has {dataset.num_classes} class(es); "
            "a classifier needs at least 2 (an image folder: ROOT/<split>/<class>/, one "
            "folder per class)")
    mcfg = model_config(config, dataset.num_classes)
    batch_size, eval_bs, recal_bs = batch_sizes(config, mesh, dataset.num_train)
    if config.loss.cosine_reg_weight and mcfg.depth < 2:
        raise ConfigError("config.loss.cosine_reg_weight needs a model with at least 2 blocks")
    length = config_lib.run_length(config, dataset.num_train)
    log.info("model %s (%s), dataset %s (%d train / %d eval, %d classes), mesh %s, %d steps "
             "(%d per epoch)", config.model_name, mcfg.to_dict(), dataset.name,
             dataset.num_train, dataset.num_eval, dataset.num_classes, dict(mesh.shape),
             length.total_steps, length.steps_per_epoch)
    meta = {"config": json.loads(config.to_json_best_effort()), "model_config": mcfg.to_dict()}
    ckpt = Checkpointer(workdir_lib.checkpoints_dir(workdir), keep=config.checkpoint.keep,
                        best_metric="eval/ema_top1" if config.ema_decay > 0 else "eval/top1")
    if ckpt.latest_step() is None:  # a fresh start: never over another run's files
        workdir_lib.check_fresh_workdir(workdir, meta["config"],
                                        overwrite=bool(config.get("overwrite", False)),
                                        allowed=config_lib.RESUMABLE_FIELDS)
    data_sh = parallel.batch_sharding(mesh)
    train_iter = _train_iterator(config, batch_size, mcfg, data_sh, dataset)
    prog = make_program(config, mcfg, mesh, length)
    model_def, tx, state_sh, rest_sh = prog.model_def, prog.tx, prog.state_sh, prog.rest_sh
    abstract_state = prog.abstract_state
    state, rest = jax.jit(prog.init_fn, out_shardings=(state_sh, rest_sh))()

    state, latest, eval_pending = _restore_or_init(config, ckpt, meta, state, train_iter, tx,
                                                   workdir_lib.abstract_like(abstract_state,
                                                                             state_sh), state_sh)
    train_step, augment_fn = prog.train_step, prog.augment_fn
    evaluator = evaluator_lib.make_evaluator(
        config, model_def=model_def, dataset=dataset, mesh=mesh, eval_batch_size=eval_bs,
        recal_batch_size=recal_bs, state_shardings=state_sh, rest=rest, rest_shardings=rest_sh,
        augment_fn=augment_fn)
    return Run(config, workdir, mcfg, length, state, rest, int(jax.device_get(state.step)),
               latest is not None, train_step, train_iter, evaluator, ckpt, meta,
               eval_pending=eval_pending, model_def=model_def)


def _dataset_info(config):
    try:
        return dataset_info(config.data)
    except Exception as e:  # any failure to resolve the dataset is a config error
        raise ConfigError(f"config.data.dataset={config.data.dataset!r}: {e}") from None


def _train_iterator(config, batch_size: int, mcfg, data_sh, dataset):
    try:  # a bad augmentation string etc. (data.*) is a config error, before any compile
        return make_train_iterator(config.data, global_batch_size=batch_size,
                                            spec=ImageSpec.of(mcfg), sharding=data_sh,
                                            seed=config.seed, dataset=dataset)
    except ValueError as e:
        raise ConfigError(f"config.{one_line(e)}" if str(e).startswith("data.")
                          else f"config.data: {one_line(e)}") from None


def _restore_or_init(config, ckpt: Checkpointer, meta: dict, state, train_iter, tx,
                     abstract_state, state_sh):
    """(state, restored step or None, eval_pending): the latest readable checkpoint (its
    saved config checked against ``meta``) with the iterator moved to its position, else
    ``state`` (loaded from ``config.init_from`` if set)."""
    restored = ckpt.restore_latest(
        abstract_state,
        lambda saved, step: workdir_lib.check_resume_config(
            saved, meta["config"], config_lib.RESUMABLE_FIELDS, ckpt.directory, step))
    if restored is None:
        return (_init_from(config, state, tx, state_sh) if config.init_from else state), \
            None, False
    latest, state, data_state, saved_meta = restored
    try:
        train_iter.set_state(data_state)
    except ValueError as e:  # a stream this config cannot reproduce
        fix = (" (resume with --config.data.reader=auto: the reader the run started with)"
               if "reader=" in str(e) else "")
        raise ConfigError(f"{ckpt.directory}/{latest}: {one_line(e)}{fix}") from None
    log.info("resumed from %s/%d", ckpt.directory, latest)
    return state, latest, bool(saved_meta.get("eval_pending"))


def _init_from(config, state, tx, state_sh):
    """``state`` with the weights of the model directory ``config.init_from``."""
    try:
        params, stats = state_lib.load_pretrained(jax.device_get(state.params),
                                                  jax.device_get(state.batch_stats),
                                                  config.init_from)
    except InputError as e:  # a missing / wrong directory: name the field
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
    mesh = parallel.make_mesh(config.mesh)
    # The context mesh (jax.set_mesh) is what attention_impl='pallas' splits per shard over.
    with (workdir_lib.claim_workdir(workdir, json.loads(config.to_json_best_effort())),
          Preemption() as preemption, jax.set_mesh(mesh)):
        try:
            run = setup(config, workdir, mesh=mesh)
            run.preemption = preemption
            return Training(run, preemption, on_step).run()
        except Exception as e:  # a full disk, a quota, a permission: exit 4 with the fix
            if isinstance(e, DeepViTError) or not storage_problem(e):
                raise
            raise StorageError(storage_message(
                e, what=f"the workdir {workdir}",
                fix="free space, raise the quota or fix the permissions there, or move the "
                    "run to another --workdir; then run the same command again: it resumes "
                    "from the last complete checkpoint")) from e


class Training:
    """The training loop of a :class:`Run`: :meth:`run` steps through it and calls the
    periodic actions, each a method (log, probe, evaluate, save, stop)."""

    def __init__(self, run: Run, preemption: Preemption, on_step=None):
        c = run.config
        if run.start_step > run.length.total_steps:
            raise ConfigError(
                f"config.total_steps={run.length.total_steps} is below the step "
                f"{run.start_step} of the checkpoint in {run.checkpointer.directory}: raise "
                "--config.total_steps (or num_epochs) to train longer, or use another "
                "--workdir")
        self.r, self.c, self.preemption, self.on_step = run, c, preemption, on_step
        # A fresh start replaces the run files (check_fresh_workdir refused another run's):
        # resume_step -1 keeps no metrics row and rewrites tensorboard/ from none.
        self.writer = MetricWriter(run.workdir,
                                   resume_step=run.start_step if run.resumed else -1)
        self.meter = StepMeter(c.batch_size, run.length.steps_per_epoch,
                               advice=input_advice(c.data, jax.default_backend()))
        self.bar = _progress_bar(run.length.total_steps, run.start_step)
        # Attention-collapse probe on the first eval images (built before the eval wrapper).
        self.probe = make_probe(run.model_def, run.rest,
                                run.evaluator.eval_batches) if c.collapse_every_steps else None
        ev = run.evaluator
        ev.eval_batches = preemption.interruptible(ev.eval_batches)
        if ev.recal_iterator is not None:
            ev.recal_iterator = preemption.interruptible(ev.recal_iterator)
        self.last_eval: dict[str, float] = {}

    def run(self) -> dict[str, float]:
        """Train to ``total_steps``; returns the last eval metrics ({} when preempted)."""
        r, c, total = self.r, self.c, self.r.length.total_steps
        try:
            if not self._first(r.start_step):
                return self.last_eval
            for step in range(r.start_step + 1, total + 1):
                if step > r.start_step + 1 and self.preemption.reached():
                    self.stop(step - 1)
                    break
                self.train_step(step)
                last = step == total
                if step % c.log_every_steps == 0 or last:
                    self.log(step)
                if self.probe is not None and step % c.collapse_every_steps == 0:
                    self.writer.write(step, self.probe(r.state))
                evaluated = step % c.eval.every_steps == 0 or last
                if evaluated and not self.evaluate_or_stop(step):
                    break
                if step % c.checkpoint.every_steps == 0 or evaluated:
                    self.save(step, evaluated)
                if self.on_step is not None:
                    self.on_step(step, r)
            r.checkpointer.wait()
        except NonFiniteLossError as e:
            r.checkpointer.wait()
            raise NonFiniteLossError(f"{e}: stopping. The last good checkpoint is step "
                                     f"{r.checkpointer.latest_step()} in "
                                     f"{r.checkpointer.directory}; resuming replays the same "
                                     "steps: lower config.optim.learning_rate or set "
                                     "config.optim.grad_clip_norm") from None
        finally:
            self.bar.close()
            self.writer.close()
            r.checkpointer.close()
            r.train_iter.close()  # stop the input's worker threads / processes now
        return self.last_eval

    def _first(self, step: int) -> bool:
        """Before the first step: finish an interrupted evaluation of the restored step;
        False when a signal stopped that again."""
        if self.r.eval_pending:
            return self.evaluate(step)
        if step == self.r.length.total_steps:
            _say(self.bar, f"nothing to do: the checkpoint in {self.r.checkpointer.directory} "
                           f"is at step {step} = config.total_steps; raise "
                           "--config.total_steps (or num_epochs) to train longer")
        return True

    def train_step(self, step: int) -> None:
        t = time.perf_counter()
        batch = next(self.r.train_iter)
        wait = time.perf_counter() - t
        self.r.state, metrics = self.r.train_step(self.r.state, self.r.rest, batch)
        self.meter.add(step, metrics, wait)
        self.bar.update(1)

    def log(self, step: int) -> None:
        """The training row: metrics.jsonl + TensorBoard, the bar, and train.log."""
        row = self.meter.summary(step)
        self.writer.write(step, row)
        self.bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.2e}",
                             img_s=f"{row['img_per_sec']:.0f}", refresh=False)
        log.info("step %d: loss %.4f, lr %.3e, %.1f img/s, data wait %.1f ms/step (%.0f%%), "
                 "epoch %.2f", step, row["train/loss"], row["train/lr"], row["img_per_sec"],
                 row["data_wait_ms"], 100 * row["data_wait_fraction"], row["epoch"])

    def evaluate_or_stop(self, step: int) -> bool:
        """Evaluate ``step``, unless a signal came (then save and stop): False to stop."""
        self.meter.check()
        if self.preemption.reached():  # do not start an evaluation that cannot finish
            self.stop(step, eval_pending=True)
            return False
        return self.evaluate(step)

    def evaluate(self, step: int) -> bool:
        """Evaluate and record ``step``; False when a signal interrupted it (then saved)."""
        try:
            self.last_eval = self.r.evaluator.state(self.r.state)
        except Preempted:
            self.stop(step, eval_pending=True)
            return False
        self.writer.write(step, self.last_eval)
        _say(self.bar, _eval_line(step, self.last_eval))
        self.meter.pause()
        return True

    def save(self, step: int, evaluated: bool) -> None:
        self.meter.check()
        self.r.save(step, self.last_eval if evaluated else None)

    def stop(self, step: int, *, eval_pending: bool = False) -> None:
        """Preempted: save ``step`` and say how to resume."""
        self.last_eval = {}  # no final metrics to report
        self.meter.check()
        self.r.save(step, eval_pending=eval_pending)
        self.r.checkpointer.wait()
        _say(self.bar, f"{self.preemption.signal_name or 'preempted'}: saved step {step} to "
                       f"{self.r.checkpointer.directory}; exiting (run the same command to "
                       "resume)")


def _eval_line(step: int, m: dict[str, float]) -> str:
    line = f"step {step}: eval top-1 {m['eval/top1']:.2f}%"
    if "eval/ema_top1" in m:
        line += f", EMA top-1 {m['eval/ema_top1']:.2f}%"
    log.info("step %d: %s", step, {k: round(v, 4) for k, v in m.items()})
    return line


def _say(bar, line: str) -> None:
    """A line on the console (process 0), above the bar."""
    if jax.process_index() == 0:
        bar.write(line)


def _progress_bar(total: int, initial: int):
    """tqdm on process 0 (step, loss, lr, img/s, ETA); a silent stand-in elsewhere."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0)
