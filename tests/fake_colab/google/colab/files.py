import os
import shutil


def upload(target_dir=""):
    src = os.environ.get("FAKE_COLAB_UPLOAD")
    if not src:
        return {}
    name = os.path.basename(src)
    shutil.copyfile(src, os.path.join(target_dir or os.getcwd(), name))
    with open(src, "rb") as f:
        return {name: f.read()}


def download(filename):
    if not os.path.exists(filename):
        raise FileNotFoundError(filename)
