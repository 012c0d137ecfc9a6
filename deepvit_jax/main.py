"""Train DeepViT / ViT: ``python -m deepvit_jax.main --config configs/FILE.py[:ARG] --workdir DIR``
(e.g. ``--config configs/default.py``, ``--config configs/i1k.py:deepvit_16b``).

Any config field can be overridden: ``--config.batch_size=256``,
``--config.model.depth=4``, ``--config.mesh.fsdp=8`` (the sections are described in
``deepvit_jax/train/config.py``). Running the same command
again resumes from the latest complete checkpoint in ``DIR/checkpoints``.

Multi-host: on TPU pods and under SLURM (several tasks) ``jax.distributed`` is initialised
from the environment; elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` to every process. Only process 0 writes logs and metrics.

Exit status: 0 done (or preempted after saving), 1 NaN/inf loss, 2 bad config.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file and its argument (configs/FILE.py[:ARG]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs).")
_COORD = flags.DEFINE_string("coordinator_address", "",
                             "host:port of process 0 for multi-process runs outside TPU/SLURM.")
_NPROC = flags.DEFINE_integer("num_processes", 0,
                             "Number of processes (with --coordinator_address).")
_PID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _setup_logging(workdir: str, is_main: bool) -> None:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if is_main else absl_logging.WARNING)
    absl_logging.use_absl_handler()
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(workdir, "train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    # Orbax and TFDS log every checkpoint / dataset step through absl at INFO: keep warnings.
    def quiet(record):
        noisy = any(k in record.pathname for k in ("orbax", "tensorflow_datasets", "jax/_src"))
        return record.levelno >= logging.WARNING or not noisy

    absl_logging.get_absl_handler().addFilter(quiet)


def main(argv):
    del argv
    from deepvit_jax import parallel
    from deepvit_jax.errors import ConfigError

    try:
        parallel.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import jax

    _setup_logging(_WORKDIR.value, jax.process_index() == 0)
    from deepvit_jax.train.loop import train_and_evaluate
    from deepvit_jax.train.reporting import NonFiniteLossError

    try:
        metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0 and metrics:
        print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
