"""What the loop reports and reacts to: metrics (metrics.jsonl + TensorBoard), the per-step
meter (img/s, data-wait time, the NaN check) and preemption signals.

TensorBoard goes through ``clu.metric_writers`` (the writer of the Flax examples and scenic):
it writes TensorFlow event files with ``tf.summary`` (the ``tensorboard`` package provides
the scalar summaries), to a local directory or ``gs://``, and logs every row too.
``metrics.jsonl`` is our own: one JSON object per log / eval row, cut back to the restored
step on resume, so it always describes one uninterrupted run (a last line cut short by a
kill is dropped). On resume the TensorBoard events are rewritten from the kept rows, so
the steps replayed after the restored checkpoint are not shown twice.

Preemption: SIGTERM, SIGINT and SIGHUP (the terminal closed) set a flag that the loop
checks before each step, before an evaluation and between evaluation batches; a second
signal aborts at once (exit 130).

A write that fails for lack of space, quota or permission (metrics, TensorBoard, train.log)
stops the run with :class:`~deepvit_jax.errors.StorageError` (exit status 4).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clu import metric_writers
from jax.experimental import multihost_utils

from deepvit_jax.errors import Aborted, NonFiniteLossError, Preempted
from deepvit_jax.utils import as_path, atomic_output
from deepvit_jax.workdir import METRICS, TENSORBOARD

log = logging.getLogger(__name__)


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_finite_state(step: int, state) -> None:
    """Raise NonFiniteLossError unless the parameters and optimizer state after ``step``
    are finite: a checkpoint is never written with weights that a finite loss of the same
    step cannot vouch for (e.g. an update that overflowed)."""
    trees = (state.params, state.opt_state, state.ema_params)
    if not bool(jax.device_get(_all_finite(trees))):
        raise NonFiniteLossError(f"non-finite parameters after step {step} (the update "
                                 "overflowed)")


class MetricWriter:
    """``DIR/metrics.jsonl`` + TensorBoard events in ``DIR/tensorboard`` (process 0 only),
    through the run's filesystem layer (``utils.as_path``: local or ``gs://``)."""

    def __init__(self, workdir, *, resume_step: int | None):
        self.enabled = jax.process_index() == 0
        workdir = as_path(workdir)
        self.path = workdir / METRICS
        self.tb = None
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        kept: list[dict] = []
        if self.path.exists():
            # Keep the history up to the restored step; later lines belong to lost work.
            keep_to = resume_step if resume_step is not None else -1
            kept = [r for r in self._rows() if r.get("step", 0) <= keep_to]
            with atomic_output(self.path) as tmp, as_path(tmp).open("w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in kept))
        tb_dir = workdir / TENSORBOARD
        if resume_step is not None and tb_dir.exists():
            # TensorBoard would show the replayed steps twice: rewrite it from the kept rows.
            tb_dir.rmtree()
        self.tb = metric_writers.SummaryWriter(os.fspath(tb_dir))
        for r in kept:
            self.tb.write_scalars(int(r["step"]), {k: v for k, v in r.items() if k != "step"})
        self.tb.flush()

    def _rows(self) -> list[dict]:
        rows = []
        lines = self.path.read_text().splitlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                # A kill or a full disk during an append cuts the last line short.
                log.warning("%s line %d of %d is not a complete JSON row (%r...): dropped",
                            self.path, i, len(lines), line[:40])
                continue
            rows.append(row)
        return rows

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.tb.write_scalars(int(step), metrics)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite(m) -> bool:
    return all(np.isfinite(float(m[k])) for k in ("train/loss", "train/grad_norm"))


def input_advice(data_cfg, backend: str) -> str | None:
    """What would shorten a run's waits for input, for the input-bound warning; None when no
    setting would: on a CPU backend the input pipeline and the model share the same cores,
    so a wait there is the model's own compute, not a slow input."""
    if backend == "cpu":
        return None
    tips = []
    if (data_cfg.get("randaugment") or data_cfg.get("random_erasing")) and not data_cfg.get(
            "device_augment"):
        tips.append("move RandAugment / erasing to the accelerator (data.device_augment=True)")
    if not data_cfg.get("cache"):
        tips.append("cache a split that fits in host memory (data.cache=True)")
    tips.append("add host cores")
    return ", ".join(tips[:-1]) + (", or " if len(tips) > 1 else "") + tips[-1]


class StepMeter:
    """The training steps since the last log row: their metrics (device arrays until read),
    img/s and the time spent waiting for input. :meth:`check` is the NaN check."""

    WARN_WAIT_FRACTION = 0.25  # of the wall time: the input pipeline is the bottleneck

    def __init__(self, batch_size: int, steps_per_epoch: int,
                 advice: str | None = "add host cores"):
        """``advice``: what would help when the input is the bottleneck (:func:`input_advice`);
        None: no warning (the wait is still in every row)."""
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.advice = advice
        self.window: list[tuple[int, Any]] = []
        self.checked = 0  # how many of the window's steps are known finite
        self.wait = 0.0
        self.t0 = time.perf_counter()
        self._last_warning = -np.inf
        # The first window holds the input's start-up (a shuffle buffer filling, worker
        # start-up) and the first compile: a wait there says nothing about the steady state.
        self._warm = False

    def add(self, step: int, metrics, wait_s: float) -> None:
        self.window.append((step, metrics))
        self.wait += wait_s
        # The previous step is done by now (its successor was dispatched): checking it costs
        # no stall and stops a diverged run one step late.
        self._check(len(self.window) - 1)

    def check(self) -> None:
        """Raise NonFiniteLossError naming the first step whose loss or grad norm is NaN/inf."""
        self._check(len(self.window))

    def _check(self, end: int) -> None:
        """Fetch the window's unchecked metrics before ``end`` once, check them and keep the
        host copies (the log row reads those instead of fetching again)."""
        pending = self.window[self.checked:end]
        if not pending:
            return
        for i, m in enumerate(jax.device_get([m for _, m in pending])):
            step = pending[i][0]
            if not _finite(m):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (loss={float(m['train/loss'])}, "
                    f"grad_norm={float(m['train/grad_norm'])})")
            self.window[self.checked + i] = (step, m)
        self.checked = end

    def pause(self) -> None:
        """Restart the clock (evaluation time does not count against img/s)."""
        self.t0 = time.perf_counter()

    def summary(self, step: int) -> dict[str, float]:
        """The window's mean metrics, lr, img/s, data wait and epoch; starts a new window."""
        self.check()
        host = [m for _, m in self.window]
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        n = len(host)
        row = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        row["train/lr"] = float(host[-1]["train/lr"])
        row["img_per_sec"] = n * self.batch_size / elapsed
        row["data_wait_ms"] = 1e3 * self.wait / max(n, 1)
        row["data_wait_fraction"] = self.wait / elapsed
        row["epoch"] = step / self.steps_per_epoch
        if (self.advice and self._warm and row["data_wait_fraction"] > self.WARN_WAIT_FRACTION
                and time.monotonic() - self._last_warning > 600):
            self._last_warning = time.monotonic()
            log.warning("input-bound: %.0f%% of the last %d steps waited for data (%.1f ms/step)"
                        "; %s", 100 * row["data_wait_fraction"], n, row["data_wait_ms"],
                        self.advice)
        self.window, self.checked, self.wait, self._warm = [], 0, 0.0, True
        self.t0 = time.perf_counter()
        return row


class Preemption:
    """SIGTERM / SIGINT / SIGHUP set a flag; the loop saves a checkpoint and exits at the next
    check (before each step, before an evaluation, between evaluation batches). A second
    signal raises :class:`~deepvit_jax.errors.Aborted` at once. With several processes the
    flag is OR-ed across them so that all stop at the same point.

    SIGHUP is what a closed terminal (an ssh session that ends) sends: it is handled as
    SIGTERM, and the output that went to that terminal goes to /dev/null from then on
    (``train.log`` keeps it), so that writing to a terminal that is gone cannot stop the
    save. A run started with ``nohup`` (SIGHUP ignored) keeps ignoring it and trains on."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.flag = False
        self.signal_name = ""
        self._old = {}
        for s in self.SIGNALS:
            if s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN:
                continue  # nohup: the user asked to survive the hang-up
            self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            _detach_from_terminal()
        if self.flag:
            raise Aborted(f"{name} received again while stopping after {self.signal_name}: "
                          "aborted; the run resumes from its last complete checkpoint")
        log.warning("%s received%s: saving a checkpoint and stopping (send it again to abort "
                    "without saving)", name,
                    " (the terminal closed)" if signum == signal.SIGHUP else "")
        self.flag, self.signal_name = True, name

    def reached(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        # One tiny all-gather per check keeps every process on the same stopping point.
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

    def interruptible(self, batches):
        """``batches`` (an iterable, or an iterator with get_state/set_state) that raises
        :class:`Preempted` before each batch once a signal arrived."""
        return _Interruptible(batches, self)

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _detach_from_terminal() -> None:
    """Point stdout / stderr at /dev/null where they are a terminal or a pipe (``| tee``),
    which die with the session: a write there would fail (EIO / EPIPE) before the save."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            if os.isatty(fd) or stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


class _Interruptible:
    def __init__(self, inner, preemption: Preemption):
        self.inner, self.preemption = inner, preemption

    def __iter__(self):
        if hasattr(self.inner, "__next__"):
            return self
        return self._gen()

    def _gen(self):
        for batch in self.inner:
            if self.preemption.reached():
                raise Preempted
            yield batch

    def __next__(self):
        if self.preemption.reached():
            raise Preempted
        return next(self.inner)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):  # get_state / set_state / ...
        return getattr(self.inner, name)
