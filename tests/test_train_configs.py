"""Every shipped config loads, is locked, is sized and documented; the run-length arithmetic
(epochs -> steps) against hand-computed schedules."""

import importlib.util
import pathlib
import re

import ml_collections
import pytest

from deepvit_jax import list_models
from deepvit_jax.errors import ConfigError
from deepvit_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FAMILIES = ("i1k", "i1k_ft384")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _recipes():
    return [(fam, arg) for fam in FAMILIES for arg in _load(fam).RECIPES]


def test_default_config_loads_locked():
    c = _load("default").get_config()
    assert c.model_name in list_models() and c.data.dataset == "digits"
    with pytest.raises(AttributeError):
        c.no_such_field = 1
    with pytest.raises(AttributeError):
        c.optim.learning_rat = 1
    assert c.expected_top1 is None


@pytest.mark.parametrize("family,arg", _recipes())
def test_recipe_loads_locked_and_documents_itself(family, arg):
    mod = _load(family)
    c = mod.get_config(arg)
    assert c.model_name in list_models()
    with pytest.raises(AttributeError):
        c.no_such_field = 1
    # The expected top-1 is data; the docstring (what users read) states the same number.
    assert c.expected_top1 == mod.RECIPES[arg]
    assert f"configs/{family}.py:" in mod.__doc__ and "Sized for" in mod.__doc__
    assert re.search(rf"{arg}\s+{mod.RECIPES[arg]:g}|{mod.RECIPES[arg]:g}", mod.__doc__)
    assert c.data.dataset == "imagenet2012" and c.model.drop_path_rate == 0.2
    # The official recipe values every ImageNet config shares (timm 0.3.2 yaml files).
    assert (c.optim.learning_rate if family == "i1k" else 5e-4) == 5e-4
    assert (c.data.randaugment, c.data.random_erasing, c.data.rrc_scale) == (
        "rand-m9-mstd0.5-inc1", 0.25, (0.08, 1.0))
    assert c.mix.label_smoothing == 0.1 and c.ema_decay == 0.99996
    assert (c.eval.bn_recalibration_batches, c.eval.bn_recalibration_batch_size) == (50, 256)


def test_recipe_table_in_readme_matches_the_configs():
    readme = (ROOT / "README.md").read_text()
    for family, arg in _recipes():
        top1 = _load(family).RECIPES[arg]
        assert re.search(rf"configs/{family}\.py:{arg}`[^\n]*\|\s*{top1:g}\s*\|", readme), (
            family, arg, top1)



def _aot_table():
    spec = importlib.util.spec_from_file_location("aot_table", ROOT / "benchmarks/aot_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


def test_aot_table_instances_keep_each_others_rows(tmp_path, monkeypatch):
    """Two ``aot_table.py`` instances at once: one that read a row before the other recompiled
    it (a batch search) keeps the recompiled row when it saves its own, and the versions."""
    table = _aot_table()
    monkeypatch.setattr(table, "OUT", str(tmp_path / "aot.json"))
    first = table.save({"libtpu": "0.0.42.1", "rows": {"a@v5e-8": {"fits": True}}})
    second = table.save(dict(first), "a@v5e-8", {"fits": True, "max_per_chip_batch": 96})
    assert second["rows"]["a@v5e-8"]["max_per_chip_batch"] == 96
    merged = table.save({"rows": dict(first["rows"])}, "b@v5e-8", {"fits": False})
    assert merged["rows"]["a@v5e-8"] == {"fits": True, "max_per_chip_batch": 96}
    assert table.load() == merged and merged["libtpu"] == "0.0.42.1"
    assert merged["rows"]["b@v5e-8"] == {"fits": False}


def test_readme_tpu_table_is_the_committed_json():
    """The README's TPU table is ``benchmarks/aot_table.py --markdown`` of the committed
    ``benchmarks/results/aot_tpu.json``, and every row of it was compiled with the recipe's
    own settings and no override but its variant's (an attention implementation, or a
    setting that makes the recipe fit), which the table shows."""
    import json

    table = _aot_table()
    doc = json.loads((ROOT / "benchmarks/results/aot_tpu.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- aot-table -->")[1].split("<!-- /aot-table -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    assert rows == table.markdown(doc).splitlines()
    assert doc["libtpu"] and len(doc["rows"]) >= 10
    for key, row in doc["rows"].items():
        flags = [a for a in row["command"].split() if a.startswith("--config.")]
        variant = key.partition("/")[2]
        assert flags == table.VARIANTS.get(variant, []), key
    # complete: the nine recipes on the four 8-chip slices and the multi-host rows
    assert {table.key(*r) for r in table.rows()} <= set(doc["rows"])
    assert {r["hosts"] for r in doc["rows"].values() if "hosts" in r} >= {1, 4}
    # a recipe that does not fit at its batch names a setting that fits, compiled
    for key, row in doc["rows"].items():
        if "/" not in key and row.get("fits") is False:
            assert table.FIT_VARIANTS.get(tuple(key.split("@"))), key
            assert " with " in table.recommended(doc, key), key


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match=r"configs/i1k\.py:deepvit_99b"):
        _load("i1k").get_config("deepvit_99b")


def test_deepvit_32b_recipe_exceptions():
    c = _load("i1k").get_config("deepvit_32b")
    assert (c.mix.mixup_alpha, c.mix.cutmix_alpha, c.loss.cosine_reg_weight,
            c.loss.cosine_reg_pairs, c.model.dtype) == (0.1, 0.0, 0.1, 12, "bfloat16")
    c16 = _load("i1k").get_config("deepvit_16b")
    assert (c16.mix.mixup_alpha, c16.mix.cutmix_alpha, c16.loss.cosine_reg_weight,
            c16.model.dtype) == (0.8, 1.0, 0.0, None)


def test_finetune_recipe():
    c = _load("i1k_ft384").get_config()
    assert c.model_name == "deepvit_l_384" and c.model.remat
    assert (c.num_epochs, c.warmup_epochs, c.optim.learning_rate, c.optim.min_lr,
            c.optim.weight_decay) == (30, 0, 5e-6, 5e-6, 1e-8)


def _cfg(**kw):
    c = config_lib.base_config()
    for k, v in kw.items():
        node = c
        *path, last = k.split("__")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def test_run_length_epochs_to_steps():
    # 1281167 images, batch 512: 2502 steps per epoch; 300 + 10 epochs, 5 of warm-up.
    r = config_lib.run_length(_cfg(), 1_281_167)
    assert (r.steps_per_epoch, r.total_steps, r.warmup_updates, r.decay_updates) == (
        2502, 310 * 2502, 5 * 2502, 300 * 2502)
    # Accumulating 4 micro-batches of 128: steps are micro-batches, the schedule is in updates.
    r = config_lib.run_length(_cfg(batch_size=128, optim__grad_accum_steps=4), 1_281_167)
    assert r.steps_per_epoch == 10009 and r.total_steps == 310 * (10009 // 4) * 4
    assert (r.warmup_updates, r.decay_updates) == (5 * 2502, 300 * 2502)


def test_run_length_total_steps_compresses_the_schedule():
    # The digits default: 1437 images / 128 = 11 steps per epoch, 50 epochs, 3 of warm-up.
    c = _cfg(batch_size=128, num_epochs=50, warmup_epochs=3, cooldown_epochs=0)
    r = config_lib.run_length(c, 1437)
    assert (r.total_steps, r.warmup_updates, r.decay_updates) == (550, 33, 550)
    c.total_steps = 110  # a fifth of the length: warm-up and decay shrink by the same factor
    r = config_lib.run_length(c, 1437)
    assert (r.total_steps, r.warmup_updates, r.decay_updates) == (110, round(33 / 5), 110)


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("log_every_steps", -1), ("eval__every_steps", 0),
    ("checkpoint__keep", 0), ("optim__grad_accum_steps", 0), ("total_steps", -5),
    ("ema_decay", 1.5), ("optim__weight_decay", -0.1), ("eval__bn_recalibration_batches", -1),
])
def test_validate_names_the_field(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"config.{field.replace('__', '.')}=")):
        config_lib.validate(_cfg(**{field: value}))


def test_one_default_per_field():
    """The mix section is the only home of the mixup defaults: mix_batch has none."""
    import inspect

    from deepvit_jax.data.config import default_mix_config
    from deepvit_jax.data.mix import mix_batch

    params = inspect.signature(mix_batch).parameters
    assert set(default_mix_config()) <= set(params)
    assert all(params[k].default is inspect.Parameter.empty for k in default_mix_config())
    assert isinstance(config_lib.base_config().mix, ml_collections.ConfigDict)
