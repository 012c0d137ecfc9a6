"""Evaluation: top-1 / top-5 / loss over a whole split, with BatchNorm re-estimation.

:func:`evaluate` is a plain function of weights and batches; :class:`Evaluator` binds it to
a run's compiled steps and iterators (the training loop builds one with
:func:`make_evaluator`; an evaluation command can do the same). With
``config.eval.bn_recalibration_batches = K`` every BatchNorm's statistics are re-estimated
on K fixed training batches before each evaluation, as the official script does: the same K
batches every time (a separate iterator, seed + 1, rewound), training augmentation (mixup
and cutmix belong to the train step and are not applied), dropout off. The statistics are
for evaluation only: the train state and its checkpoints keep the running ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from deepvit_jax import parallel
from deepvit_jax.data.dataset import ImageSpec
from deepvit_jax.data.eval_stream import make_eval_iterator
from deepvit_jax.data.train_stream import make_train_iterator
from deepvit_jax.train import step as step_lib

log = logging.getLogger(__name__)


def evaluate(eval_step: Callable, params, batch_stats, rest, batches: Iterable) -> dict:
    """``{'top1', 'top5', 'loss', 'count'}`` over ``batches`` (masked padding excluded;
    accuracies in %)."""
    return evaluate_models(eval_step, [(params, batch_stats)], rest, batches)[0]


def evaluate_models(eval_step: Callable, models: Sequence[tuple[Any, Any]], rest,
                    batches: Iterable) -> list[dict]:
    """:func:`evaluate` of each ``(params, batch_stats)`` in ``models``, in one pass over
    ``batches`` (the live and the EMA model read the split once)."""
    sums, _ = _sum_per_model(eval_step, models, rest, batches)
    return [_metrics(s) for s in jax.device_get(sums)]


def _sum_per_model(step: Callable, models: Sequence[tuple[Any, Any]], rest,
                   batches: Iterable) -> tuple[list, int]:
    """(per model, the sum over ``batches`` of ``step(params, batch_stats, rest, batch)``;
    the number of batches): one pass over ``batches`` for every model."""
    sums, n = [None] * len(models), 0
    for batch in batches:
        for i, (params, batch_stats) in enumerate(models):
            out = step(params, batch_stats, rest, batch)
            sums[i] = out if sums[i] is None else jax.tree.map(jnp.add, sums[i], out)
        n += 1
    return sums, n


def _metrics(sums) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"top1": 100.0 * sums["top1"] / n, "top5": 100.0 * sums["top5"] / n,
            "loss": sums["loss"] / n, "count": float(sums["count"])}


def recalibrate_batch_stats(bn_stats_step: Callable, params, batch_stats, rest,
                            images: Iterable) -> Any:
    """Every BatchNorm's statistics averaged over the image batches (each batch's mean and
    unbiased variance from ``bn_stats_step``): ``torch.optim.swa_utils.update_bn``."""
    return recalibrate_models(bn_stats_step, [(params, batch_stats)], rest, images)[0]


def recalibrate_models(bn_stats_step: Callable, models: Sequence[tuple[Any, Any]], rest,
                       images: Iterable) -> list:
    """:func:`recalibrate_batch_stats` of each ``(params, batch_stats)`` in ``models``, in one
    pass over ``images`` (the live and the EMA model read the batches once)."""
    totals, n = _sum_per_model(bn_stats_step, models, rest, images)
    if not n:
        raise ValueError("recalibrate_batch_stats: no batches")
    return [jax.tree.map(lambda t: t / n, total) for total in totals]


@dataclasses.dataclass
class Evaluator:
    """A run's evaluation: ``evaluator(params, batch_stats) -> metrics``."""

    eval_step: Callable
    eval_batches: Iterable  # one full pass over the split per iter()
    rest: Any
    bn_stats_step: Callable | None = None
    recal_iterator: Any = None  # a resumable training iterator (get_state / set_state)
    num_recal: int = 0
    # (i, images) -> images: the on-device augmentation of the i-th re-estimation batch when
    # the host pipeline leaves it to the device (config.data.device_augment).
    recal_augment: Callable | None = None

    def __post_init__(self):
        if self.num_recal:
            self._recal_start = self.recal_iterator.get_state()

    def batch_stats_for(self, params, batch_stats):
        """The BatchNorm statistics this evaluator uses for ``params``: re-estimated on the
        fixed batches, or ``batch_stats`` as they are when re-estimation is off."""
        return self.batch_stats_of([(params, batch_stats)])[0]

    def batch_stats_of(self, models: Sequence[tuple[Any, Any]]) -> list:
        """:meth:`batch_stats_for` of each ``(params, batch_stats)``, reading the fixed
        batches once for all of them."""
        if not self.num_recal:
            return [batch_stats for _, batch_stats in models]
        self.recal_iterator.set_state(self._recal_start)
        images = (next(self.recal_iterator)["image"] for _ in range(self.num_recal))
        if self.recal_augment is not None:
            images = (self.recal_augment(i, x) for i, x in enumerate(images))
        return recalibrate_models(self.bn_stats_step, models, self.rest, images)

    def __call__(self, params, batch_stats) -> dict[str, float]:
        return self.models([(params, batch_stats)])[0]

    def models(self, models: Sequence[tuple[Any, Any]]) -> list[dict[str, float]]:
        """The metrics of each ``(params, batch_stats)``: one pass over the re-estimation
        batches and one over the split for all of them."""
        stats = self.batch_stats_of(models)
        return evaluate_models(self.eval_step, [(p, s) for (p, _), s in zip(models, stats,
                                                                             strict=True)],
                               self.rest, self.eval_batches)

    def state(self, state) -> dict[str, float]:
        """``eval/*`` metrics of a TrainState's live model, plus ``eval/ema_*`` of its EMA."""
        models = [(state.params, state.batch_stats)]
        if state.ema_params is not None:
            models.append((state.ema_params, state.ema_batch_stats))
        live, *ema = self.models(models)
        out = {f"eval/{k}": v for k, v in live.items()}
        if ema:
            out.update({f"eval/ema_{k}": v for k, v in ema[0].items() if k != "count"})
        return out


def jit_eval_step(model_def, mesh, state_shardings, rest_shardings):
    """``step.make_eval_step`` jitted with a run's shardings (``state_shardings``: a
    TrainState of shardings): the evaluator's step, and what ``deepvit_jax.aot`` compiles."""
    data_sh = parallel.batch_sharding(mesh)
    return jax.jit(
        step_lib.make_eval_step(model_def),
        in_shardings=(state_shardings.params, state_shardings.batch_stats, rest_shardings,
                      {"image": data_sh, "label": data_sh, "mask": data_sh}),
        out_shardings=parallel.replicated(mesh))


def make_evaluator(config, *, model_def, dataset, mesh, eval_batch_size: int,
                   recal_batch_size: int, state_shardings, rest, rest_shardings,
                   augment_fn: Callable | None = None) -> Evaluator:
    """The Evaluator of a training config: compiled eval (and BatchNorm-statistics) steps
    with the run's shardings (``state_shardings``: a TrainState of shardings), the eval
    split of the resolved ``dataset``, and the re-estimation batches if any.
    ``augment_fn(key, images)`` is the run's on-device augmentation
    (``data.device_augment.make_device_augment``; None when the host pipeline does it all),
    applied to the re-estimation batches as the train step applies it."""
    data_sh = parallel.batch_sharding(mesh)
    spec = ImageSpec.of(model_def.config)
    eval_step = jit_eval_step(model_def, mesh, state_shardings, rest_shardings)
    eval_batches = make_eval_iterator(
        config.data, global_batch_size=eval_batch_size, spec=spec, sharding=data_sh,
        dataset=dataset)
    has_bn = bool(jax.tree.leaves(state_shardings.batch_stats))
    num_recal = config.eval.bn_recalibration_batches if has_bn else 0
    if config.eval.bn_recalibration_batches and not num_recal:
        log.info("eval.bn_recalibration_batches=%d: %s has no BatchNorm, nothing to "
                 "re-estimate", config.eval.bn_recalibration_batches, config.model_name)
    if not num_recal:
        return Evaluator(eval_step, eval_batches, rest)
    recal_it = make_train_iterator(
        config.data, global_batch_size=recal_batch_size, spec=spec, sharding=data_sh,
        seed=config.seed + 1, dataset=dataset)
    bn_stats_step = jax.jit(
        step_lib.make_bn_stats_step(model_def),
        in_shardings=(state_shardings.params, state_shardings.batch_stats, rest_shardings,
                      data_sh),
        out_shardings=state_shardings.batch_stats)
    recal_augment = None
    if augment_fn is not None:
        # The host pipeline only crops, resizes and flips: finish the augmentation on device,
        # with fixed keys, so that every evaluation re-estimates on the same images.
        base = jax.random.key(config.seed + 1)
        recal_augment = jax.jit(lambda i, x: augment_fn(jax.random.fold_in(base, i), x),
                                out_shardings=data_sh)
    log.info("BatchNorm statistics re-estimated before each evaluation (%s) on %d training "
             "batches of %d (augmented, seed %d), averaged",
             "live and EMA model" if config.ema_decay > 0 else "live model", num_recal,
             recal_batch_size, config.seed + 1)
    return Evaluator(eval_step, eval_batches, rest, bn_stats_step, recal_it, num_recal,
                     recal_augment)
