"""python -m deepvit_jax.evaluate: a training checkpoint reports what the training loop's
evaluation reported at that step (live and EMA, with BatchNorm re-estimation), in one
process and in two processes of two devices each; the collapse monitor's rows equal the
offline analysis; bad input."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.py"
STEPS = (4, 8)


def _load_default():
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_cfg", DEFAULT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny digits run: 8 steps, evaluated and checkpointed at 4 and 8 (EMA + BatchNorm
    re-estimation on 3 batches), collapse probe every 4 steps."""
    from deepvit_jax.train.loop import train_and_evaluate

    base = tmp_path_factory.mktemp("evaluate")
    c = _load_default()
    c.data.data_dir = str(base / "tfds")
    c.data.shuffle_buffer = 256
    o = c.model
    o.embed_dim, o.depth, o.num_heads, o.reattn_blocks = 16, 3, 2, (0, 1, 2)
    c.batch_size = 32
    c.total_steps = STEPS[-1]
    c.log_every_steps = 4
    c.eval.every_steps = c.checkpoint.every_steps = STEPS[0]
    c.eval.bn_recalibration_batches = 3
    c.collapse_every_steps = 4
    workdir = base / "run"
    train_and_evaluate(c, str(workdir))
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return workdir, rows


def _logged(rows, step, prefix):
    (row,) = [r for r in rows if r["step"] == step and f"{prefix}top1" in r]
    return {k: row[f"{prefix}{k}"] for k in ("top1", "top5", "loss")}


def test_reports_what_the_training_loop_reported(run):
    from deepvit_jax.evaluate import evaluate_checkpoint

    workdir, rows = run
    # the live weights of step 4 here; the EMA weights of step 8 in the two-process test
    got = evaluate_checkpoint(str(workdir), step=4)
    want = _logged(rows, 4, "eval/")
    assert got["count"] == got["split_size"] == 360
    assert got["bn_recalibrate"] == 3 and got["step"] == 4 and not got["ema"]
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"], (got, want)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    # the losses differ between steps and weights: the comparison is not vacuous
    assert _logged(rows, 4, "eval/")["loss"] != _logged(rows, 8, "eval/")["loss"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_two_processes_four_devices(run, tmp_path):
    """One checkpoint directory through the command line, sharded over 2 processes x 2 CPU
    devices (multi-host as on a pod): the same numbers; process 0 writes the JSON."""
    workdir, rows = run
    out = tmp_path / "e.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "deepvit_jax.evaluate", "--checkpoint",
         str(workdir / "checkpoints" / "8"), "--ema", "--output", str(out),
         f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2", f"--process-id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = json.loads(out.read_text())
    want = _logged(rows, 8, "eval/ema_")
    assert got["count"] == 360 and got["top1"] == want["top1"] and got["ema"]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert "top-1" in outs[0][0] and f"{want['top1']:.2f} %" in outs[0][0]
    assert "top-1" not in outs[1][0]  # one table, from process 0


def test_collapse_monitor_matches_offline_analysis(run):
    """The loop's collapse/* rows are Eq. 2 on the first 32 eval images at that step."""
    from deepvit_jax.analysis import analyse_checkpoint

    workdir, rows = run
    assert [r["step"] for r in rows if "collapse/mean_next" in r] == list(STEPS)
    for step in STEPS[1:]:
        (row,) = [r for r in rows if r["step"] == step and "collapse/mean_next" in r]
        r = analyse_checkpoint(str(workdir), step=step, num_images=32, k=1)
        got = [row[f"collapse/next/{p}"] for p in range(2)]
        np.testing.assert_allclose(got, r["to_next"], atol=1e-5)
        assert row["collapse/similar_blocks"] == r["similar_blocks"]


def _cli(argv, capsys):
    from deepvit_jax.evaluate import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_bad_input(run, tmp_path, capsys):
    from flax import nnx

    from deepvit_jax import create_model
    from deepvit_jax.model_dir import save_model

    workdir, _ = run
    code, err = _cli(["--checkpoint", str(workdir), "--step", "5"], capsys)
    assert code == 2 and "no checkpoint of step 5" in err and "4, 8" in err
    assert "Traceback" not in err
    # a checkpoint without its meta item (config)
    bad = tmp_path / "w" / "checkpoints" / "4"
    shutil.copytree(workdir / "checkpoints" / "4", bad)
    shutil.rmtree(bad / "meta")
    code, err = _cli(["--checkpoint", str(bad)], capsys)
    assert code == 2 and f"{bad}/meta: missing" in err
    # a model with 3 classes against the 10-class digits: refused before any compute
    m = create_model("deepvit_16b", num_classes=3, rngs=nnx.Rngs(0), image_size=32,
                     patch_size=8, embed_dim=16, depth=1, num_heads=2)
    save_model(m, tmp_path / "m3")
    code, err = _cli(["--checkpoint", str(tmp_path / "m3"), "--dataset", "digits",
                      "--data-dir", str(workdir.parent / "tfds")], capsys)
    assert code == 2 and "has 10 classes" in err and "has 3" in err
    code, err = _cli(["--checkpoint", str(tmp_path / "m3")], capsys)
    assert code == 2 and "pass --dataset" in err
    code, err = _cli(["--checkpoint", str(tmp_path / "m3"), "--ema", "--dataset", "digits"],
                     capsys)
    assert code == 2 and "drop --ema" in err
    # never write into an input
    code, err = _cli(["--checkpoint", str(tmp_path / "m3"), "--output",
                      str(tmp_path / "m3" / "x.json"), "--dataset", "digits"], capsys)
    assert code == 2 and "would write into the input" in err
    assert sorted(os.listdir(tmp_path / "m3")) == ["config.json", "state"]
    code, err = _cli(["--checkpoint", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no such directory" in err
