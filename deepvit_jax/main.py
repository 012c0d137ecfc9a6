"""Train DeepViT / ViT: ``python -m deepvit_jax.main --config configs/FILE.py[:ARG] --workdir DIR``
(e.g. ``--config configs/default.py``, ``--config configs/i1k.py:deepvit_16b``).

Any config field can be overridden: ``--config.batch_size=256``,
``--config.model.depth=4``, ``--config.mesh.fsdp=8`` (the sections are described in
``deepvit_jax/train/config.py``). Running the same command
again resumes from the latest complete checkpoint in ``DIR/checkpoints``.

Multi-host: on TPU pods and under SLURM (several tasks) ``jax.distributed`` is initialised
from the environment; elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` to every process. Only process 0 writes logs and metrics.

Exit status (``deepvit_jax/errors.py``, the README): 0 done (or preempted after saving a
checkpoint), 1 NaN/inf loss, 2 bad config or input, 3 workdir locked by another run, 4 I/O
error, 130 interrupted twice. Every failure is one line on stderr naming the field or file.
"""

from __future__ import annotations

import logging

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

    from deepvit_jax.errors import storage_problem
    from deepvit_jax.utils import as_path, is_local

    absl_logging.set_verbosity(absl_logging.INFO if is_main else absl_logging.WARNING)
    absl_logging.use_absl_handler()
    if is_main and is_local(workdir):
        # train.log is a local convenience; a gs:// workdir keeps metrics.jsonl and
        # TensorBoard (object stores cannot append a log line by line).
        path = as_path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        from deepvit_jax.train.reporting import TrainLogHandler

        handler = TrainLogHandler(path / "train.log")  # a full disk: exit 4, one line
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    # Orbax and TFDS log every checkpoint / dataset step through absl at INFO: keep warnings.
    def quiet(record):
        noisy = any(k in record.pathname for k in ("orbax", "tensorflow_datasets", "jax/_src"))
        if noisy and record.exc_info and storage_problem(record.exc_info[1]):
            return False  # Orbax's traceback of a full disk: raised again, one line at exit
        return record.levelno >= logging.WARNING or not noisy

    absl_logging.get_absl_handler().addFilter(quiet)


def main(argv):
    del argv
    from deepvit_jax.errors import cli_errors

    with cli_errors():
        _train()


def _train():
    from deepvit_jax import parallel

    parallel.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    import jax

    _setup_logging(_WORKDIR.value, jax.process_index() == 0)
    from deepvit_jax.train.loop import train_and_evaluate

    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0 and metrics:
        print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
