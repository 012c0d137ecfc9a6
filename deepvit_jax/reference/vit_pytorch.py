"""vit-pytorch's DeepViT class, loaded by file path.

The ``vit_pytorch`` package __init__ imports torchvision (not installed, and not needed):
load only ``vit_pytorch/deepvit.py``.
"""

from __future__ import annotations

import importlib.util
import pathlib


def load_deepvit_class():
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("vit-pytorch is not installed: pip install --no-deps vit-pytorch einops")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "deepvit.py"
    mod_spec = importlib.util.spec_from_file_location("_vit_pytorch_deepvit", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.DeepViT
