"""Weights for the notebooks: the official release's files found, downloaded or uploaded,
and loaded (converted) as a model."""

from __future__ import annotations

import os

import deepvit_jax
from deepvit_jax.colab.runtime import in_colab, on_unmounted_drive, say
from deepvit_jax.convert import from_pytorch
from deepvit_jax.model_dir import load_model

OFFICIAL_REPO = "https://github.com/zhoudaquan/dvit_repo"
# The released checkpoints (reference: the official README) and the model each converts to.
OFFICIAL_FILES = {"DViT_82_16b.pth.tar": "deepvit_s", "DViT_83_32b.pth.tar": "deepvit_l"}

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
    if on_unmounted_drive(path):
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
