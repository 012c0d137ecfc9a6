"""Installing on a Colab runtime (``deepvit_jax/colab_install.py``) and the notebooks' Colab
branches, against a simulated Colab.

The plan of pip commands is checked here in any environment. The end-to-end test runs in
``.ci/run``'s second venv, which holds an older "preinstalled" stack at our floors
(``.ci/floors.txt``: jax, flax, TensorFlow (the full ``tensorflow``, as on Colab), optax,
orbax, TFDS, PyTorch) and no deepvit-jax: ``train_tpu.ipynb`` runs with ``INSTALL=True``
against a copy of this checkout, with a stand-in ``google.colab`` (``tests/fake_colab``) on
the kernel's path, so the install, Drive mount, lock take-over and TensorBoard cells run.
Then the stack must be unchanged, ``pip check`` clean, and the installed wheel's console
command trains the default recipe by name from outside the checkout.
"""

import importlib.metadata as md
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deepvit_jax"))  # colab_install is standard library only
import colab_install  # noqa: E402

sys.path.pop(0)

STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow",
         "tensorflow-datasets", "numpy", "torch", "protobuf", "ml-dtypes")


def test_plan_keeps_a_preinstalled_tensorflow_and_adds_torch_only_when_missing(tmp_path):
    colab_like = {"jax": "0.8.1", "jaxlib": "0.8.1", "libtpu": "0.0.20", "tensorflow": "2.19.0",
                  "torch": "2.8.0", "numpy": "2.0.2", "flax": "0.10.4", "pandas": "2.2.2"}
    cons = str(tmp_path / "constraints.txt")
    cmds = colab_install.plan(ROOT, ["colab"], colab_like, torch=True, constraints=cons)
    assert len(cmds) == 1  # torch is there: no PyTorch install
    target = cmds[0][-1]
    assert cmds[0][:4] == ["install", "-U", "-c", cons] and target.endswith("[colab]")
    # The copy's requirement names the installed distribution, with our floor.
    deps = colab_install.requirements(pathlib.Path(target[:-len("[colab]")]), [])
    assert "tensorflow>=2.19" in deps and not any("tensorflow-cpu" in d for d in deps)
    assert colab_install.floor(deps, "jax") == "0.8.1"
    # Only the accelerator stack is frozen; flax and the rest may move to fit.
    assert colab_install.kept(colab_like) == {k: colab_like[k] for k in (
        "jax", "jaxlib", "libtpu", "numpy", "tensorflow", "torch")}

    bare = {"jax": "0.10.2", "jaxlib": "0.10.2"}
    cmds = colab_install.plan(ROOT, ["colab"], bare, torch=True, constraints=cons)
    assert cmds[0][-1] == f"{ROOT}[colab]"  # no TensorFlow: ours (tensorflow-cpu) as declared
    assert cmds[1] == ["install", colab_install.TORCH, "--index-url", colab_install.TORCH_INDEX]
    assert colab_install.TORCH.startswith("torch==")  # pinned, never a multi-GB CUDA build

    with pytest.raises(SystemExit, match=r"this runtime has jax 0\.6\.2, deepvit-jax needs "
                                         r"jax>=0\.8\.1; upgrade JAX .* restart the runtime"):
        colab_install.plan(ROOT, ["colab"], {"jax": "0.6.2"}, torch=False, constraints=cons)
    with pytest.raises(SystemExit, match="has no extra 'tpu9'"):
        colab_install.plan(ROOT, ["tpu9"], {}, torch=False, constraints=cons)


def _versions():
    out = {}
    for name in STACK:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _kill_tensorboards(info_dir: pathlib.Path):
    import signal

    for f in info_dir.glob("pid-*.info") if info_dir.is_dir() else ():
        pid = json.loads(f.read_text()).get("pid")
        if pid:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.skipif(os.environ.get("DEEPVIT_COLAB_STACK_TEST") != "1",
                    reason="runs in .ci/run's floors venv (DEEPVIT_COLAB_STACK_TEST=1): it "
                           "installs the package into that environment")
def test_train_notebook_installs_into_a_preinstalled_stack_on_simulated_colab(tmp_path,
                                                                             monkeypatch):
    import nbformat
    import papermill as pm

    before = _versions()
    assert {"jax", "flax", "tensorflow"} <= set(before)
    devices_cmd = [sys.executable, "-c", "import jax; print(jax.devices())"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    where = [sys.executable, "-c", "import deepvit_jax; print(deepvit_jax.__file__)"]
    # The venv starts without the package (run outside the checkout).
    assert subprocess.run(where, env=env, cwd=tmp_path, capture_output=True).returncode != 0
    devices = subprocess.run(devices_cmd, env=env, cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout

    # The "clone": a copy of this checkout without its build outputs.
    src = tmp_path / "deepvit-jax"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    drive = tmp_path / "drive"
    workdir = drive / "MyDrive" / "deepvit-jax" / "ci_run"
    workdir.mkdir(parents=True)
    (workdir / "lock").write_text(json.dumps({"host": "colab-vm-gone", "pid": 7, "started": 0}))
    tb_tmp = tmp_path / "tmp"
    tb_tmp.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "fake_colab"))  # not the checkout
    monkeypatch.setenv("DEEPVIT_DRIVE_MOUNT", str(drive))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("TMPDIR", str(tb_tmp))  # TensorBoard's info files (to stop it after)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    # The `tensorboard` executable on PATH, as on Colab (the %tensorboard magic runs it).
    monkeypatch.setenv("PATH", os.pathsep.join([str(pathlib.Path(sys.executable).parent),
                                                os.environ.get("PATH", "")]))
    tiny = {"model.embed_dim": 16, "model.depth": 2, "model.num_heads": 2,
            "model.reattn_blocks": [0, 1], "batch_size": 32, "log_every_steps": 1,
            "eval.bn_recalibration_batches": 0, "ema_decay": 0.0, "eval.batch_size": 120,
            "total_steps": 4, "eval.every_steps": 1000, "checkpoint.every_steps": 1000}
    out_nb = tmp_path / "executed.ipynb"
    try:
        pm.execute_notebook(
            str(ROOT / "colab" / "train_tpu.ipynb"), str(out_nb), kernel_name="python3",
            cwd=str(tmp_path), progress_bar=False, log_output=False, execution_timeout=900,
            parameters={"INSTALL": True, "SRC": str(src), "USE_DRIVE": True,
                        "TENSORBOARD": True, "DATASET": "digits", "OVERRIDES": tiny,
                        "WORKDIR": str(workdir),
                        "EXPORT_DIR": str(drive / "MyDrive" / "deepvit-jax" / "model")})
    finally:
        _kill_tensorboards(tb_tmp / ".tensorboard-info")
    nb = nbformat.read(out_nb, as_version=4)
    out = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "install: deepvit-jax 0.1.0 from" in out and "unchanged" in out
    assert f"Mounted at {drive}" in out
    assert "removed the lock of the runtime that trained here before (host colab-vm-gone" in out
    assert "config: configs/colab.py:cpu_small,digits" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    # The TensorBoard cell shows TensorBoard in Colab's output frame (its proxied port).
    scripts = [o["data"]["application/javascript"] for c in nb.cells
               for o in c.get("outputs", []) if "application/javascript" in o.get("data", {})]
    assert any("google.colab.kernel.proxyPort(" in js for js in scripts), scripts

    # The stack is as it was, pip is content, TensorFlow imports, JAX sees the same devices.
    assert _versions() == before
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout
    installed_at = subprocess.run(where, env=env, cwd=tmp_path, capture_output=True,
                                  text=True, check=True).stdout
    # a wheel: not the checkout's package (the venv itself may live inside the checkout)
    assert "site-packages" in installed_at
    assert not installed_at.strip().startswith(str(ROOT / "deepvit_jax"))
    assert not any(d.metadata["Name"] == "tensorflow-cpu" for d in md.distributions())
    subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, cwd=tmp_path,
                   check=True)
    assert subprocess.run(devices_cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout == devices

    # The wheel's console command runs the default recipe by name, outside the checkout.
    train = pathlib.Path(sys.executable).parent / "deepvit-train"
    run = subprocess.run(
        [str(train), "--config", "default", "--workdir", str(tmp_path / "default"),
         "--config.total_steps=3", "--config.eval.every_steps=3",
         "--config.checkpoint.every_steps=3", "--config.eval.bn_recalibration_batches=0"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "final: " in run.stdout
    assert sorted(os.listdir(tmp_path / "default" / "checkpoints")) == ["3"]
