"""Issue 12's fault-injection test: one short run is killed with SIGKILL several times in a
row - during a checkpoint save, during a metrics append, during an evaluation, and at a
random moment - and then completes. Its final state (parameters, optimizer, EMA, BatchNorm
statistics, step) equals that of an uninterrupted run, bit for bit, and its metrics file
holds each step once.

The kill points are set by tests/killing_main.py (a wrapper, nothing in the product); the
random kill hits the real CLI. The runs share the tests' persistent compilation cache
(tests/conftest.py) so that only the first one compiles.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_main import _final_state  # the latest checkpoint as {path: array}

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")
TOTAL = 8
ARGS = ["--config.model.embed_dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.model.reattn_blocks=(0,1)", "--config.batch_size=32",
        "--config.log_every_steps=1", "--config.eval.every_steps=4",
        "--config.eval.batch_size=40", "--config.checkpoint.every_steps=2",
        "--config.data.shuffle_buffer=64", "--config.model.drop_path_rate=0.1",
        f"--config.total_steps={TOTAL}"]



def _env(kill_at=None):
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("KILL_AT", None)
    if kill_at:
        env["KILL_AT"] = kill_at
    return env


def _cmd(workdir, data_dir, killing=False):
    entry = [str(ROOT / "tests" / "killing_main.py")] if killing else ["-m", "deepvit_jax.main"]
    return [sys.executable, *entry, f"--config={DEFAULT}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *ARGS]


def _rows(workdir):
    text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_sigkill_at_any_point_then_exact_completion(tmp_path, data_dir):
    ref = subprocess.run(_cmd(tmp_path / "ref", data_dir), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    wd = tmp_path / "run"
    # 1-3: killed during a save, a metrics append and an evaluation.
    for kill_at in ("save:2", "metrics:3", "eval"):
        r = subprocess.run(_cmd(wd, data_dir, killing=True), cwd=ROOT,
                           env=_env(kill_at), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == -signal.SIGKILL, (kill_at, r.returncode, r.stderr[-3000:])
        assert (wd / "lock").exists()  # left behind: stale, taken over by the next run
        if kill_at == "metrics:3":
            with pytest.raises(ValueError):  # a cut line, dropped by the next run
                json.loads((wd / "metrics.jsonl").read_text().splitlines()[-1])
    # 4: killed at a random moment while it trains.
    rng = random.Random(1234)
    for _ in range(1):
        p = subprocess.Popen(_cmd(wd, data_dir), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = (wd / "metrics.jsonl").stat().st_mtime
        t0 = time.time()
        while p.poll() is None and (wd / "metrics.jsonl").stat().st_mtime == start \
                and time.time() - t0 < 240:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        p.kill()
        p.communicate(timeout=60)
    # 5: the same command completes.
    r = subprocess.run(_cmd(wd, data_dir), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    step, got = _final_state(wd)
    ref_step, want = _final_state(tmp_path / "ref")
    assert step == ref_step == TOTAL and set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    rows = _rows(wd)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, TOTAL + 1))
    assert [r["step"] for r in rows if "eval/top1" in r] == [4, 8]
    ref_rows = {(r["step"], k): v for r in _rows(tmp_path / "ref") for k, v in r.items()
                if k.startswith(("train/loss", "eval/top1"))}
    for r in rows:
        for k, v in r.items():
            if (r["step"], k) in ref_rows:
                assert v == ref_rows[(r["step"], k)], (r["step"], k)
    assert not (wd / "lock").exists()
