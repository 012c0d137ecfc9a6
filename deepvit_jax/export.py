"""Export a training checkpoint as a model directory.

  python -m deepvit_jax.export --checkpoint runs/deepvit_l_i1k --out models/deepvit_l --ema
  python -m deepvit_jax.export --checkpoint runs/default --step 440 --out models/digits \
      --bn-recalibrate 10

``--checkpoint`` is a training workdir (its latest checkpoint, or ``--step N``) or one
checkpoint ``WORKDIR/checkpoints/N``. The output is the format of
``deepvit_jax.model_dir.save_model``
(config.json + Orbax weights), which ``python -m deepvit_jax.predict``,
``python -m deepvit_jax.evaluate``, ``python -m deepvit_jax.convert --to-pytorch`` and a
training config's ``init_from`` read. ``--ema`` exports the EMA weights (and their BatchNorm
statistics); ``--bn-recalibrate K`` re-estimates every BatchNorm's statistics on K training
batches of the run (its augmentation, batch size and seed, as its evaluation does) and
stores those, so the exported model scores what the run's evaluation reported. Without it
the running statistics are exported as they are.

``--out`` is claimed before anything is read (a second export to it exits 3 at once),
written under a temporary name (``NAME.deepvit-partial-<token>``) and renamed at the end; an
existing ``--out`` is refused (``--overwrite`` replaces a model directory), and so is an
output inside the input.

Python API: :func:`export(checkpoint, out, step=None, ema=False, bn_recalibrate=0) <export>`
-> the absolute path written.

Exit status: 0 done, 2 bad input (a message naming the file or option and the fix), 3
``--out`` is being written by another command, 4 disk full / I/O error.
"""

from __future__ import annotations

import logging
import os
import sys

import jax

from deepvit_jax import cli
from deepvit_jax.errors import CheckpointError, ConfigError
from deepvit_jax.model_dir import save_model
from deepvit_jax.saved_run import eval_config, load_checkpoint, saved_run_evaluator
from deepvit_jax.utils import claim_output

log = logging.getLogger(__name__)


def export(checkpoint: str, out: str, *, step: int | None = None, ema: bool = False,
           bn_recalibrate: int = 0, overwrite: bool = False) -> str:
    """Write the model of the training checkpoint ``checkpoint`` (a workdir: its latest, or
    ``step``; or ``WORKDIR/checkpoints/N``) to the model directory ``out``; returns its
    absolute path."""
    out = cli.check_output(out, [checkpoint], flag="--out")
    # Claimed before the checkpoint is read: a second export to the same --out fails at
    # once (exit 3) instead of writing beside this one; checked again under the claim.
    with claim_output(out, primary=jax.process_index() == 0, collective=True):
        if os.path.exists(out) and not overwrite:
            raise FileExistsError(f"--out {out} already exists; choose another path or pass "
                                  f"--overwrite to replace it")
        return _export(checkpoint, out, step, ema, bn_recalibrate, overwrite)


def _export(checkpoint, out, step, ema, bn_recalibrate, overwrite) -> str:
    loaded = load_checkpoint(checkpoint, step)
    if loaded.source.kind != "training":
        raise CheckpointError(f"{loaded.source.path} is already a model directory; export "
                              f"reads training checkpoints (copy the directory instead)")
    for p in (loaded.source.path, loaded.source.checkpoints_dir):
        cli.check_output(out, [p], flag="--out")
    params, stats = loaded.weights(ema)
    if bn_recalibrate:
        config = eval_config(loaded, bn_recalibrate=bn_recalibrate)
        ev, _ = saved_run_evaluator(loaded, config)
        if not ev.num_recal:
            log.warning("--bn-recalibrate %d: %s has no BatchNorm; exporting as it is",
                        bn_recalibrate, loaded.model_cfg.name)
        stats = ev.batch_stats_for(params, stats)
    model = loaded.model(ema=ema, batch_stats=stats)
    return save_model(model, out, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("deepvit_jax.export", "Turn a training checkpoint into a model directory "
                   "(predict, evaluate, convert --to-pytorch and init_from read it).", __doc__)
    cli.add_checkpoint_flag(p, help="training workdir, or WORKDIR/checkpoints/<step>")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--bn-recalibrate", type=cli.non_negative_int, default=0, metavar="K",
                   help="store BatchNorm statistics re-estimated on K training batches")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cli.add_distributed_flags(p)
    args = p.parse_args(argv)
    cli.setup_console(args.verbose, library_warnings=False)

    def body():
        if args.bn_recalibrate < 0:
            raise ConfigError(f"--bn-recalibrate {args.bn_recalibrate}: must be >= 0")
        cli.init_distributed(args)
        path = export(args.checkpoint, args.out, step=args.step, ema=args.ema,
                      bn_recalibrate=args.bn_recalibrate, overwrite=args.overwrite)
        if jax.process_index() == 0:
            print(f"wrote {path}")

    return cli.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
