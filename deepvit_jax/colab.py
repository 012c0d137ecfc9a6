"""What the Colab notebooks (``colab/*.ipynb``) call besides the package's own APIs: the
runtime they run on, Google Drive, official weights, a training config sized for the runtime.

Each helper prints one line saying what it found and, when something is missing (no
accelerator, Drive not mounted, no weights file), what to do about it; it then carries on
where it can (CPU at small size, a local workdir, random weights). Nothing here needs Colab:
outside it the helpers say so and take the local path, which is how the tests run the
notebooks.

    from deepvit_jax import colab
    runtime = colab.detect_runtime()                   # "TPU v5 lite x1 ..." / "no accelerator ..."
    colab.mount_drive()                                # or a one-line reason it is not mounted
    workdir = colab.resolve_workdir("/content/drive/MyDrive/deepvit-jax/run")
    config = colab.training_config("auto", "imagenette", runtime=runtime)
    model = colab.load_weights("DViT_82_16b.pth.tar", "deepvit_s")
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import deepvit_jax
from deepvit_jax import analysis, configs, predict
from deepvit_jax.convert import from_pytorch
from deepvit_jax.data.__main__ import prepare
from deepvit_jax.data.dataset import dataset_info, get_builder
from deepvit_jax.errors import DatasetNotPreparedError
from deepvit_jax.model_dir import load_model
from deepvit_jax.utils import atomic_output
from deepvit_jax.workdir import latest_step
from deepvit_jax.workdir_lock import WorkdirLock

# Where Drive is mounted (Colab: /content/drive); the tests mount a stand-in elsewhere.
DRIVE_MOUNT = os.environ.get("DEEPVIT_DRIVE_MOUNT", "/content/drive")
DRIVE_ROOT = DRIVE_MOUNT + "/MyDrive"
OFFICIAL_REPO = "https://github.com/zhoudaquan/dvit_repo"
# The released checkpoints (reference: the official README) and the model each converts to.
OFFICIAL_FILES = {"DViT_82_16b.pth.tar": "deepvit_s", "DViT_83_32b.pth.tar": "deepvit_l"}


def say(line: str) -> None:
    """One line for the notebook reader (stdout, flushed so it shows before long cells)."""
    print(line, flush=True)


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or importlib.util.find_spec("google.colab") is not None


# --------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The accelerator JAX sees. ``config_arg`` is the matching ``configs/colab.py`` runtime."""

    platform: str  # 'tpu' | 'gpu' | 'cpu'
    device_kind: str
    device_count: int
    config_arg: str

    @property
    def accelerated(self) -> bool:
        return self.platform != "cpu"

    def __str__(self) -> str:
        return f"{self.device_kind} x{self.device_count} ({self.platform})"


def _config_arg(platform: str, kind: str, count: int) -> str:
    if platform == "gpu":
        return "gpu"
    if platform == "tpu":
        k = kind.lower()
        if "v2" in k or "v3" in k or count > 1:
            return "tpu_v2_8"
        return "tpu_v5e1"
    return "cpu_small"


def _unused_accelerator() -> str | None:
    """An accelerator the machine has but JAX does not use (wrong jax build), if any."""
    if glob.glob("/dev/accel[0-9]*") or os.environ.get("COLAB_TPU_ADDR") or os.environ.get(
            "TPU_ACCELERATOR_TYPE"):
        return "TPU"
    if glob.glob("/dev/nvidia[0-9]*"):
        return "GPU"
    return None


def detect_runtime(verbose: bool = True) -> Runtime:
    """The platform JAX runs on, printed as one line; on CPU, what to do for full size."""
    devices = jax.devices()
    platform = devices[0].platform  # 'tpu', 'gpu' (CUDA / ROCm) or 'cpu'
    kind = getattr(devices[0], "device_kind", platform)
    rt = Runtime(platform, kind, len(devices), _config_arg(platform, kind, len(devices)))
    if verbose:
        if rt.accelerated:
            say(f"runtime: {rt}, jax {jax.__version__}; configs/colab.py:{rt.config_arg}")
        else:
            unused = _unused_accelerator()
            how = ("pip install -U 'jax[tpu]'" if unused == "TPU" else
                   "the CUDA build, https://docs.jax.dev/en/latest/installation.html")
            fix = (f"this machine has a {unused} that JAX does not see: install JAX for it "
                   f"({how}) and restart the runtime" if unused else
                   "for full size pick Runtime > Change runtime type > TPU or GPU")
            say(f"runtime: no accelerator, running on CPU at small size "
                f"(configs/colab.py:cpu_small); {fix}")
    return rt


# --------------------------------------------------------------------------------------
# Google Drive and the workdir
# --------------------------------------------------------------------------------------


def mount_drive(mount_point: str = DRIVE_MOUNT) -> bool:
    """Mount Google Drive on Colab; elsewhere (or if mounting fails) say why and return False."""
    if not in_colab():
        say("Google Drive: not a Colab runtime, so nothing to mount; paths are local")
        return False
    try:
        from google.colab import drive

        drive.mount(mount_point)
    except Exception as e:  # the user declined, or Drive is unreachable
        say(f"Google Drive: not mounted ({str(e).splitlines()[0] if str(e) else type(e)}); "
            f"run this cell again and allow access, or use a local path")
        return False
    return os.path.isdir(os.path.join(mount_point, "MyDrive"))


def _on_unmounted_drive(path: str) -> bool:
    p = os.path.abspath(os.path.expanduser(path))
    return p.startswith(DRIVE_MOUNT + "/") and not os.path.isdir(DRIVE_ROOT)


def drive_or_local(path: str, what: str = "output", local_root: str = "runs") -> str:
    """``path``, or ``local_root/<its name>`` (saying so in one line) when ``path`` lies on a
    Google Drive that is not mounted."""
    path = os.path.expanduser(path)
    if not _on_unmounted_drive(path):
        return path
    local = os.path.abspath(os.path.join(local_root, os.path.basename(path.rstrip("/"))))
    say(f"{what}: Google Drive is not mounted, so using {local}, which a disconnected "
        f"runtime loses; run the Drive cell (mount_drive) to keep it at {path}")
    return local


def resolve_workdir(path: str, local_root: str = "runs", *,
                    take_over_lock: bool | None = None) -> str:
    """``path`` (created), or a local folder when it lies on a Drive that is not mounted.

    Prints where the run lives and whether it resumes (its latest checkpoint). A run holds
    ``WORKDIR/lock`` (host and pid) while it trains; a runtime that disconnected never
    removes it, and the next runtime is another host, which the training loop refuses
    (it cannot tell whether that host still runs). ``take_over_lock`` (default: on Colab)
    removes a lock of another host, saying so: one Colab runtime per workdir."""
    path = drive_or_local(path, "workdir", local_root)
    os.makedirs(path, exist_ok=True)
    if (in_colab() if take_over_lock is None else take_over_lock) and (
            host := WorkdirLock(path).take_over_from_other_host()):
        say(f"workdir: removed the lock of the runtime that trained here before (host {host}, "
            f"now gone); do not train into one workdir from two runtimes at once")
    step = latest_checkpoint(path)
    say(f"workdir: {path}" + (f" (holds checkpoint step {step}: training resumes from it)"
                              if step is not None else " (new run)"))
    return path


def latest_checkpoint(workdir: str) -> int | None:
    """The latest complete training checkpoint step in ``workdir/checkpoints``, or None."""
    return latest_step(workdir)


# --------------------------------------------------------------------------------------
# Training config and data
# --------------------------------------------------------------------------------------


def config_dir() -> Path:
    """The recipes' folder, ``deepvit_jax/configs`` (shipped in the package; ``configs/`` of
    a git checkout links to it)."""
    return configs.DIR


def load_config(spec: str, overrides: Mapping[str, Any] | None = None):
    """``FILE.py[:ARG]`` from ``configs/`` as ``main --config configs/FILE.py:ARG`` loads it,
    then ``overrides`` ({'model.depth': 2, 'total_steps': 10}; dotted field names) applied."""
    name, _, arg = spec.partition(":")
    path = config_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"configs/{name}: no such config file in {path.parent}")
    mod_spec = importlib.util.spec_from_file_location(f"deepvit_config_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
        if not hasattr(node, "keys") or leaf not in node.keys():
            raise ValueError(f"overrides: configs/{name} has no field {key!r} (dotted names of "
                             f"existing fields, e.g. 'model.depth', 'optim.learning_rate')")
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"overrides: {key}={value!r}: {e}") from None
    return config


def training_config(runtime: str, dataset: str, overrides: Mapping[str, Any] | None = None,
                    *, detected: Runtime | None = None, data_dir: str = ""):
    """``configs/colab.py:RUNTIME,DATASET`` with ``overrides``; ``runtime='auto'`` takes the
    detected runtime's (``detect_runtime``); ``data_dir`` (if given) is the TFDS data dir."""
    if runtime == "auto":
        runtime = (detected or detect_runtime(verbose=False)).config_arg
    overrides = dict(overrides or {})
    if data_dir:
        overrides["data.data_dir"] = data_dir
    config = load_config(f"colab.py:{runtime},{dataset}", overrides)
    m = config.model
    say(f"config: configs/colab.py:{runtime},{dataset} - {config.model_name} "
        f"{m.depth or ''} blocks x {m.embed_dim or ''}-d at {m.image_size} px, batch "
        f"{config.batch_size}, {m.dtype}")
    return config


def prepare_dataset(data_cfg):
    """Download and prepare ``data_cfg.dataset`` through TFDS if it is not ready; returns the
    ``DatasetInfo`` and prints its classes and split sizes."""
    name = str(data_cfg.dataset)
    try:
        get_builder(data_cfg)
    except DatasetNotPreparedError:
        say(f"data: downloading and preparing {name} (once; kept in the TFDS data dir)")
        try:
            prepare(name, data_dir=data_cfg.get("data_dir"))
        except Exception as e:
            raise RuntimeError(f"data: could not prepare {name!r} ({e}); check the runtime's "
                               f"internet connection, or use the dataset 'digits'") from None
    info = dataset_info(data_cfg)
    say(f"data: {info.name}, {info.num_classes} classes, {info.train_split} "
        f"{info.num_train} / {info.eval_split} {info.num_eval} images ({info.data_dir})")
    return info


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

_WHERE = (f"upload it (the upload cell), copy it to Google Drive, or set WEIGHTS_URL to its "
          f"Google Drive link from the README of {OFFICIAL_REPO}")


def find_weights(path: str) -> str | None:
    """``path`` if it is a weights file or a model directory; else one line saying what to do."""
    if not path:
        say(f"weights: none given; {_WHERE}")
        return None
    path = os.path.expanduser(path)
    if os.path.exists(path):
        return path
    if _on_unmounted_drive(path):
        say(f"weights: {path} is on Google Drive, which is not mounted: run the Drive cell "
            f"(mount_drive), or {_WHERE}")
    else:
        say(f"weights: no file at {path}; {_WHERE}")
    return None


def download_weights(url_or_id: str, out_dir: str = ".") -> str | None:
    """Fetch a Google Drive file (link or file ID) with gdown; returns its path, or None with
    a one-line reason."""
    if not url_or_id:
        say(f"weights: no WEIGHTS_URL; the Google Drive links of the official files "
            f"({', '.join(OFFICIAL_FILES)}) are in the README of {OFFICIAL_REPO}")
        return None
    try:
        import gdown
    except ImportError:
        say("weights: gdown is not installed: run %pip install gdown (Colab ships it)")
        return None
    os.makedirs(out_dir, exist_ok=True)
    is_url = "://" in url_or_id
    try:
        path = gdown.download(url=url_or_id if is_url else None,
                              id=None if is_url else url_or_id,
                              output=os.path.join(out_dir, ""), quiet=False, fuzzy=True)
    except Exception as e:  # gdown raises many kinds (quota, permissions, network)
        say(f"weights: download failed ({str(e).splitlines()[0] if str(e) else type(e)}); "
            f"download the file in a browser and upload it instead")
        return None
    if not path:
        say("weights: download failed (Drive quota or permissions); download the file in a "
            "browser and upload it instead")
        return None
    say(f"weights: downloaded {path}")
    return path


def upload_weights(out_dir: str = ".") -> str | None:
    """Colab's file-upload widget; returns the uploaded file's path (or None, saying why)."""
    if not in_colab():
        say("weights: the upload widget needs Colab; set WEIGHTS to a local path instead")
        return None
    from google.colab import files

    uploaded = files.upload()
    if not uploaded:
        say("weights: nothing uploaded")
        return None
    name = next(iter(uploaded))
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):  # files.upload() writes into the working directory
        with open(path, "wb") as f:
            f.write(uploaded[name])
    say(f"weights: uploaded {path}")
    return path


def load_weights(path: str | None, model: str, **overrides):
    """A model from ``path``: a model directory (``save_model`` / ``convert --out``) or a
    PyTorch file (``.pth.tar`` of the official release, ``.pth``, ``.safetensors``) converted
    with ``from_pytorch``. Without a usable ``path``, a randomly initialised ``model`` (in eval
    mode) and one line saying so."""
    found = find_weights(path) if path is not None else None
    if found is None:
        net = deepvit_jax.create_model(model, **overrides)
        net.eval()
        say(f"weights: random {model} (predictions are meaningless until you load weights)")
        return net
    if os.path.isdir(found):
        net = load_model(found)
        say(f"weights: model directory {found} ({net.config.name})")
    else:
        official = OFFICIAL_FILES.get(os.path.basename(found))
        if official and official != model:
            say(f"weights: {os.path.basename(found)} is the official {official}: converting "
                f"to {official}, not {model}")
            model = official
        net = from_pytorch(found, model, **overrides)
        say(f"weights: converted {found} -> {net.config.name} "
            f"({deepvit_jax.count_params(net):,} parameters)")
    net.eval()
    return net


# --------------------------------------------------------------------------------------
# Images and predictions
# --------------------------------------------------------------------------------------


def sample_image(path: str = "cat.png") -> str:
    """scikit-image's sample photo of a cat (``skimage.data.chelsea``) saved as ``path``."""
    from PIL import Image  # the extras of the notebooks
    from skimage import data

    with atomic_output(path) as tmp:
        Image.fromarray(data.chelsea()).save(tmp, format="PNG")
    return path


def classify(model, images: Sequence[str], k: int = 5, names_file: str | None = None
             ) -> list[list[tuple[int, float, str]]]:
    """Top-``k`` (class index, probability, name) of each image file, printed as
    ``python -m deepvit_jax.predict`` prints them (the same preprocessing and names)."""
    cfg = model.config
    names = predict.class_names(cfg.num_classes, names_file)
    batch, labels = predict.load_inputs(list(images), cfg)
    idx, prob = predict.top_k(predict.predict_logits(model, batch), min(k, cfg.num_classes))
    rows = []
    for label, ii, pp in zip(labels, idx, prob, strict=True):
        say(f"{label}:")
        rows.append([(int(i), float(q), names[i]) for i, q in zip(ii, pp, strict=True)])
        for rank, (i, q, name) in enumerate(rows[-1], 1):
            say(f"  {rank}. {q:6.2%}  {name}  [{i}]")
    return rows


# --------------------------------------------------------------------------------------
# Figures and the collapse analysis
# --------------------------------------------------------------------------------------


def show(fig, dpi: int = 100) -> None:
    """Display a matplotlib figure inline as a PNG, whatever backend is active (the analysis
    plots draw with Agg), then close it."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


@dataclasses.dataclass
class Analysed:
    """One checkpoint's collapse measures (``deepvit_jax.analysis.analyse_checkpoint``), with
    the model and the images they were measured on (for the attention maps)."""

    result: dict
    model: Any
    images: Any


def analyse_checkpoints(paths: Mapping[str, str], *, num_images: int = 64, k: int = 1,
                        threshold: float = 0.9, dataset: str = "") -> dict[str, Analysed]:
    """``analyse_checkpoint`` of each labelled path (model directory, training workdir or
    checkpoint), one line each: depth, similar blocks, mean similarity to the next block."""
    out = {}
    for label, path in paths.items():
        result, model, images = analysis.analyse_checkpoint(
            path, num_images=num_images, k=k, threshold=threshold, dataset=dataset or None,
            return_model=True)
        out[label] = Analysed(result, model, images)
        to_next = result["to_next"]
        say(f"{label}: {result['depth']} blocks, {result['similar_blocks']} similar "
            f"(similarity to the next {k} >= {threshold}), mean {sum(to_next) / len(to_next):.3f}"
            f", last block pair {to_next[-1]:.3f}; {result['num_images']} images of "
            f"{result['dataset']} ({path})")
    return out


def show_similarity(analysed: Mapping[str, Analysed]) -> None:
    """Every checkpoint on one figure (``analysis.plot_similarity``), inline."""
    show(analysis.plot_similarity({label: a.result for label, a in analysed.items()}))


def show_attention(analysed: Mapping[str, Analysed], blocks: Sequence[int], index: int = 0
                   ) -> None:
    """The class token's attention of ``blocks`` over image ``index``, one figure per
    checkpoint (``analysis.plot_attention``), inline."""
    for label, a in analysed.items():
        maps = analysis.collect_maps(a.model, a.images[index:index + 1])
        cfg = a.model.config
        show(analysis.plot_attention(a.images[index:index + 1], maps, blocks, mean=cfg.mean,
                                     std=cfg.std, title=label))


def show_image_attention(model, image: str, blocks: Sequence[int]) -> None:
    """The class token's attention of ``blocks`` over one image file (its evaluation
    preprocessing), inline: head-averaged and per head."""
    batch, _ = predict.load_inputs([image], model.config)
    maps = analysis.collect_maps(model, batch)
    show(analysis.plot_attention(batch, maps, blocks, mean=model.config.mean,
                                 std=model.config.std, title=os.path.basename(image)))
