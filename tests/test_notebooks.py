"""The Colab notebooks (``colab/*.ipynb``), executed end to end on CPU, offline, at tiny size.

Each notebook runs under papermill with its ``parameters`` cell overridden: no install cell,
no Drive, no TensorBoard, the embedded digits instead of a download, tiny models. Any cell
that raises fails the test. The tests then check what the notebook produced against an
independent reference (the training run's own files, the PyTorch reference model).
Also here: the notebooks are committed stripped and hold no code of their own, the Colab
config family (``configs/colab.py``) and the helpers of ``deepvit_jax/colab/``.
"""

import importlib.util
import json
import os
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "train_tpu.ipynb", "attention_collapse.ipynb")

# The training overrides of tests/test_main.py's TINY run, as config fields, without EMA and
# BatchNorm re-estimation (fewer programs to compile: CPU time is the budget here).
TINY = {"model.embed_dim": 16, "model.depth": 2, "model.num_heads": 2,
        "model.reattn_blocks": [0, 1], "batch_size": 32, "log_every_steps": 1,
        "data.shuffle_buffer": 256, "eval.bn_recalibration_batches": 0, "ema_decay": 0.0,
        "eval.batch_size": 120}
# Everything a test run switches off: installs, Drive, TensorBoard.
OFFLINE = {"INSTALL": False, "USE_DRIVE": False}



@pytest.fixture
def kernel_env(monkeypatch, data_dir):
    """The notebook kernel's environment: CPU, one device, the prepared TFDS dir."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return data_dir


def execute(name: str, cwd: pathlib.Path, **parameters) -> nbformat.NotebookNode:
    """Run ``colab/NAME`` with papermill in ``cwd``; returns the executed notebook."""
    import papermill as pm

    out = cwd / f"executed_{name}"
    pm.execute_notebook(str(COLAB / name), str(out), parameters={**OFFLINE, **parameters},
                        kernel_name="python3", cwd=str(cwd), progress_bar=False,
                        log_output=False, execution_timeout=600)
    return nbformat.read(out, as_version=4)


def text_output(nb: nbformat.NotebookNode) -> str:
    """Everything the cells printed (stdout, stderr, plain-text results)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out and "text/plain" in out.data:
                parts.append(out.data["text/plain"])
    return "\n".join(parts)


def images_shown(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               for out in cell.get("outputs", []))


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------
# The committed files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped_parameterised_and_calls_the_package(name):
    nb = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "one parameters cell, the first code cell"
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"outputs left in {name}"
        # No logic of its own: no functions, classes or loops (they belong in the package).
        assert not re.search(r"^\s*(def|class|for|while|async)\b|\blambda\b", c.source, re.M), (
            f"{name}: code that belongs in the package:\n{c.source}")
        # Installing only behind the INSTALL parameter (the tests skip it).
        if re.search(r"pip install|git clone", c.source):
            assert c.source.lstrip().startswith("if INSTALL:"), c.source
    params = tagged[0].source
    for p in ("INSTALL", "REPO"):
        assert re.search(rf"^{p} = ", params, re.M), f"{name}: no {p} parameter"
    # The install cell clones the repository the README's badges name.
    readme = (ROOT / "README.md").read_text()
    repo = re.search(r'^REPO = "([^"]+)"', params, re.M).group(1)
    assert f"`{repo}`" in readme and f"github/{repo}/blob/main/colab/{name}" in readme


# --------------------------------------------------------------------------------------
# configs/colab.py
# --------------------------------------------------------------------------------------


def _colab_configs():
    spec = importlib.util.spec_from_file_location("cfg_colab", ROOT / "configs" / "colab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_colab_configs_fit_their_runtime():
    mod = _colab_configs()
    from deepvit_jax.train import config as config_lib
    from deepvit_jax.train.program import model_config

    for runtime in mod.RUNTIMES:
        for dataset, ds in mod.DATASETS.items():
            c = mod.get_config(f"{runtime},{dataset}")
            config_lib.validate(c)
            mcfg = model_config(c, 10)
            assert mcfg.image_size % mcfg.patch_size == 0
            assert c.batch_size <= ds["num_train"]
            # a checkpoint every epoch: a disconnected runtime loses at most one
            assert c.checkpoint.every_steps == ds["num_train"] // c.batch_size
            if runtime == "tpu_v2_8":
                assert c.batch_size % 8 == 0  # 8 TPU cores
            if runtime.startswith("tpu"):
                assert mcfg.dtype == "bfloat16"
    # the default dataset is imagenette; the digits recipe is configs/default.py's model
    assert mod.get_config("gpu").data.dataset == "imagenette/160px-v2"
    d = mod.get_config("cpu_small,digits")
    assert (d.model.depth, d.model.embed_dim, d.data.randaugment) == (4, 64, "")
    with pytest.raises(ValueError, match=r"configs/colab\.py:tpu_v9.*unknown runtime"):
        mod.get_config("tpu_v9")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        mod.get_config("gpu,mnist")


# --------------------------------------------------------------------------------------
# deepvit_jax/colab/: the one-line explanations
# --------------------------------------------------------------------------------------


def test_colab_helpers_explain_what_is_missing(tmp_path, monkeypatch, capsys):
    from deepvit_jax import colab

    rt = colab.detect_runtime()  # the tests run on CPU
    assert rt.platform == "cpu" and rt.config_arg == "cpu_small"
    monkeypatch.chdir(tmp_path)
    path = colab.resolve_workdir("/content/drive/MyDrive/deepvit-jax/some_run")
    assert path == str(tmp_path / "runs" / "some_run") and os.path.isdir(path)
    assert colab.find_weights("/content/drive/MyDrive/w.pth.tar") is None
    assert colab.find_weights(str(tmp_path / "missing.pth")) is None
    assert colab.download_weights("") is None
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("runtime: no accelerator, running on CPU at small size")
    assert "Google Drive is not mounted" in out[1] and "mount_drive" in out[1]
    assert out[2].endswith("(new run)")
    assert "not mounted" in out[3] and "dvit_repo" in out[3]
    assert "no file at" in out[4] and "upload" in out[4]
    assert "README of https://github.com/zhoudaquan/dvit_repo" in out[5]
    assert len(out) == 6  # one line each

    # The recipe of each runtime Colab offers; a TPU the installed JAX cannot use is named.
    assert colab.config_arg("tpu", "TPU v5 lite", 1) == "tpu_v5e1"
    assert colab.config_arg("tpu", "TPU v2", 8) == "tpu_v2_8"
    assert colab.config_arg("gpu", "Tesla T4", 1) == "gpu"
    monkeypatch.setattr(colab.runtime.glob, "glob", lambda pattern: ["/dev/accel0"])
    colab.detect_runtime()
    line = capsys.readouterr().out
    assert "has a TPU that JAX does not see: install JAX for it (pip install -U 'jax[tpu]')" \
        in line
    assert line.count("\n") == 1

    # The lock of a runtime that disconnected (another host) is taken over, saying so; the
    # lock of a run on this host is the training loop's to judge.
    run = tmp_path / "run"
    run.mkdir()
    (run / "lock").write_text(json.dumps({"host": "colab-vm-gone", "pid": 7, "started": 0}))
    colab.resolve_workdir(str(run), take_over_lock=True)
    assert not (run / "lock").exists()
    assert "removed the lock of the runtime that trained here before (host colab-vm-gone" in (
        capsys.readouterr().out)
    import socket

    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0})
    (run / "lock").write_text(mine)
    colab.resolve_workdir(str(run), take_over_lock=True)
    assert (run / "lock").read_text() == mine
    # An official release file converts to its own model whatever MODEL says (a tiny
    # DeepViT-L-shaped file under the release's name).
    import torch

    from deepvit_jax.reference import official as R

    torch.manual_seed(0)
    ref = R.create("deepvit_L", img_size=32, depth=2, reattn=range(1, 2), num_classes=10)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "DViT_83_32b.pth.tar")
    model = colab.load_weights(str(tmp_path / "DViT_83_32b.pth.tar"), "deepvit_s",
                               image_size=32, depth=2, reattn_blocks=(1,), num_classes=10)
    assert (model.config.name, model.config.embed_dim) == ("deepvit_l", 420)
    assert "DViT_83_32b.pth.tar is the official deepvit_l: converting to deepvit_l, not " \
        "deepvit_s" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"has no field 'model\.dept'"):
        colab.load_config("colab.py:cpu_small,digits", {"model.dept": 2})


# --------------------------------------------------------------------------------------
# The notebooks, executed
# --------------------------------------------------------------------------------------


def test_train_tpu_notebook(tmp_path, kernel_env):
    """Digits, a tiny model, 6 steps: the real loop writes its checkpoint and metrics into
    the workdir the notebook chose (Drive is not mounted: a local folder, said so)."""
    steps = 6
    nb = execute("train_tpu.ipynb", tmp_path, DATASET="digits", RUNTIME="auto",
                 TENSORBOARD=False, WORKDIR="/content/drive/MyDrive/deepvit-jax/ci_run",
                 EXPORT_DIR=str(tmp_path / "model"),
                 OVERRIDES={**TINY, "total_steps": steps, "eval.every_steps": 1000,
                            "checkpoint.every_steps": 1000})
    out = text_output(nb)
    assert "runtime: no accelerator, running on CPU at small size" in out
    workdir = tmp_path / "runs" / "ci_run"
    assert f"Google Drive is not mounted, so using {workdir}" in out
    assert "config: configs/colab.py:cpu_small,digits" in out
    rows = _metrics(workdir)
    evals = [r for r in rows if "eval/top1" in r]
    assert [r["step"] for r in evals] == [steps]
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(steps)]
    # The notebook shows the loop's evaluation, and evaluating the checkpoint afterwards
    # reports the same numbers over the whole split.
    top1 = evals[0]["eval/top1"]
    assert f"step {steps}: eval top-1 {top1:.2f}%" in out
    table = dict(re.findall(r"^(top-1|top-5|count) +(\S+)", out, re.M))
    assert table == {"top-1": f"{top1:.2f}", "top-5": f"{evals[0]['eval/top5']:.2f}",
                     "count": "360"}
    # Running the notebook again resumes: the workdir holds the run's checkpoint, unlocked.
    from deepvit_jax import colab

    assert colab.latest_checkpoint(str(workdir)) == steps
    assert not (workdir / "lock").exists()
    # The exported model directory loads.
    model_dir = tmp_path / "model"
    assert f"exported deepvit_16b (10 classes) to {model_dir}" in out
    from deepvit_jax.model_dir import read_config

    assert (read_config(model_dir).depth, read_config(model_dir).embed_dim) == (2, 16)


_TOP_K_LINE = re.compile(r"^\s+(\d)\.\s+([\d.]+)%  (.+)  \[(\d+)\]$", re.M)


def test_quickstart_notebook(tmp_path, kernel_env):
    """A tiny checkpoint in the official release's format (the PyTorch reference model, a
    2-block DeepViT-S at 32 px with 1000 classes) goes through the notebook's weights cell;
    its top-5 on the sample image equals the PyTorch model's, and the maps are drawn."""
    import torch

    from deepvit_jax.models import get_config
    from deepvit_jax.predict import class_names, load_inputs, top_k
    from deepvit_jax.reference import official as R

    torch.manual_seed(0)
    ref = R.randomize_(R.create("deepvit_S", img_size=32, depth=2, reattn=range(1, 2)), seed=0)
    ref.eval()
    weights = tmp_path / "DViT_tiny.pth.tar"
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, weights)
    overrides = {"image_size": 32, "depth": 2, "reattn_blocks": [1]}
    nb = execute("quickstart.ipynb", tmp_path, MODEL="deepvit_s", MODEL_OVERRIDES=overrides,
                 WEIGHTS=str(weights), BLOCKS=[0, 1])
    out = text_output(nb)
    assert "runtime: no accelerator" in out
    assert f"weights: converted {weights} -> deepvit_s" in out

    # The PyTorch model on the image the notebook classified, preprocessed the same way.
    cfg = get_config("deepvit_s", image_size=32, depth=2, reattn_blocks=(1,))
    x, _ = load_inputs([str(tmp_path / "cat.png")], cfg)
    with torch.no_grad():
        logits = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    want_idx, want_p = top_k(logits, 5)
    got = _TOP_K_LINE.findall(out)
    assert [int(g[3]) for g in got] == want_idx[0].tolist()
    names = class_names(1000)
    assert [g[2] for g in got] == [names[i] for i in want_idx[0]]
    assert [float(g[1]) for g in got] == pytest.approx((want_p[0] * 100).tolist(), abs=0.006)
    assert images_shown(nb) == 1  # the attention maps


def _eq2_to_next(maps):
    """The paper's Eq. 2 for consecutive blocks, in NumPy: M^{p,p+1} = the cosine over the
    query axis between column t of block p's map and of block p+1's, averaged over images,
    heads and tokens t."""
    import numpy as np

    cols = [m / np.linalg.norm(m, axis=2, keepdims=True) for m in map(np.float64, maps)]
    return [float((cols[p] * cols[p + 1]).sum(axis=2).mean()) for p in range(len(maps) - 1)]


def test_attention_collapse_notebook(tmp_path, kernel_env):
    """Two tiny runs of configs/collapse.py (3 blocks, 3 steps each), analysed and drawn; the
    printed similarity to the next block equals Eq. 2 computed here from the run's maps."""
    import numpy as np

    tiny = {**TINY, "model.depth": 3, "model.image_size": 32, "total_steps": 3,
            "eval.every_steps": 1000, "checkpoint.every_steps": 1000}
    del tiny["model.reattn_blocks"]  # the variant decides: all blocks (deepvit) or none (vit)
    sweep = {"depths": [2], "seeds": [0, 1], "widths": [], "width": 8, "num_heads": 2,
             "steps": 2, "batch_size": 16, "image_size": 8, "patch_size": 4, "num_images": 8}
    nb = execute("attention_collapse.ipynb", tmp_path, OVERRIDES=tiny,
                 WORKDIR=str(tmp_path / "collapse"), NUM_IMAGES=16, BLOCKS=[0, 2],
                 SWEEP_SETTINGS=sweep)
    out = text_output(nb)
    # The sweep cell: its four runs, the report's table shown, three figures.
    report = json.loads((tmp_path / "collapse" / "sweep" / "report.json").read_text())
    assert sorted(report["runs"]) == sorted(f"{m}_d2_w8_s{s}" for m in ("vit", "deepvit")
                                            for s in (0, 1))
    table = "".join(o.data["text/markdown"] for c in nb.cells for o in c.get("outputs", [])
                    if "text/markdown" in o.get("data", {}))
    top1 = report["depth_sweep"]["deepvit"]["2"]["top1"]
    assert f"| deepvit | 2 | 0,1 | {top1['mean']:.1f} ({top1['min']:.1f}-" in table
    lines = dict(re.findall(r"^(ViT|DeepViT): (3 blocks, .*)$", out, re.M))
    assert set(lines) == {"ViT", "DeepViT"}
    from deepvit_jax.analysis import load_images
    from deepvit_jax.saved_run import load_checkpoint

    for label, run in (("ViT", "vit"), ("DeepViT", "deepvit")):
        loaded = load_checkpoint(str(tmp_path / "collapse" / run))
        assert loaded.source.step == 3
        assert len(loaded.model_cfg.reattn_indices) == (3 if run == "deepvit" else 0)
        model = loaded.model()
        images, _ = load_images(loaded.run_config.data, loaded.model_cfg, 16)
        _, maps = model(images, return_attention=True)
        want = _eq2_to_next([np.asarray(m) for m in maps])
        similar = sum(v >= 0.9 for v in want)
        assert lines[label].startswith(f"3 blocks, {similar} similar")
        got = re.search(r"mean ([\d.]+), last block pair ([\d.]+); 16 images", lines[label])
        assert float(got.group(1)) == pytest.approx(np.mean(want), abs=1e-3)
        assert float(got.group(2)) == pytest.approx(want[-1], abs=1e-3)
    # the similarity figure, one attention figure per run, the sweep's three figures
    assert images_shown(nb) == 6
