"""Reading a saved run back: the one place that knows what a path given to ``evaluate``,
``export``, ``analysis`` or the Colab helpers is, and how to load it.

A path is one of three things (:func:`resolve`):

* a model directory (``deepvit_jax.model_dir``: ``config.json`` + ``state/``);
* a training workdir (``deepvit_jax.workdir``): its latest checkpoint, or ``step``;
* one training checkpoint ``WORKDIR/checkpoints/<step>``.

:func:`load_checkpoint` reads the weights with their model config and, for a training
checkpoint, the run's config (``meta``); :func:`eval_config` and :func:`saved_run_evaluator`
then give the run's own evaluation (dataset, eval batch, BatchNorm re-estimation) on them, so
a command reports the numbers the training loop logged at that step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from deepvit_jax import model_dir, parallel, workdir
from deepvit_jax.data.dataset import dataset_info
from deepvit_jax.data.config import default_data_config, digits_data_config
from deepvit_jax.data.device_augment import make_device_augment
from deepvit_jax.errors import CheckpointError, ConfigError, ModelFileError
from deepvit_jax.models import ModelConfig
from deepvit_jax.train import config as config_lib
from deepvit_jax.train import evaluator as evaluator_lib
from deepvit_jax.train import state as state_lib
from deepvit_jax.train import step as step_lib

log = logging.getLogger(__name__)

CHECKPOINTS = workdir.CHECKPOINTS


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved ``--checkpoint``: a model directory, or step ``step`` of the training
    checkpoints in ``checkpoints_dir``."""

    kind: str  # 'model' | 'training'
    path: str  # the model directory, or checkpoints_dir/<step>
    checkpoints_dir: str | None = None
    step: int | None = None


def resolve(path: str, step: int | None = None) -> Source:
    """What ``path`` is: a model directory, a training workdir (its latest checkpoint or
    ``step``), a ``checkpoints`` directory, or one training checkpoint."""
    CONFIG_FILE = model_dir.CONFIG_FILE
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory (expected a model directory, a "
                              f"training workdir or WORKDIR/{CHECKPOINTS}/<step>)")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        if step is not None:
            raise CheckpointError(f"{path} is a model directory (one set of weights): "
                                  f"--step {step} applies to training workdirs only; drop it")
        return Source("model", path)
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, workdir.STATE)):
        if step is not None and step != int(name):
            raise CheckpointError(f"{path} is the checkpoint of step {name}, not --step "
                                  f"{step}; drop --step or pass the workdir")
        return Source("training", path, parent, int(name))
    ckpt_dir = path if name == CHECKPOINTS else os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(
            f"{path}: neither a model directory (no {CONFIG_FILE}) nor a training workdir "
            f"(no {CHECKPOINTS}/ directory); pass what deepvit_jax.main --workdir, "
            f"deepvit_jax.export --out or deepvit_jax.convert --out wrote")
    steps = workdir.checkpoint_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint yet (the run has not "
                              f"saved one); wait for its first checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint of step {step}; available steps: "
                              f"{', '.join(map(str, steps))} (pass one of them to --step)")
    return Source("training", os.path.join(ckpt_dir, str(step)), ckpt_dir, step)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def run_config_from_meta(saved: dict):
    """The run's ConfigDict rebuilt from a checkpoint's ``meta['config']``: the saved values
    over today's defaults (``train.config.base_config``), so fields added since the run keep
    their defaults; JSON lists become tuples where the default is a tuple."""
    c = config_lib.base_config(str(saved.get("model_name", "deepvit_16b")))

    def merge(node, src: dict, prefix: str):
        for key, value in src.items():
            if key not in node:
                log.info("run config: %s%s is not a field any more; ignored", prefix, key)
                continue
            cur = node[key]
            if isinstance(cur, ml_collections.ConfigDict) and isinstance(value, dict):
                merge(cur, value, f"{prefix}{key}.")
                continue
            if isinstance(value, list):
                value = tuple(value)
            try:
                node[key] = value
            except TypeError:
                with node.ignore_type():
                    node[key] = value

    merge(c, {k: v for k, v in saved.items() if k != "model"}, "")
    return c


def read_meta(source: Source) -> dict:
    """The ``meta`` item (run config + model config) of a training checkpoint."""
    meta_dir = os.path.join(source.path, workdir.META)
    fix = ("checkpoints written by python -m deepvit_jax.main carry it; for other weights "
           "use a model directory (deepvit_jax.model_dir.save_model)")
    if not os.path.isdir(meta_dir):
        raise CheckpointError(f"{meta_dir}: missing, so the checkpoint has no run or model "
                              f"config; {fix}")
    mgr = workdir.read_only_manager(source.checkpoints_dir)
    try:
        meta = workdir.restore_meta(mgr, source.step)
    except Exception as e:  # Orbax raises several types for a damaged item
        raise CheckpointError(f"{meta_dir}: unreadable ({type(e).__name__}: {e}); {fix}") \
            from None
    finally:
        mgr.close()
    if not isinstance(meta, dict) or "config" not in meta or "model_config" not in meta:
        raise CheckpointError(f"{meta_dir}: no 'config' / 'model_config' in the checkpoint's "
                              f"meta (keys {sorted(meta) if isinstance(meta, dict) else meta}); "
                              f"{fix}")
    return meta


@dataclasses.dataclass
class Loaded:
    """Weights read from a model directory or a training checkpoint, placed on ``mesh``
    (replicated over a data-parallel mesh of every device)."""

    source: Source
    model_cfg: Any  # ModelConfig
    run_config: Any  # the run's ConfigDict (training checkpoints), else None
    model_def: Any  # train.state.ModelDef
    mesh: Any
    params: Any
    batch_stats: Any
    rest: Any
    ema_params: Any = None
    ema_batch_stats: Any = None
    shardings: Any = None  # TrainState-like tree of shardings (params, batch_stats)
    rest_shardings: Any = None

    def weights(self, ema: bool = False):
        """(params, batch_stats): the live weights, or the EMA ones."""
        if not ema:
            return self.params, self.batch_stats
        if self.ema_params is None:
            what = ("a model directory holds one set of weights" if self.source.kind == "model"
                    else "the run kept no EMA (config.ema_decay = 0)")
            raise CheckpointError(f"{self.source.path}: --ema, but {what}; drop --ema")
        return self.ema_params, self.ema_batch_stats

    def model(self, ema: bool = False, batch_stats=None):
        """A ready ``DeepViT`` (eval mode) with these weights (``batch_stats`` replaces the
        BatchNorm statistics, e.g. re-estimated ones)."""
        params, stats = self.weights(ema)
        return self.model_def.merge(params, stats if batch_stats is None else batch_stats,
                                    self.rest, train=False)


def _eval_mesh():
    return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def load_checkpoint(path: str, step: int | None = None, *, mesh=None) -> Loaded:
    """The weights at ``path`` (see :func:`resolve`) with their configs. A training
    checkpoint is restored into the abstract TrainState the training loop builds from the
    saved run config (optimizer included), then its model weights are kept."""
    source = path if isinstance(path, Source) else resolve(path, step)
    return _load(source, mesh or _eval_mesh())


def _load(source: Source, mesh) -> Loaded:
    replicated = parallel.replicated(mesh)
    ema_params = ema_stats = None
    run_config = None
    if source.kind == "model":
        try:
            mcfg, weights = model_dir.load_model_state(source.path, sharding=replicated)
        except ModelFileError as e:
            raise CheckpointError(str(e)) from None
        params, stats = nnx.split_state(weights, nnx.Param, nnx.BatchStat)
        rest = _rest(mcfg, replicated)
    else:
        meta = read_meta(source)
        run_config = run_config_from_meta(meta["config"])
        try:
            mcfg = ModelConfig.from_dict(meta["model_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source.path}/meta: invalid model config: {e}") from None
        params, stats, ema_params, ema_stats = _restore_training(source, run_config, mcfg,
                                                                 replicated)
        rest = _rest(mcfg, replicated)
    rest_sh = jax.tree.map(lambda _: replicated, rest)
    shardings = _Shardings(jax.tree.map(lambda _: replicated, params),
                           jax.tree.map(lambda _: replicated, stats))
    return Loaded(source, mcfg, run_config, state_lib.make_model_def(mcfg), mesh, params,
                  stats, rest, ema_params, ema_stats, shardings, rest_sh)


def _rest(mcfg, sharding):
    """The model's RNG-stream variables (never saved; only dropout uses them)."""
    # Only the RNG streams leave the jitted function: XLA drops the parameter init.
    return jax.jit(lambda: state_lib.split_model(state_lib.build_model(mcfg, 0))[3],
                   out_shardings=sharding)()


@dataclasses.dataclass(frozen=True)
class _Shardings:
    """The two fields of a TrainState of shardings that the evaluator reads."""

    params: Any
    batch_stats: Any


def _restore_training(source: Source, run_config, mcfg, sharding):
    """(params, batch_stats, ema_params, ema_batch_stats) of a training checkpoint, every
    array placed with ``sharding``."""
    # The optimizer's state structure does not depend on the schedule's values: any
    # callable schedule gives the loop's tree.
    tx = step_lib.make_optimizer(run_config.optim, lambda count: 0.0)
    ema = run_config.ema_decay > 0
    abstract_state, _ = jax.eval_shape(
        lambda: state_lib.init_state(mcfg, tx, run_config.seed, ema=ema))
    target = workdir.abstract_like(abstract_state, jax.tree.map(lambda _: sharding, abstract_state))
    mgr = workdir.read_only_manager(source.checkpoints_dir)
    try:
        out = mgr.restore(source.step, args=ocp.args.Composite(
            **{workdir.STATE: ocp.args.StandardRestore(target)}))
        state = out[workdir.STATE]
    except Exception as e:  # Orbax raises several types for structure/shape mismatches
        raise CheckpointError(
            f"{source.path}/state: cannot restore the TrainState that the saved config "
            f"describes ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the checkpoint "
            f"and its meta disagree or the checkpoint is damaged") from None
    finally:
        mgr.close()
    return state.params, state.batch_stats, state.ema_params, state.ema_batch_stats


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def eval_config(loaded: Loaded, *, dataset: str | None = None, split: str | None = None,
                data_dir: str | None = None, batch_size: int | None = None,
                bn_recalibrate: int | None = None):
    """The config the evaluator reads: the run's own (training checkpoint) or a fresh one
    (model directory; then ``dataset`` is required), with the options applied."""
    if loaded.run_config is not None:
        c = loaded.run_config
        if dataset and dataset != c.data.dataset:
            c.data = digits_data_config() if dataset == "digits" else default_data_config()
            c.data.dataset = dataset
    else:
        if not dataset:
            raise CheckpointError(f"{loaded.source.path} is a model directory: it does not say "
                                  f"which data it was trained on; pass --dataset (e.g. "
                                  f"--dataset digits or --dataset imagenet2012)")
        c = config_lib.base_config(loaded.model_cfg.name)
        c.data = digits_data_config() if dataset == "digits" else default_data_config()
        c.data.dataset = dataset
        c.eval.bn_recalibration_batches = 0
        c.seed = 0
    if split:
        c.data.eval_split = split
    if data_dir:
        c.data.data_dir = data_dir
    if batch_size:
        c.eval.batch_size = int(batch_size)
    elif loaded.run_config is None:
        c.eval.batch_size = 64
    if bn_recalibrate is not None:
        if bn_recalibrate < 0:
            raise ConfigError(f"--bn-recalibrate {bn_recalibrate}: must be >= 0")
        c.eval.bn_recalibration_batches = int(bn_recalibrate)
    return c


def saved_run_evaluator(loaded: Loaded, config):
    """(Evaluator, DatasetInfo) for ``loaded`` on ``config``'s eval split; the class counts
    are checked and the batch sizes fitted to the mesh before anything is compiled."""
    try:
        dataset = dataset_info(config.data)
    except Exception as e:  # any failure to resolve the dataset names it
        raise ConfigError(f"dataset {config.data.dataset!r}: {e}") from None
    if dataset.num_classes != loaded.model_cfg.num_classes:
        raise ConfigError(
            f"dataset {dataset.name!r} has {dataset.num_classes} classes but the model in "
            f"{loaded.source.path} has {loaded.model_cfg.num_classes}; pass the dataset it "
            f"was trained on (--dataset)")
    mesh = loaded.mesh
    shards = parallel.batch_size_per_shard(mesh) * jax.process_count()
    eval_bs = int(config.eval.batch_size or config.batch_size)
    recal_bs = int(config.eval.bn_recalibration_batch_size or config.batch_size)
    for name, bs in (("--batch-size", eval_bs), ("eval.bn_recalibration_batch_size", recal_bs)):
        if bs % shards:
            raise ConfigError(f"{name} {bs}: must be a multiple of the {shards} devices "
                              f"evaluating (data-parallel over every device)")
    ev = evaluator_lib.make_evaluator(
        config, model_def=loaded.model_def, dataset=dataset, mesh=mesh,
        eval_batch_size=eval_bs, recal_batch_size=recal_bs, state_shardings=loaded.shardings,
        rest=loaded.rest, rest_shardings=loaded.rest_shardings,
        augment_fn=make_device_augment(config.data, image_size=loaded.model_cfg.image_size,
                                       mean=loaded.model_cfg.mean, std=loaded.model_cfg.std))
    return ev, dataset
