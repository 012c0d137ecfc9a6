"""Multi-process training must compute what one process computes. A 2-process run equals a
1-process run only if the global batches are the same images in the same order whatever
the process count; this is checked here in-process (no subprocess: the iterators take
``process_index`` / ``process_count``). Below, two real processes: SIGTERM to one stops
both after the same step, then two processes resume to the end, and their loss curve is
that of one process.
tests/test_main.py::test_one_vs_eight_devices_same_loss_curve compares device counts
within one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_main import DEFAULT, ROOT, TINY, _env, _final_state, _free_port, _metrics, _run

from deepvit_jax.data.config import digits_data_config
from deepvit_jax.data.dataset import ImageSpec, dataset_info
from deepvit_jax.data.train_stream import make_train_iterator


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
    cfg = digits_data_config()
    cfg.data_dir = str(tmp_path / "tfds")
    info = dataset_info(cfg)

    def stream(pi, pc):
        return make_train_iterator(cfg, global_batch_size=32, spec=ImageSpec(16),
                                   sharding=None, seed=0, dataset=info, process_index=pi,
                                   process_count=pc)

    one = stream(0, 1)
    two = [stream(i, 2) for i in range(2)]
    for _ in range(3):
        b = next(one)
        halves = [next(s) for s in two]
        np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), b["label"])
        np.testing.assert_allclose(np.concatenate([h["image"] for h in halves]), b["image"],
                                   atol=1e-6)
    # the state does not depend on the process count either: 1 process resumes where 2 left
    state = two[0].get_state()
    assert state == two[1].get_state()
    resumed = stream(0, 1)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["label"], next(one)["label"])


def test_per_process_order_refuses_another_process_count(tmp_path):
    cfg = digits_data_config()
    cfg.data_dir, cfg.global_order = str(tmp_path / "tfds"), False
    info = dataset_info(cfg)
    kw = dict(global_batch_size=32, spec=ImageSpec(16), sharding=None, seed=0, dataset=info)
    two = make_train_iterator(cfg, process_index=0, process_count=2, **kw)
    next(two)
    one = make_train_iterator(cfg, process_index=0, process_count=1, **kw)
    with pytest.raises(ValueError, match="process_count=2, this run has 1"):
        one.set_state(two.get_state())


# ---------------------------------------------------------------------------------------
# Two real processes (moved here from tests/test_main.py::test_two_process_run)
# ---------------------------------------------------------------------------------------



def _launch(workdir, data_dir, entry, env_extra=None):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**_env(1), **(env_extra or {})}
        cmd = [sys.executable, *entry, f"--config={DEFAULT}", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", *TINY, "--config.total_steps=6",
               "--config.eval.every_steps=6", "--config.eval.batch_size=64",
               f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2",
               f"--process-id={pid}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out + err for out, err in outs]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_then_two_process_resume(tmp_path, data_dir):
    n = 3
    procs = _launch(tmp_path, data_dir, [str(ROOT / "tests" / "pausing_multiprocess_main.py")],
                    {"PAUSE_AT_STEP": str(n)})
    t0 = time.time()
    while not all((tmp_path / f"paused_{i}").exists() for i in range(2)):
        if any(p.poll() is not None for p in procs) or time.time() - t0 > 240:
            for p in procs:
                p.kill()
            raise AssertionError("a process ended or hung before step "
                                 f"{n}: {[p.stderr.read()[-2000:] for p in procs]}")
        time.sleep(0.1)
    assert not (tmp_path / "checkpoints" / str(n)).exists()  # no periodic checkpoint yet
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    time.sleep(0.5)
    (tmp_path / "go").touch()
    errs = _finish(procs, timeout=240)
    assert f"saved step {n}" in errs[0], errs[0][-2000:]
    step, state = _final_state(tmp_path)
    assert step == n and int(state["step"]) == n  # both stopped after the same step
    assert [r["step"] for r in _metrics(tmp_path) if "train/loss" in r] == list(range(1, n + 1))

    # Two processes resume to the end: one metrics row per step (process 0 writes), one
    # evaluation over every image once (both halves of the split)
    os.remove(tmp_path / "go")
    _finish(_launch(tmp_path, data_dir, ["-m", "deepvit_jax.main"]))
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    evals = [r for r in rows if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["eval/count"] == 360
    step, state = _final_state(tmp_path)
    assert step == 6 and int(state["step"]) == 6

    # ... and the 2-process loss curve (stopped and resumed) is the 1-process one
    one = tmp_path / "one_process"
    r = _run(one, data_dir, "--config.total_steps=6", "--config.eval.every_steps=6",
             "--config.eval.batch_size=64", devices=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = {r["step"]: r["train/loss"] for r in _metrics(one) if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(got) == sorted(want) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-4)
    assert evals[0]["eval/top1"] == next(r for r in _metrics(one) if "eval/top1" in r)["eval/top1"]
