"""Evaluate a model directory or a training checkpoint on a whole split.

  python -m deepvit_jax.evaluate --checkpoint runs/default                # latest checkpoint
  python -m deepvit_jax.evaluate --checkpoint runs/default --step 110 --ema
  python -m deepvit_jax.evaluate --checkpoint runs/default/checkpoints/110
  python -m deepvit_jax.evaluate --checkpoint models/deepvit_s --dataset imagenet2012 \\
      --split validation --bn-recalibrate 50

``--checkpoint`` takes a model directory (``deepvit_jax.model_dir.save_model``, the
converter, ``python -m deepvit_jax.export``), a training workdir (its latest checkpoint, or
``--step N``) or one training checkpoint (``WORKDIR/checkpoints/N``). Top-1, top-5, loss and
the image count over the whole split (padded batches, so the count is the split's size), on
every local device (data-parallel mesh) and across processes (``--coordinator-address``
etc. as for training). A training checkpoint is evaluated with the run's own dataset, eval
batch size and BatchNorm re-estimation (``eval.bn_recalibration_batches``), so the numbers
are the ones the training loop logged at that step (``eval/*``, or ``eval/ema_*`` with
``--ema``). The table is printed and the numbers written as JSON (``--output``).

Python API (used by the notebooks):

* :func:`evaluate_checkpoint(path, ...) <evaluate_checkpoint>` -> dict of the metrics;
* ``deepvit_jax.saved_run.load_checkpoint(path, step=None)`` -> ``Loaded``: the weights of
  any of the three kinds of path, with the model config and, for a training checkpoint, the
  run config; ``loaded.model(ema=...)`` is a ready ``nnx.Module``.

Exit status: 0 done, 2 bad input (a message naming the file or option and the fix).
"""


from __future__ import annotations

import os
import sys

import jax

from deepvit_jax import cli
from deepvit_jax.saved_run import eval_config, load_checkpoint, saved_run_evaluator


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
    ev, ds = saved_run_evaluator(loaded, config)
    with jax.set_mesh(loaded.mesh):  # the context mesh: Pallas attention runs per shard
        metrics = ev(params, stats)
    return {"checkpoint": loaded.source.path, "kind": loaded.source.kind,
            "step": loaded.source.step, "ema": bool(ema), "model": loaded.model_cfg.name,
            "dataset": ds.name, "split": ds.eval_split, "split_size": ds.num_eval,
            "batch_size": int(config.eval.batch_size or config.batch_size),
            "bn_recalibrate": int(ev.num_recal),
            **{k: float(v) for k, v in metrics.items()}}


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


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("deepvit_jax.evaluate", "Top-1 / top-5 / loss of a model directory or a "
                   "training checkpoint over a whole split.", __doc__)
    cli.add_checkpoint_flag(p)
    p.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a training run")
    p.add_argument("--dataset", help="dataset (default: the run's; required for a model "
                                     "directory), e.g. digits, imagenet2012, cifar10")
    p.add_argument("--split", help="split to evaluate (default: the run's eval split, else "
                                   "'validation' if the dataset has one, else 'test')")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--batch-size", type=cli.positive_int,
                   help="global eval batch (default: the run's, or 64 for a model directory)")
    p.add_argument("--bn-recalibrate", type=cli.non_negative_int, metavar="K",
                   help="re-estimate BatchNorm statistics on K training batches first "
                        "(default: the run's eval.bn_recalibration_batches, or 0)")
    p.add_argument("--output", help="JSON file for the results (default: "
                                    "eval-<name>[-step<N>][-ema]-<dataset>-<split>.json)")
    cli.add_distributed_flags(p)
    args = p.parse_args(argv)
    cli.setup_console(args.verbose, library_warnings=False)

    def body():
        cli.init_distributed(args)
        if args.output:  # a bad --output fails before any compute
            cli.check_output(args.output, [args.checkpoint])
        r = evaluate_checkpoint(args.checkpoint, step=args.step, ema=args.ema,
                                dataset=args.dataset, split=args.split,
                                data_dir=args.data_dir, batch_size=args.batch_size,
                                bn_recalibrate=args.bn_recalibrate)
        out = cli.check_output(args.output or default_output(r), [args.checkpoint])
        if jax.process_index() == 0:
            cli.write_json(out, r)
            print(format_table(r))
            print(f"wrote {out}")

    return cli.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
