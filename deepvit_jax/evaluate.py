"""Evaluate a model directory or a training checkpoint on a whole split.

  python -m deepvit_jax.evaluate --checkpoint runs/default                # latest checkpoint
  python -m deepvit_jax.evaluate --checkpoint runs/default --step 110 --ema
  python -m deepvit_jax.evaluate --checkpoint runs/default/checkpoints/110
  python -m deepvit_jax.evaluate --checkpoint models/deepvit_s --dataset imagenet2012 \\
      --split validation --bn-recalibrate 50

``--checkpoint`` takes a model directory (``deepvit_jax.checkpoint.save_model``, the
converter, ``python -m deepvit_jax.export``), a training workdir (its latest checkpoint, or
``--step N``) or one training checkpoint (``WORKDIR/checkpoints/N``). Top-1, top-5, loss and
the image count over the whole split (padded batches, so the count is the split's size), on
every local device (data-parallel mesh) and across processes (``--coordinator_address``
etc. as for training). A training checkpoint is evaluated with the run's own dataset, eval
batch size and BatchNorm re-estimation (``eval.bn_recalibration_batches``), so the numbers
are the ones the training loop logged at that step (``eval/*``, or ``eval/ema_*`` with
``--ema``). The table is printed and the numbers written as JSON (``--output``).

Python API (used by the notebooks):

* :func:`evaluate_checkpoint(path, ...) <evaluate_checkpoint>` -> dict of the metrics;
* :func:`load_checkpoint(path, step=None) <load_checkpoint>` -> :class:`Loaded`: the
  weights of any of the three kinds of path, with the model config and, for a training
  checkpoint, the run config; ``loaded.model(ema=...)`` is a ready ``nnx.Module``.

Exit status: 0 done, 2 bad input (a message naming the file or option and the fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

import jax

from deepvit_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # WORKDIR/checkpoints/<step>/{state,data,meta}


class CheckpointError(InputError):
    """A path that is not a readable model directory or training checkpoint; the message
    names the file and the fix."""


# --------------------------------------------------------------------------------------
# What a path is
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved ``--checkpoint``: a model directory, or step ``step`` of the training
    checkpoints in ``checkpoints_dir``."""

    kind: str  # 'model' | 'training'
    path: str  # the model directory, or checkpoints_dir/<step>
    checkpoints_dir: str | None = None
    step: int | None = None


def _is_int(name: str) -> bool:
    return name.isdigit()


def _steps(checkpoints_dir: str) -> list[int]:
    """Complete checkpoints (Orbax's temporary directories are not listed)."""
    if not os.path.isdir(checkpoints_dir):
        return []
    return sorted(int(n) for n in os.listdir(checkpoints_dir)
                  if _is_int(n) and os.path.isdir(os.path.join(checkpoints_dir, n)))


def resolve(path: str, step: int | None = None) -> Source:
    """What ``path`` is: a model directory, a training workdir (its latest checkpoint or
    ``step``), a ``checkpoints`` directory, or one training checkpoint."""
    from deepvit_jax.checkpoint import CONFIG_FILE

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
    if _is_int(name) and os.path.isdir(os.path.join(path, "state")):
        if step is not None and step != int(name):
            raise CheckpointError(f"{path} is the checkpoint of step {name}, not --step "
                                  f"{step}; drop --step or pass the workdir")
        return Source("training", path, parent, int(name))
    ckpt_dir = path if name == CHECKPOINTS else os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(
            f"{path}: neither a model directory (no {CONFIG_FILE}) nor a training workdir "
            f"(no {CHECKPOINTS}/ directory); pass what deepvit_jax.main --workdir, "
            f"deepvit_jax.export --out or deepvit_jax.convert wrote")
    steps = _steps(ckpt_dir)
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
    import ml_collections

    from deepvit_jax.train import config as config_lib

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


def _read_manager(checkpoints_dir: str):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           cleanup_tmp_directories=False)
    return ocp.CheckpointManager(checkpoints_dir, options=options,
                                 item_names=("state", "data", "meta"))


def read_meta(source: Source) -> dict:
    """The ``meta`` item (run config + model config) of a training checkpoint."""
    import orbax.checkpoint as ocp

    meta_dir = os.path.join(source.path, "meta")
    fix = ("checkpoints written by python -m deepvit_jax.main carry it; for other weights "
           "use a model directory (deepvit_jax.checkpoint.save_model)")
    if not os.path.isdir(meta_dir):
        raise CheckpointError(f"{meta_dir}: missing, so the checkpoint has no run or model "
                              f"config; {fix}")
    mgr = _read_manager(source.checkpoints_dir)
    try:
        meta = mgr.restore(source.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
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
    from deepvit_jax import parallel

    return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def load_checkpoint(path: str, step: int | None = None, *, mesh=None) -> Loaded:
    """The weights at ``path`` (see :func:`resolve`) with their configs. A training
    checkpoint is restored into the abstract TrainState the training loop builds from the
    saved run config (optimizer included), then its model weights are kept."""
    source = path if isinstance(path, Source) else resolve(path, step)
    return _load(source, mesh or _eval_mesh())


def _load(source: Source, mesh) -> Loaded:
    from deepvit_jax import parallel
    from deepvit_jax.train import state as state_lib

    replicated = parallel.replicated(mesh)
    ema_params = ema_stats = None
    run_config = None
    if source.kind == "model":
        from flax import nnx

        from deepvit_jax.checkpoint import ModelFileError, load_model_state

        try:
            mcfg, weights = load_model_state(source.path, sharding=replicated)
        except ModelFileError as e:
            raise CheckpointError(str(e)) from None
        params, stats = nnx.split_state(weights, nnx.Param, nnx.BatchStat)
        rest = _rest(mcfg, replicated)
    else:
        from deepvit_jax.models import ModelConfig

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
    from deepvit_jax.train import state as state_lib

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
    import orbax.checkpoint as ocp

    from deepvit_jax.train import state as state_lib
    from deepvit_jax.train import step as step_lib
    from deepvit_jax.train.checkpoints import abstract_like

    # The optimizer's state structure does not depend on the schedule's values: any
    # callable schedule gives the loop's tree.
    tx = step_lib.make_optimizer(run_config.optim, lambda count: 0.0)
    ema = run_config.ema_decay > 0
    abstract_state, _ = jax.eval_shape(
        lambda: state_lib.init_state(mcfg, tx, run_config.seed, ema=ema))
    target = abstract_like(abstract_state, jax.tree.map(lambda _: sharding, abstract_state))
    mgr = _read_manager(source.checkpoints_dir)
    try:
        out = mgr.restore(source.step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        state = out["state"]
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
    from deepvit_jax.data.config import default_data_config, digits_data_config
    from deepvit_jax.train import config as config_lib

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


def make_evaluator(loaded: Loaded, config):
    """(Evaluator, DatasetInfo) for ``loaded`` on ``config``'s eval split; the class counts
    are checked and the batch sizes fitted to the mesh before anything is compiled."""
    from deepvit_jax import parallel
    from deepvit_jax.data import pipeline
    from deepvit_jax.train import evaluation

    try:
        dataset = pipeline.dataset_info(config.data)
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
    ev = evaluation.make_evaluator(
        config, model_def=loaded.model_def, dataset=dataset, mesh=mesh,
        eval_batch_size=eval_bs, recal_batch_size=recal_bs, state_shardings=loaded.shardings,
        rest=loaded.rest, rest_shardings=loaded.rest_shardings)
    return ev, dataset


def evaluate_checkpoint(path: str, *, step: int | None = None, ema: bool = False,
                        dataset: str | None = None, split: str | None = None,
                        data_dir: str | None = None, batch_size: int | None = None,
                        bn_recalibrate: int | None = None) -> dict:
    """Evaluate ``path`` (model directory, training workdir or checkpoint) on a whole split:
    ``{'top1', 'top5', 'loss', 'count', ...}`` plus what was evaluated (source, step,
    dataset, split, batch size, BatchNorm re-estimation)."""
    loaded = load_checkpoint(path, step)
    config = eval_config(loaded, dataset=dataset, split=split, data_dir=data_dir,
                         batch_size=batch_size, bn_recalibrate=bn_recalibrate)
    params, stats = loaded.weights(ema)  # checks --ema before compiling
    ev, ds = make_evaluator(loaded, config)
    with jax.set_mesh(loaded.mesh):  # the context mesh: Pallas attention runs per shard
        metrics = ev(params, stats)
    return {"checkpoint": loaded.source.path, "kind": loaded.source.kind,
            "step": loaded.source.step, "ema": bool(ema), "model": loaded.model_cfg.name,
            "dataset": ds.name, "split": ds.eval_split, "split_size": ds.num_eval,
            "batch_size": int(config.eval.batch_size or config.batch_size),
            "bn_recalibrate": int(ev.num_recal),
            **{k: float(v) for k, v in metrics.items()}}


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def format_table(r: dict) -> str:
    what = r["checkpoint"] + (f" (step {r['step']})" if r["step"] is not None else "")
    rows = [("checkpoint", what + (", EMA weights" if r["ema"] else "")),
            ("model", r["model"]),
            ("data", f"{r['dataset']} / {r['split']} ({r['split_size']} images, batch "
                     f"{r['batch_size']})"),
            ("BatchNorm", f"re-estimated on {r['bn_recalibrate']} training batches"
             if r["bn_recalibrate"] else "running statistics"),
            ("top-1", f"{r['top1']:.2f} %"), ("top-5", f"{r['top5']:.2f} %"),
            ("loss", f"{r['loss']:.4f}"), ("count", f"{int(r['count'])}")]
    return "\n".join(f"{k:<11}{v}" for k, v in rows)


def default_output(r: dict) -> str:
    name = os.path.basename(r["checkpoint"].rstrip("/"))
    if r["kind"] == "training":
        name = os.path.basename(os.path.dirname(os.path.dirname(r["checkpoint"])))
        name += f"-step{r['step']}"
    return f"eval-{name}{'-ema' if r['ema'] else ''}-{r['dataset']}-{r['split']}.json"


def check_output(out: str, inputs: list[str], flag: str = "--output") -> str:
    """``out`` as an absolute path, refused when it is or lies inside an input."""
    out = os.path.abspath(out)
    for p in inputs:
        p = os.path.abspath(p)
        if out == p or out.startswith(p.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"{flag} {out} would write into the input {p}; choose a "
                                  f"path outside it")
    return out


def write_json(path: str, obj: Any) -> None:
    from deepvit_jax.utils import atomic_output

    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator_address", default="",
                   help="host:port of process 0 for multi-process runs outside TPU/SLURM")
    p.add_argument("--num_processes", type=int, default=0)
    p.add_argument("--process_id", type=int, default=-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deepvit_jax.evaluate",
        description="Top-1 / top-5 / loss of a model directory or a training checkpoint over "
                    "a whole split.", epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="model directory, training workdir, or WORKDIR/checkpoints/<step>")
    p.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a training run")
    p.add_argument("--dataset", help="dataset (default: the run's; required for a model "
                                     "directory), e.g. digits, imagenet2012, cifar10")
    p.add_argument("--split", help="split to evaluate (default: the run's eval split, else "
                                   "'validation' if the dataset has one, else 'test')")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--batch-size", type=int, help="global eval batch (default: the run's, or "
                                                  "64 for a model directory)")
    p.add_argument("--bn-recalibrate", type=int, metavar="K",
                   help="re-estimate BatchNorm statistics on K training batches first "
                        "(default: the run's eval.bn_recalibration_batches, or 0)")
    p.add_argument("--output", help="JSON file for the results (default: "
                                    "eval-<name>[-step<N>][-ema]-<dataset>-<split>.json)")
    add_distributed_flags(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Orbax's notes on opening checkpoints read-only are not the user's concern.
    logging.getLogger("absl").setLevel(logging.ERROR)

    from deepvit_jax import parallel
    from deepvit_jax.errors import run_cli

    def body():
        parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
        if args.output:  # a bad --output fails before any compute
            check_output(args.output, [args.checkpoint])
        r = evaluate_checkpoint(args.checkpoint, step=args.step, ema=args.ema,
                                dataset=args.dataset, split=args.split,
                                data_dir=args.data_dir, batch_size=args.batch_size,
                                bn_recalibrate=args.bn_recalibrate)
        out = check_output(args.output or default_output(r), [args.checkpoint])
        if jax.process_index() == 0:
            write_json(out, r)
            print(format_table(r))
            print(f"wrote {out}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
