"""Issue 12: nothing lost, nothing overwritten, nothing silently wrong.

One test (or more) per guarantee of docs/reliability.md: outputs that are never clobbered,
resume refusing a changed config, the workdir lock, preemption during an evaluation, the
filesystem layer on a non-local filesystem (TensorFlow's ``ram://``), corrupt or truncated
files, the multi-process checks, and one-line errors with documented exit codes. The
kill -9 fault-injection test lives in tests/test_fault_injection.py.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.py")


def _load(path=DEFAULT, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg_" + pathlib.Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()



def _tiny(data_dir, **top):
    c = _load()
    c.data.data_dir = data_dir
    c.model.embed_dim, c.model.depth, c.model.num_heads = 16, 2, 2
    c.model.reattn_blocks = (0, 1)
    c.batch_size = 32
    c.log_every_steps = 1
    c.data.shuffle_buffer = 64
    c.ema_decay = 0.0
    for k, v in top.items():
        node = c
        *path, last = k.split("__")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def _env():
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return env


# ---------------------------------------------------------------------------------------
# Exit codes and one-line errors
# ---------------------------------------------------------------------------------------


def test_cli_errors_map_to_documented_codes(capsys):
    from deepvit_jax import cli, errors

    cases = [(errors.ConfigError("config.x=1: must be 2\n  detail"), 2),
             (errors.WorkdirLockedError("w is in use"), 3),
             (errors.TrainingStopped("nan"), 1),
             (FileNotFoundError(2, "No such file", "/x/y"), 2),
             (PermissionError(13, "Permission denied", "/root/z"), 4)]
    for exc, code in cases:
        def body(exc=exc):
            raise exc
        assert cli.run_cli(body) == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "must be 2; detail" in errors.one_line(cases[0][0])
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run_cli(lambda: 1 / 0)


# ---------------------------------------------------------------------------------------
# Item 1 / 9: outputs are never clobbered
# ---------------------------------------------------------------------------------------


def test_convert_overwrite_replaces_only_model_directories(tmp_path, monkeypatch, capsys):
    from deepvit_jax.convert.__main__ import main

    src = tmp_path / "w.pth"
    src.write_bytes(b"anything")  # refused before it is read
    victim = tmp_path / "notes"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    assert main([str(src), "--out", str(victim), "--overwrite"]) == 2
    assert "not a deepvit-jax model directory" in capsys.readouterr().err
    assert (victim / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(victim)
    assert main([str(src), "--out", ".", "--overwrite"]) == 2
    assert (victim / "notes.txt").exists()
    assert main([str(src), "--to-pytorch", str(src), "--overwrite"]) == 2  # the source
    assert src.read_bytes() == b"anything"
    assert main([str(src), "--to-pytorch", str(victim), "--overwrite"]) == 2  # a directory
    assert (victim / "notes.txt").exists()


def test_save_model_overwrite_refuses_other_directories(tmp_path):
    from flax import nnx

    from deepvit_jax import create_model
    from deepvit_jax.model_dir import ModelFileError, is_model_dir, save_model

    model = create_model("deepvit_16b", num_classes=3, image_size=16, patch_size=8,
                         embed_dim=16, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="not a deepvit-jax model directory"):
        save_model(model, other, overwrite=True)
    assert (other / "data.bin").exists()
    save_model(model, tmp_path / "m")
    save_model(model, tmp_path / "m", overwrite=True)  # a model directory may be replaced
    assert is_model_dir(tmp_path / "m") and not is_model_dir(other)


def test_predict_output_and_batch_size_guards(tmp_path, capsys):
    from deepvit_jax import predict

    image = tmp_path / "cat.npy"
    np.save(image, np.zeros((1, 8, 8, 3), np.float32))
    before = image.read_bytes()
    args = ["--checkpoint", str(tmp_path / "never-read"), str(image)]
    assert predict.main([*args, "--output", str(image)]) == 2  # an input
    assert "would write into the input" in capsys.readouterr().err
    assert image.read_bytes() == before
    (tmp_path / "old.npy").write_bytes(b"precious")
    assert predict.main([*args, "--output", str(tmp_path / "old.npy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "old.npy").read_bytes() == b"precious"
    with pytest.raises(SystemExit) as e:
        predict.main([*args, "--batch-size", "0"])
    assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Item 7: the torch floor
# ---------------------------------------------------------------------------------------


def test_torch_floor(tmp_path, monkeypatch):
    import tomllib

    import torch

    from deepvit_jax.convert import torch_files as conv
    from deepvit_jax.errors import ConversionError

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["torch"]
    floor = next(d for d in deps if d.startswith("torch>="))
    assert tuple(int(x) for x in floor.split(">=")[1].split(".")[:2]) >= conv.MIN_TORCH >= (2, 6)
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(2)}, path)
    assert set(conv.load_torch_file(path)) == {"a"}
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ConversionError, match="CVE-2025-32434"):
        conv.load_torch_file(path)


class _Evil:
    """A pickle that would create a file when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused(tmp_path, capsys):
    import torch

    from deepvit_jax.convert.__main__ import main

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(str(marker))}, path)
    assert main([str(path), "--model", "deepvit_s", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "refused" in errors[0] and "system" in errors[0] and "state_dict" in errors[0]
    assert not marker.exists() and not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------
# Items 2, 3, 10: configs checked before anything runs
# ---------------------------------------------------------------------------------------


def test_required_init_from():
    from deepvit_jax.errors import ConfigError
    from deepvit_jax.train import config as config_lib

    c = _load(str(ROOT / "configs" / "i1k_ft384.py"), "deepvit_l_384")
    with pytest.raises(ConfigError, match=r"config\.init_from is required"):
        config_lib.validate(c)
    c.init_from = "/some/model"
    config_lib.validate(c)


def test_resume_config_changes_are_listed():
    from deepvit_jax.errors import ConfigError
    from deepvit_jax.workdir import check_resume_config, config_changes
    from deepvit_jax.train.config import RESUMABLE_FIELDS

    old = json.loads(_load().to_json_best_effort())
    new = json.loads(_load().to_json_best_effort())
    new["total_steps"], new["checkpoint"]["every_steps"], new["mesh"]["fsdp"] = 99, 7, 2
    refused, ok = config_changes(old, new, RESUMABLE_FIELDS)
    assert refused == [] and len(ok) == 3
    new["model"]["adjust_ratio"], new["seed"], new["data"]["dataset"] = 0.3, 7, "imagenet2012"
    with pytest.raises(ConfigError) as e:
        check_resume_config({"config": old}, new, RESUMABLE_FIELDS, "W/checkpoints", 4)
    msg = str(e.value)
    assert "config.model.adjust_ratio: None -> 0.3" in msg
    assert "config.seed: 0 -> 7" in msg and "config.data.dataset: 'digits' -> " in msg
    assert "total_steps" not in msg.split("Changeable")[0]


def test_bad_augmentation_and_init_from_are_config_errors(tmp_path, data_dir):
    from deepvit_jax.errors import ConfigError
    from deepvit_jax.train.loop import setup

    c = _tiny(data_dir)
    c.data.randaugment = "rand-m9-x5"
    with pytest.raises(ConfigError, match=r"config\.data\.randaugment='rand-m9-x5'"):
        setup(c, str(tmp_path / "a"))
    c = _tiny(data_dir)
    c.init_from = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"config\.init_from=.*no such model directory"):
        setup(c, str(tmp_path / "b"))
    run = tmp_path / "run"  # a training workdir given as init_from: the same path, and
    (run / "checkpoints" / "4" / "state").mkdir(parents=True)
    from deepvit_jax.model_dir import ModelFileError, read_config

    for path in (run, run / "checkpoints" / "4"):
        (path / "meta").mkdir(exist_ok=True)
        with pytest.raises(ModelFileError, match=r"training run / checkpoint.*\.export"):
            read_config(path)


# ---------------------------------------------------------------------------------------
# Item 6: the workdir lock
# ---------------------------------------------------------------------------------------


def test_workdir_lock(tmp_path):
    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.workdir_lock import WorkdirLock

    a, b = WorkdirLock(tmp_path), WorkdirLock(tmp_path)
    a.acquire()
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}.*delete .*lock"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
    assert not (tmp_path / "lock").exists()
    # Stale: a process of this host that is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started": 0}))
    c = WorkdirLock(tmp_path)
    c.acquire()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    c.release()
    # Another host: cannot be checked, refused.
    (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(WorkdirLockedError, match="host elsewhere"):
        WorkdirLock(tmp_path).acquire()


def test_second_run_on_a_workdir_exits_3(tmp_path, data_dir):
    from deepvit_jax.workdir_lock import WorkdirLock

    lock = WorkdirLock(tmp_path)  # this (live) process plays the first run
    lock.acquire()
    try:
        r = subprocess.run([sys.executable, "-m", "deepvit_jax.main", f"--config={DEFAULT}",
                            f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert r.returncode == 3, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "is in use by another run" in last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------
# Items 8, 14: metrics and TensorBoard on resume
# ---------------------------------------------------------------------------------------


def _tb_steps(tb_dir):
    import tensorflow as tf

    seen = []
    for f in sorted(tf.io.gfile.glob(os.path.join(str(tb_dir), "events.*"))):
        for e in tf.compat.v1.train.summary_iterator(f):
            for v in e.summary.value:
                seen.append((v.tag, e.step))
    return seen


def test_truncated_metrics_and_tensorboard_on_resume(tmp_path):
    from deepvit_jax.train.reporting import MetricWriter

    w = MetricWriter(tmp_path, resume_step=None)
    for s in range(1, 5):
        w.write(s, {"train/loss": float(s)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # kill -9 during an append
    w = MetricWriter(tmp_path, resume_step=2)  # the checkpoint was at step 2
    for s in (3, 4):
        w.write(s, {"train/loss": 10.0 + s})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1), (2, 2), (3, 13), (4, 14)]
    seen = _tb_steps(tmp_path / "tensorboard")
    assert sorted(seen) == [("train/loss", s) for s in (1, 2, 3, 4)]  # no step twice


# ---------------------------------------------------------------------------------------
# Item 5: every run path through one layer, on a non-local filesystem
# ---------------------------------------------------------------------------------------


def test_run_files_on_a_non_local_filesystem(ram_scheme, tmp_path, monkeypatch):
    import tensorflow as tf

    from deepvit_jax.errors import WorkdirLockedError
    from deepvit_jax.workdir import Checkpointer
    from deepvit_jax.workdir_lock import WorkdirLock
    from deepvit_jax.train.reporting import MetricWriter
    from deepvit_jax.utils import as_path, atomic_output

    monkeypatch.chdir(tmp_path)  # anything written locally would land here
    wd = ram_scheme
    assert os.fspath(as_path(wd)) == wd  # not turned into ./ram:/...
    lock = WorkdirLock(wd)
    lock.acquire()
    with pytest.raises(WorkdirLockedError):
        WorkdirLock(wd).acquire()
    w = MetricWriter(wd, resume_step=None)
    for s in (1, 2, 3):
        w.write(s, {"train/loss": float(s)})
    w.close()
    with tf.io.gfile.GFile(f"{wd}/metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tr')
    w = MetricWriter(wd, resume_step=2)
    w.write(3, {"train/loss": 30.0})
    w.close()
    with tf.io.gfile.GFile(f"{wd}/metrics.jsonl") as f:
        assert [json.loads(x)["step"] for x in f.read().splitlines()] == [1, 2, 3]
    assert sorted(_tb_steps(f"{wd}/tensorboard")) == [("train/loss", s) for s in (1, 2, 3)]
    # A directory written atomically (a model directory's layout), then replaced.
    for text in ("first", "second"):
        with atomic_output(f"{wd}/model") as tmp:
            as_path(tmp).mkdir(parents=True)
            (as_path(tmp) / "config.json").write_text(text)
            (as_path(tmp) / "state").mkdir()
            (as_path(tmp) / "state" / "a").write_text(text)
        assert (as_path(wd) / "model" / "state" / "a").read_text() == text
    with pytest.raises(RuntimeError), atomic_output(f"{wd}/model") as tmp:
        (as_path(tmp)).mkdir(parents=True)
        raise RuntimeError("crash while writing")
    assert (as_path(wd) / "model" / "config.json").read_text() == "second"
    assert not tf.io.gfile.glob(f"{wd}/model.deepvit-partial-*")
    # Orbax gets the URL itself (its arrays go through TensorStore's own gs:// driver).
    ckpt = Checkpointer(f"{wd}/checkpoints")
    assert os.fspath(ckpt.directory) == f"{wd}/checkpoints" and tf.io.gfile.isdir(
        f"{wd}/checkpoints")
    ckpt.close()
    lock.release()
    assert not tf.io.gfile.exists(f"{wd}/lock")
    assert os.listdir(tmp_path) == []  # nothing went to the local disk


# ---------------------------------------------------------------------------------------
# Item 4: folder datasets keyed by path, prepared again when they change
# ---------------------------------------------------------------------------------------


def _image_folder(root, n=2, color=0):
    from PIL import Image

    for split in ("train", "validation"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (color, 10 * i, 0)).save(d / f"{i}.png")


def test_folder_datasets_keyed_by_path_and_contents(tmp_path):
    from deepvit_jax.data.builders.folder import folder_builder, prepare_folder, prepared_dir
    from deepvit_jax.errors import DatasetNotPreparedError

    a, b, data = tmp_path / "a" / "pets", tmp_path / "b" / "pets", tmp_path / "tfds"
    _image_folder(a, n=1)
    _image_folder(b, n=2)
    assert prepared_dir(a, data) != prepared_dir(b, data)
    prepare_folder(a, data)
    with pytest.raises(DatasetNotPreparedError, match="is not prepared"):
        folder_builder(str(b), str(data))
    prepare_folder(b, data)
    assert folder_builder(str(a), str(data)).info.splits["train"].num_examples == 2
    assert folder_builder(str(b), str(data)).info.splits["train"].num_examples == 4
    _image_folder(a, n=3)  # images added
    with pytest.raises(DatasetNotPreparedError, match="changed since it was prepared"):
        folder_builder(str(a), str(data))
    prepare_folder(a, data)
    assert folder_builder(str(a), str(data)).info.splits["train"].num_examples == 6


# ---------------------------------------------------------------------------------------
# Item 12: a dataset whose every example fails
# ---------------------------------------------------------------------------------------


def test_all_examples_failing_raises_instead_of_spinning(data_dir, monkeypatch):
    import tensorflow as tf

    from deepvit_jax.data.config import digits_data_config
    from deepvit_jax.data.dataset import ImageSpec
    from deepvit_jax.data.train_stream import make_train_iterator
    from deepvit_jax.errors import InputError

    cfg = digits_data_config()
    cfg.data_dir = data_dir
    it = make_train_iterator(cfg, global_batch_size=16, spec=ImageSpec(size=8), sharding=None,
                             seed=0)

    def broken(encoded, seed):  # every image fails to decode
        return tf.cast(tf.io.decode_png(tf.constant(b"not a png")), tf.float32)

    it.host.augment = broken
    out = {}

    def pull():
        try:
            next(it)
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=pull, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the iterator spins forever"
    assert isinstance(out.get("error"), InputError)
    assert "images of epoch 0 after batch 0 failed to decode" in str(out["error"])
    assert "python -m deepvit_jax.data prepare" in str(out["error"])


def test_one_undecodable_image_is_named_instead_of_shifting_the_batches(data_dir):
    import tensorflow as tf

    from deepvit_jax.data.config import digits_data_config
    from deepvit_jax.data.dataset import ImageSpec, _seed_words
    from deepvit_jax.data.train_stream import make_train_iterator
    from deepvit_jax.errors import InputError

    cfg = digits_data_config()
    cfg.data_dir, cfg.prefetch_batches = data_dir, 1   # batch 1 is read after batch 0 returns
    kw = dict(global_batch_size=16, spec=ImageSpec(size=8), sharding=None, seed=0)
    good = make_train_iterator(cfg, **kw)
    it = make_train_iterator(cfg, **kw)
    augment = it.host.augment
    base = _seed_words(0, 0, 0, 3)[1] % 2**62   # the epoch's seed words (seed 0)

    def broken(encoded, seed):  # example 21 of the epoch (batch 1, row 5) fails to decode
        bad = tf.equal(seed[1] - base, 21)
        img = augment(encoded, seed)
        return tf.cond(bad, lambda: tf.cast(tf.io.decode_png(tf.constant(b"x")), tf.float32)
                       [:8, :8, :3] + img, lambda: img)

    it.host.augment = broken
    np.testing.assert_array_equal(next(it)["image"], next(good)["image"])  # batch 0 intact
    with pytest.raises(InputError, match=r"example 21 of epoch 0 .* failed to decode"):
        next(it)


# ---------------------------------------------------------------------------------------
# Item 13: multi-host checks
# ---------------------------------------------------------------------------------------


def test_lone_process_in_a_slurm_allocation_does_not_wait(monkeypatch):
    import jax

    from deepvit_jax import parallel
    from deepvit_jax.errors import ConfigError

    def never(**kw):
        raise AssertionError("would wait for SLURM tasks that never start")

    monkeypatch.setattr(jax.distributed, "initialize", never)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # sbatch --ntasks=4, python started without srun
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # under srun: initialise (or time out)
    with pytest.raises(ConfigError, match=r"start-up failed.*never start.*srun"):
        parallel.initialize_distributed()


@pytest.mark.slow
def test_two_processes_with_different_configs_refuse_to_start(tmp_path, data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "deepvit_jax.main", f"--config={DEFAULT}",
               f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}",
               f"--config.seed={42 + pid}", f"--coordinator-address=127.0.0.1:{port}",
               "--num-processes=2", f"--process-id={pid}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert "run different configs: config.seed differ" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "lock").exists()  # released on the way out


# ---------------------------------------------------------------------------------------
# Items 2, 11, 14: runs in-process (resume refusals, fall-back, NaN, preemption)
# ---------------------------------------------------------------------------------------


def _state_arrays(workdir, step):
    import jax
    import orbax.checkpoint as ocp

    from deepvit_jax.utils import path_str

    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",),
                                item_handlers={"state": ocp.StandardCheckpointHandler()})
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                          mgr.item_metadata(step)["state"])
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mgr.close()
    return {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(out["state"])[0]}


@pytest.mark.slow
def test_resume_refusals_and_fallback(tmp_path, data_dir, caplog):
    import shutil

    from deepvit_jax.errors import ConfigError
    from deepvit_jax.train.loop import setup, train_and_evaluate

    wd = str(tmp_path / "run")
    kw = dict(total_steps=4, eval__every_steps=1000, checkpoint__every_steps=2)
    train_and_evaluate(_tiny(data_dir, **kw), wd)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
    # Changed model fields are refused, all listed, before Orbax sees a shape.
    with pytest.raises(ConfigError) as e:
        setup(_tiny(data_dir, **kw, model__embed_dim=32, model__drop_path_rate=0.1), wd)
    assert "config.model.drop_path_rate: None -> 0.1" in str(e.value)
    assert "config.model.embed_dim: 16 -> 32" in str(e.value)
    # total_steps below the restored step: refused, naming the step.
    with pytest.raises(ConfigError, match=r"config\.total_steps=3 is below the step 4"):
        train_and_evaluate(_tiny(data_dir, **{**kw, "total_steps": 3}), wd)
    # An unreadable latest checkpoint: set aside, resumed from the one before.
    ref = _state_arrays(wd, 4)
    for f in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    caplog.clear()  # the refused runs above may have logged their restore of step 4
    with caplog.at_level("INFO"):
        train_and_evaluate(_tiny(data_dir, **kw), wd)  # resumes at 2, replays 3, 4 exactly
    assert "resumed from" in caplog.text and caplog.text.split("resumed from")[1].split()[
        0].endswith("/2")
    assert (tmp_path / "run" / "unreadable_checkpoints" / "4").is_dir()
    got = _state_arrays(wd, 4)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    shutil.rmtree(tmp_path / "run")


@pytest.mark.slow
def test_overflowing_parameters_are_never_saved(tmp_path, data_dir):
    from deepvit_jax.train.loop import train_and_evaluate
    from deepvit_jax.errors import NonFiniteLossError

    # lr 1e39 is inf in float32: step 1's loss is finite, its update makes inf weights.
    c = _tiny(data_dir, total_steps=3, eval__every_steps=1000, checkpoint__every_steps=1)
    c.optim.learning_rate = c.optim.warmup_lr = c.optim.min_lr = 1e39
    with pytest.raises(NonFiniteLossError, match="non-finite parameters after step 1"):
        train_and_evaluate(c, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_signal_during_evaluation_saves_and_resumes_the_evaluation(tmp_path, data_dir,
                                                                   monkeypatch):
    from deepvit_jax.data import eval_stream
    from deepvit_jax.errors import Aborted
    from deepvit_jax.workdir import Checkpointer
    from deepvit_jax.train.loop import train_and_evaluate

    kw = dict(total_steps=4, eval__every_steps=2, checkpoint__every_steps=1000,
              eval__batch_size=40)  # 9 eval batches
    real_iter = eval_stream.EvalIterable.__iter__
    signals = []  # per evaluation pass: the signals sent after its first batch

    def signalling_iter(self):
        for i, batch in enumerate(real_iter(self)):
            if i == 1 and signals:
                for sig in signals.pop(0):
                    os.kill(os.getpid(), sig)
            yield batch

    monkeypatch.setattr(eval_stream.EvalIterable, "__iter__", signalling_iter)
    wd = tmp_path / "run"
    signals[:] = [[signal.SIGTERM]]
    assert train_and_evaluate(_tiny(data_dir, **kw), str(wd)) == {}  # stopped mid-evaluation
    assert sorted(os.listdir(wd / "checkpoints")) == ["2"]  # saved at once, eval pending
    ckpt = Checkpointer(wd / "checkpoints")
    assert ckpt.restore_meta(2)["eval_pending"] is True
    ckpt.close()
    # SIGINT twice: the second one aborts at once (no further save).
    signals[:] = [[signal.SIGINT, signal.SIGINT]]
    before = signal.getsignal(signal.SIGINT)  # (a test worker may run with SIGINT ignored)
    with pytest.raises(Aborted):
        train_and_evaluate(_tiny(data_dir, **kw), str(wd))
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert not (wd / "lock").exists()
    got = train_and_evaluate(_tiny(data_dir, **kw), str(wd))
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/top1" in r] == [2, 4]  # the step-2 eval redone
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert rows[-1]["eval/top1"] == got["eval/top1"] and rows[-1]["eval/count"] == 360
    # (Exactness of the resumed parameters: tests/test_fault_injection.py.)
