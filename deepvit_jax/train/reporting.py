"""What the loop reports and reacts to: metrics (metrics.jsonl + TensorBoard), the per-step
meter (img/s, data-wait time, the NaN check) and preemption signals.

TensorBoard goes through ``clu.metric_writers`` (the writer of the Flax examples and scenic):
it writes TensorFlow event files with ``tf.summary`` (the ``tensorboard`` package provides
the scalar summaries), to a local directory or ``gs://``, and logs every row too.
``metrics.jsonl`` is our own: one JSON object per log / eval row, cut back to the restored
step on resume, so it always describes one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message names the step."""


class MetricWriter:
    """``DIR/metrics.jsonl`` + TensorBoard events in ``DIR/tensorboard`` (process 0 only)."""

    def __init__(self, workdir: str, *, resume_step: int | None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            # Keep the history up to the restored step; later lines belong to lost work.
            keep_to = resume_step if resume_step is not None else -1
            with open(self.path) as f:
                rows = [ln for ln in f if ln.strip()]
            kept = [ln for ln in rows if json.loads(ln).get("step", 0) <= keep_to]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        from clu import metric_writers

        self.tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tb.write_scalars(int(step), metrics)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite(m) -> bool:
    return all(np.isfinite(float(m[k])) for k in ("train/loss", "train/grad_norm"))


class StepMeter:
    """The training steps since the last log row: their metrics (device arrays until read),
    img/s and the time spent waiting for input. :meth:`check` is the NaN check."""

    WARN_WAIT_FRACTION = 0.25  # of the wall time: the input pipeline is the bottleneck

    def __init__(self, batch_size: int, steps_per_epoch: int):
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.window: list[tuple[int, Any]] = []
        self.checked = 0  # how many of the window's steps are known finite
        self.wait = 0.0
        self.t0 = time.perf_counter()
        self._last_warning = -np.inf

    def add(self, step: int, metrics, wait_s: float) -> None:
        self.window.append((step, metrics))
        self.wait += wait_s
        # The previous step is done by now (its successor was dispatched): checking it costs
        # no stall and stops a diverged run one step late.
        if len(self.window) >= 2:
            self._check(self.window[-2:-1])

    def check(self) -> None:
        """Raise NonFiniteLossError naming the first step whose loss or grad norm is NaN/inf."""
        self._check(self.window[self.checked:])
        self.checked = len(self.window)

    @staticmethod
    def _check(window) -> None:
        for (step, _), m in zip(window, jax.device_get([m for _, m in window]), strict=True):
            if not _finite(m):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (loss={float(m['train/loss'])}, "
                    f"grad_norm={float(m['train/grad_norm'])})")

    def pause(self) -> None:
        """Restart the clock (evaluation time does not count against img/s)."""
        self.t0 = time.perf_counter()

    def summary(self, step: int) -> dict[str, float]:
        """The window's mean metrics, lr, img/s, data wait and epoch; starts a new window."""
        self.check()
        host = jax.device_get([m for _, m in self.window])
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        n = len(host)
        row = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        row["train/lr"] = float(host[-1]["train/lr"])
        row["img_per_sec"] = n * self.batch_size / elapsed
        row["data_wait_ms"] = 1e3 * self.wait / max(n, 1)
        row["data_wait_fraction"] = self.wait / elapsed
        row["epoch"] = step / self.steps_per_epoch
        if (row["data_wait_fraction"] > self.WARN_WAIT_FRACTION
                and time.monotonic() - self._last_warning > 600):
            self._last_warning = time.monotonic()
            log.warning("input-bound: %.0f%% of the last %d steps waited for data (%.1f ms/step)"
                        "; raise data.num_parallel_calls, use data.cache for small datasets, or "
                        "add host cores", 100 * row["data_wait_fraction"], n,
                        row["data_wait_ms"])
        self.window, self.checked, self.wait = [], 0, 0.0
        self.t0 = time.perf_counter()
        return row


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits at the next step. With
    several processes the flag is OR-ed across them so that all stop at the same step."""

    def __init__(self):
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.flag = True

    def reached(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        # One tiny all-gather per step keeps every process on the same stopping step.
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._old)
