"""Train DeepViT / ViT: ``python -m deepvit_jax.main --config configs/FILE.py[:ARG] --workdir DIR``
(e.g. ``--config configs/default.py``, ``--config configs/i1k.py:deepvit_16b``), or
``deepvit-train --config default --workdir DIR``: ``--config`` also takes a recipe name
(``default``, ``i1k:deepvit_16b``; the recipes ship in ``deepvit_jax/configs``).

Any config field can be overridden: ``--config.batch_size=256``,
``--config.model.depth=4``, ``--config.mesh.fsdp=8`` (the sections are described in
``deepvit_jax/train/config.py``). Running the same command
again resumes from the latest complete checkpoint in ``DIR/checkpoints``.

Multi-host: on TPU pods and under SLURM (several tasks) ``jax.distributed`` is initialised
from the environment; elsewhere pass ``--coordinator-address=HOST:PORT --num-processes=N
--process-id=I`` to every process. Only process 0 writes logs and metrics.

The console shows the progress bar (step, loss, lr, img/s, ETA), one line per evaluation,
warnings and the final line; ``DIR/train.log`` holds the full config, the training rows
(every ``log_every_steps``) and every checkpoint save. ``--verbose`` shows those INFO lines
and the TensorFlow / XLA notices on the console too. A mistake in ``--config`` or its
overrides is one line naming the file, line or field (``deepvit_jax/cli.py``).

Exit status (``deepvit_jax/errors.py``, the README): 0 done (or preempted after saving a
checkpoint), 1 NaN/inf loss, 2 bad config or input, 3 workdir locked by another run, 4 I/O
error, 130 interrupted twice. Every failure is one line on stderr naming the field or file.
"""

from __future__ import annotations

import jax
from absl import flags

from deepvit_jax import cli, configs, parallel
from deepvit_jax import workdir as workdir_lib
from deepvit_jax.train.loop import train_and_evaluate

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs).")
_DIST = cli.define_absl_distributed_flags()
_VERBOSE = cli.define_verbose_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.setup_console(_VERBOSE.value)
    with cli.cli_errors():
        _train()


def _train():
    parallel.initialize_distributed(_DIST["coordinator_address"].value,
                                    _DIST["num_processes"].value, _DIST["process_id"].value)
    is_main = jax.process_index() == 0
    log_file = cli.add_log_file(workdir_lib.train_log(_WORKDIR.value)) if is_main else None
    try:
        metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    finally:
        cli.remove_log_file(log_file)
    if is_main and metrics:
        print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def _recipe_names(argv: list[str]) -> list[str]:
    """``--config NAME[:ARG]`` / ``--config=NAME[:ARG]`` with a recipe name (not a file)
    rewritten to the recipe's path inside the package (``deepvit_jax.configs.resolve``)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + configs.resolve(a[len("--config="):])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = configs.resolve(out[i + 1])
    return out


def run(argv: list[str] | None = None):
    """The ``deepvit-train`` console command (and ``python -m deepvit_jax.main``)."""
    import sys

    sys.argv = _recipe_names(sys.argv if argv is None else argv)
    cli.run_absl(main)


if __name__ == "__main__":
    run()
