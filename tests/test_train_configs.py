"""Every shipped config loads, is locked, carries the required fields and documents itself."""

import importlib.util
import pathlib

import pytest

from deepvit_jax import list_models

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER = {"deepvit_16b_i1k": "79.10", "deepvit_24b_i1k": "79.99", "deepvit_32b_i1k": "80.90",
         "vit_16b_i1k": "78.88", "vit_24b_i1k": "79.35", "vit_32b_i1k": "79.27",
         "deepvit_s_i1k": "82.3", "deepvit_l_i1k": "83.1", "deepvit_l_384_ft": "84.25"}
REQUIRED = ("model", "dataset", "batch_size", "total_steps", "log_every_steps",
            "eval_every_steps", "checkpoint_every_steps", "seed", "init_from")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["default", *PAPER])
def test_config_loads_locked_with_required_fields(name):
    mod = _load(name)
    c = mod.get_config()
    for f in REQUIRED:
        assert f in c, f
    assert c.model in list_models()
    with pytest.raises(AttributeError):
        c.no_such_field = 1
    doc = mod.__doc__
    assert f"--config configs/{name}.py" in doc
    if name in PAPER:
        assert PAPER[name] in doc and "Sized for" in doc
        assert c.dataset == "imagenet2012" and c.model_overrides.drop_path_rate == 0.2


def test_deepvit_32b_recipe_exceptions():
    c = _load("deepvit_32b_i1k").get_config()
    assert (c.mixup_alpha, c.cutmix_alpha, c.cosine_reg_weight, c.cosine_reg_pairs,
            c.compute_dtype) == (0.1, 0.0, 0.1, 12, "bfloat16")
    c16 = _load("deepvit_16b_i1k").get_config()
    assert (c16.mixup_alpha, c16.cutmix_alpha, c16.cosine_reg_weight, c16.ema_decay,
            c16.learning_rate, c16.weight_decay) == (0.8, 1.0, 0.0, 0.99996, 5e-4, 0.05)
