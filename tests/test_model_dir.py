"""deepvit_jax.model_dir: save_model / load_model / load_model_state round trips and errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

import deepvit_jax
from deepvit_jax import model_dir as ck


def _model(**kw):
    """A small DeepViT-S-structured model with random weights (built from arrays: faster
    than running the random initialisers eagerly)."""
    kw = {"image_size": 32, "depth": 2, "num_classes": 5, "reattn_blocks": (1,), **kw}
    cfg = deepvit_jax.get_config("deepvit_s", **kw)
    rng = np.random.RandomState(0)
    arrays = {p: (rng.uniform(0.5, 1.5, shape) if p[-1] == "var" else
                  rng.normal(0, 0.1, shape)).astype(np.float32)
              for p, (shape, _) in ck.weight_shapes(cfg).items()}
    model = ck.model_from_arrays(cfg, arrays)
    model.train()
    return model


@nnx.jit
def _fwd(model, x):  # one compile instead of ~200 eager op compiles
    return model(x)


def _x(n=2, size=32):
    return np.random.RandomState(0).randn(n, size, size, 3).astype(np.float32)


def test_save_load_round_trip(tmp_path):
    model = _model()
    model.train()
    _fwd(model, _x(4))  # move the BatchNorm statistics away from their initial values
    model.eval()
    want = np.asarray(_fwd(model, _x()))
    path = ck.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "state"]
    assert not list(tmp_path.glob("*deepvit-partial*"))

    loaded = ck.load_model(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(np.asarray(_fwd(loaded, _x())), want)  # eval mode, same weights
    stats = nnx.state(loaded, nnx.BatchStat)
    ref_stats = nnx.state(model, nnx.BatchStat)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    cfg, state = ck.load_model_state(path)
    assert cfg == model.config
    fresh = _model()  # other weights
    nnx.update(fresh, state)
    fresh.eval()
    np.testing.assert_array_equal(np.asarray(_fwd(fresh, _x())), want)


def test_save_refuses_to_overwrite_and_cleans_up(tmp_path, monkeypatch):
    model = _model()
    ck.save_model(model, tmp_path / "m")
    with pytest.raises(FileExistsError):
        ck.save_model(model, tmp_path / "m")
    ck.save_model(model, tmp_path / "m", overwrite=True)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.json, "dump", boom)  # fail after the weights were written
    with pytest.raises(OSError, match="disk full"):
        ck.save_model(model, tmp_path / "n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written
    with pytest.raises(TypeError, match="DeepViT"):
        ck.save_model(object(), tmp_path / "o")


def test_load_errors(tmp_path):
    with pytest.raises(ck.ModelFileError, match="no such model directory"):
        ck.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.ModelFileError, match=r"no config\.json"):
        ck.load_model(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ck.ModelFileError, match="unreadable"):
        ck.load_model(tmp_path / "bad")

    # weights that do not fit the config (someone edited config.json)
    path = ck.save_model(_model(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["depth"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ck.ModelFileError, match="cannot restore"):
        ck.load_model(path)
    meta["config"]["depth"] = "deep"
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ck.ModelFileError, match="invalid model config"):
        ck.load_model(path)
