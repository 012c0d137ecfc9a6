"""End-to-end training through `python -m deepvit_jax.main` (subprocesses) and the loop.

Runs use the default config (digits) shrunk through command-line overrides: a 2-block
16-d DeepViT, batch 32, a few dozen steps.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")

TINY = [
    "--config.model.embed_dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.reattn_blocks=(0,1)", "--config.batch_size=32", "--config.log_every_steps=1",
    "--config.eval.every_steps=1000", "--config.checkpoint.every_steps=1000",
    "--config.data.shuffle_buffer=256",
]



def _env(devices=1):
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cmd(workdir, data_dir, *extra, pause_at=None):
    """The training command; with ``pause_at`` the run pauses after that step (and its
    checkpoint) until SIGTERM or kill, through tests/pausing_main.py."""
    entry = (["-m", "deepvit_jax.main"] if pause_at is None
             else [str(ROOT / "tests" / "pausing_main.py")])
    return [sys.executable, *entry, f"--config={DEFAULT}",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *TINY, *extra]


def _run(workdir, data_dir, *extra, devices=1, timeout=240, env=None):
    return subprocess.run(_cmd(workdir, data_dir, *extra), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env or _env(devices))


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _final_state(workdir):
    """Arrays of the latest checkpoint's TrainState, as a flat {path: np.ndarray}."""
    import jax
    import orbax.checkpoint as ocp

    from deepvit_jax.utils import path_str

    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",),
                                item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mgr.latest_step()
    # Restore onto this process's first device whatever mesh wrote it.
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                          mgr.item_metadata(step)["state"])
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    flat = jax.tree_util.tree_flatten_with_path(restored["state"])[0]
    mgr.close()
    return step, {path_str(p): np.asarray(v) for p, v in flat}


# ---------------------------------------------------------------------------------------
# Bad configs fail before compute, naming the field
# ---------------------------------------------------------------------------------------


def _load_default():
    from ml_collections import config_flags  # noqa: F401  (same loader as the CLI)
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_cfg", DEFAULT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("field,value,match", [
    ("model_name", "deepvit_99b", r"config\.model_name='deepvit_99b'"),
    ("data.dataset", "no_such_dataset_xyz", r"config\.data\.dataset='no_such_dataset_xyz'"),
    ("mesh.data", 3, r"config\.mesh"),
    ("batch_size", 5000, r"config\.batch_size=5000"),
    ("model.image_size", 30, r"config\.model.*image_size"),
    ("eval.every_steps", 0, r"config\.eval\.every_steps=0"),
    ("ema_decay", 1.0, r"config\.ema_decay=1\.0"),
])
def test_bad_config_names_field(field, value, match, data_dir):
    from deepvit_jax.errors import ConfigError
    from deepvit_jax.train.loop import setup

    c = _load_default()
    c.data.data_dir = data_dir
    node = c
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(ConfigError, match=match):
        setup(c, "/nonexistent/never-created")


def test_locked_config_rejects_misspelled_field():
    c = _load_default()
    with pytest.raises(AttributeError):
        c.batch_sizee = 4
    with pytest.raises(AttributeError):
        c.model.dept = 4


@pytest.mark.slow
def test_cli_bad_configs(tmp_path, data_dir):
    # Batch size the 8-device mesh cannot split: exit 2, field named, nothing written.
    r = _run(tmp_path / "a", data_dir, "--config.batch_size=36", "--config.total_steps=2",
             devices=8)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "config.batch_size=36" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()
    # Misspelled override: rejected by the locked config at flag parsing.
    r = _run(tmp_path / "b", data_dir, "--config.batch_sise=32", timeout=60)
    assert r.returncode != 0 and "batch_sise" in r.stderr


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_config_shortened_converges(tmp_path, data_dir):
    """The default model and recipe, 120 steps instead of 550: clearly learns digits."""
    from deepvit_jax.train.loop import train_and_evaluate

    c = _load_default()
    c.data.data_dir = data_dir
    c.total_steps = 120
    c.log_every_steps = 40
    c.eval.every_steps = 120
    c.checkpoint.every_steps = 120
    metrics = train_and_evaluate(c, str(tmp_path))
    assert metrics["eval/count"] == 360  # the whole held-out split, once
    assert metrics["eval/top1"] >= 50.0, metrics  # chance: 10%
    rows = _metrics(tmp_path)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert os.path.isdir(tmp_path / "checkpoints" / "120")


@pytest.mark.slow
def test_one_vs_eight_devices_same_loss_curve(tmp_path, data_dir):
    steps = ["--config.total_steps=12"]
    r1 = _run(tmp_path / "d1", data_dir, *steps, devices=1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # ... with the blocks scanned on the 8 (data 4 x fsdp 2, the stacked parameters sharded)
    r8 = _run(tmp_path / "d8", data_dir, *steps, "--config.mesh.data=4",
              "--config.mesh.fsdp=2", "--config.model.scan_blocks=True", devices=8)
    assert r8.returncode == 0, r8.stderr[-3000:]
    l1 = [r["train/loss"] for r in _metrics(tmp_path / "d1") if "train/loss" in r]
    l8 = [r["train/loss"] for r in _metrics(tmp_path / "d8") if "train/loss" in r]
    assert len(l1) == len(l8) == 12
    np.testing.assert_allclose(l8, l1, rtol=2e-4, atol=1e-5)
    _, s1 = _final_state(tmp_path / "d1")
    _, s8 = _final_state(tmp_path / "d8")
    # Whole-parameter relative difference. (Element-wise checks are not meaningful: some
    # gradients are exactly zero in exact arithmetic - the key bias under softmax - and Adam
    # turns their reduction-order noise into lr-sized steps.)
    keys = [k for k in s1 if k.startswith("params/")]
    v1 = np.concatenate([s1[k].ravel() for k in keys])
    v8 = np.concatenate([s8[k].ravel() for k in keys])
    assert np.linalg.norm(v8 - v1) / np.linalg.norm(v1) < 5e-3  # measured: 1.9e-3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The 2-process run (SIGTERM to one process stops both, then a 2-process resume with one
# evaluation over every image): tests/test_multiprocess.py.


def _wait_for(path, proc, timeout=200):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path}: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timeout waiting for {path}")
        time.sleep(0.1)


@pytest.mark.slow
def test_exact_resume_after_sigterm_and_kill(tmp_path, data_dir):
    n = 6
    common = [f"--config.total_steps={2 * n}", "--config.model.drop_path_rate=0.1"]
    # 1. 2N steps in one go.
    r = _run(tmp_path / "once", data_dir, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    _, ref = _final_state(tmp_path / "once")

    # 2. SIGTERM at step N (no periodic checkpoint before): saves N, exits 0; restart.
    wd = tmp_path / "term"
    env = _env(1)
    env["PAUSE_AT_STEP"] = str(n)
    p = subprocess.Popen(_cmd(wd, data_dir, *common, pause_at=n), cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(wd / f"paused_at_{n}", p)
    assert not (wd / "checkpoints" / str(n)).exists()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert (wd / "checkpoints" / str(n)).is_dir()
    r = _run(wd, data_dir, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    step, got = _final_state(wd)
    assert step == 2 * n
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"SIGTERM resume: {k}")
    rows = _metrics(wd)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 2 * n + 1))

    # 3. kill -9 at step N right after its checkpoint, plus a half-written later checkpoint.
    wd = tmp_path / "kill"
    p = subprocess.Popen(_cmd(wd, data_dir, *common, f"--config.checkpoint.every_steps={n}",
                              pause_at=n),
                         cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    _wait_for(wd / f"paused_at_{n}", p)
    p.kill()
    p.wait()
    half = wd / "checkpoints" / f"{n + 3}.orbax-checkpoint-tmp-1234567890"
    half.mkdir()
    (half / "state").mkdir()
    (half / "state" / "garbage").write_text("half written")
    r = _run(wd, data_dir, *common, f"--config.checkpoint.every_steps={n}")
    assert r.returncode == 0, r.stderr[-3000:]
    step, got = _final_state(wd)
    assert step == 2 * n
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"kill -9 resume: {k}")


@pytest.mark.slow
def test_nan_loss_stops_naming_step(tmp_path, data_dir):
    r = _run(tmp_path, data_dir, "--config.total_steps=30", "--config.optim.learning_rate=1e30",
             "--config.optim.warmup_lr=1e30", "--config.checkpoint.every_steps=1")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "non-finite loss at step" in r.stderr
    bad = int(r.stderr.split("non-finite loss at step ")[1].split()[0])
    step, state = _final_state(tmp_path)
    assert step < bad
    assert all(np.all(np.isfinite(v)) for k, v in state.items() if k.startswith("params/"))


# ---------------------------------------------------------------------------------------
# init_from: start training from a saved (e.g. converted) model
# ---------------------------------------------------------------------------------------


def _tiny_config(data_dir):
    c = _load_default()
    c.data.data_dir = data_dir
    o = c.model
    o.embed_dim, o.depth, o.num_heads, o.reattn_blocks = 16, 2, 2, (0, 1)
    c.batch_size = 32
    return c


def test_init_from_starts_from_the_saved_weights(tmp_path, data_dir):
    """A model saved with deepvit_jax.model_dir.save_model is where training starts: with a
    zero learning rate, the first checkpoint holds exactly the saved parameters."""
    from flax import nnx

    from deepvit_jax.model_dir import model_arrays, save_model
    from deepvit_jax.models import DeepViT
    from deepvit_jax.train.loop import train_and_evaluate
    from deepvit_jax.train.program import model_config

    c = _tiny_config(data_dir)
    saved = DeepViT(model_config(c, 10), rngs=nnx.Rngs(123))  # not the run's seed
    save_model(saved, tmp_path / "pretrained")
    c.init_from = str(tmp_path / "pretrained")
    c.total_steps = 1
    c.optim.learning_rate = c.optim.warmup_lr = c.optim.min_lr = 0.0
    c.eval.every_steps = c.checkpoint.every_steps = 1
    train_and_evaluate(c, str(tmp_path / "run"))
    _, state = _final_state(tmp_path / "run")
    want = {"params/" + "/".join(map(str, p)) + "/value": v
            for p, v in model_arrays(saved).items()
            if "mean" not in p[-1:] and "var" not in p[-1:]}
    assert want and all(k in state for k in want), (sorted(set(want) - set(state))[:3],
                                                    sorted(state)[:8])
    for k, v in want.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_init_from_resizes_pos_embed_and_keeps_a_fresh_head(tmp_path):
    """Fine-tuning at another resolution and class count (the 384-px recipe): pos_embed is
    resampled on the token grid, the head is re-initialised, everything else is copied."""
    from flax import nnx

    from deepvit_jax import create_model
    from deepvit_jax.model_dir import save_model
    from deepvit_jax.models.deepvit import resample_pos_embed
    from deepvit_jax.train import state as state_lib

    kw = dict(image_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    src = create_model("deepvit_16b", num_classes=10, rngs=nnx.Rngs(1), **kw)
    save_model(src, tmp_path / "m")
    dst = create_model("deepvit_16b", num_classes=3, rngs=nnx.Rngs(2),
                       **{**kw, "image_size": 64})
    params, stats = nnx.state(dst, nnx.Param), nnx.state(dst, nnx.BatchStat)
    new_params, new_stats = state_lib.load_pretrained(params, stats, str(tmp_path / "m"))
    np.testing.assert_allclose(np.asarray(new_params["pos_embed"][...]),
                               resample_pos_embed(np.asarray(src.pos_embed[...]), 8), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_params["head"]["kernel"][...]),
                                  np.asarray(dst.head.kernel[...]))  # fresh: 3 classes
    np.testing.assert_array_equal(np.asarray(new_params["blocks"][1]["attn"]["reattn_weight"][...]),
                                  np.asarray(src.blocks[1].attn.reattn_weight[...]))
    np.testing.assert_array_equal(np.asarray(new_stats["blocks"][0]["attn"]["reattn_norm"]["var"][...]),
                                  np.asarray(src.blocks[0].attn.reattn_norm.var[...]))
