"""python -m deepvit_jax.export: the 224 -> 384 chain at tiny scale on the digits. A
configs/i1k.py:deepvit_l run (shrunk, digits instead of ImageNet) is exported with its EMA
weights and re-estimated BatchNorm statistics; the model directory scores what the run's
EMA evaluation logged, predict / convert --to-pytorch read it, and configs/i1k_ft384.py
starts from it through init_from (pos_embed resampled to the larger grid)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# deepvit_l shrunk: CNN stem with 8 channels, 2 blocks (Re-attention in the last, as the
# real model has it in its last 12), 16-d, 2 heads; 32 px = 2x2 patches of 16 px.
TINY_L = dict(embed_dim=16, depth=2, num_heads=2, reattn_blocks=(1,), stem_channels=8,
              image_size=32)


def _config(name, arg, data_dir, **model):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.data.dataset = "digits"  # ImageNet emulated by the embedded digits
    c.data.eval_split = "test"
    c.data.data_dir = data_dir
    c.data.shuffle_buffer = 256
    for k, v in model.items():
        c.model[k] = v
    c.batch_size = 32
    c.log_every_steps = 1
    c.eval.bn_recalibration_batches = 2
    c.eval.bn_recalibration_batch_size = 32
    return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from deepvit_jax.train.loop import train_and_evaluate

    base = tmp_path_factory.mktemp("export")
    c = _config("i1k", "deepvit_l", str(base / "tfds"), **TINY_L)
    c.total_steps = 3
    c.ema_decay = 0.5  # a short run: EMA weights that differ from the live ones
    c.eval.every_steps = c.checkpoint.every_steps = 3
    workdir = base / "l224"
    train_and_evaluate(c, str(workdir))
    with open(workdir / "metrics.jsonl") as f:
        (row,) = [json.loads(ln) for ln in f if "eval/ema_top1" in ln]
    return base, workdir, row


def test_export_evaluate_predict_convert(pretrained, capsys):
    from deepvit_jax.model_dir import load_model, read_config
    from deepvit_jax.evaluate import evaluate_checkpoint
    from deepvit_jax.export import main
    from deepvit_jax.predict import predict_logits

    base, workdir, row = pretrained
    out = base / "l224_model"
    assert main(["--checkpoint", str(workdir), "--out", str(out), "--ema",
                 "--bn-recalibrate", "2"]) == 0
    cfg = read_config(out)
    assert cfg.name == "deepvit_l" and cfg.patch_embed == "cnn_stem" and cfg.depth == 2
    # the exported model, with its stored statistics, scores the run's EMA evaluation
    got = evaluate_checkpoint(str(out), dataset="digits", data_dir=str(base / "tfds"),
                              batch_size=32)
    assert got["count"] == 360 and got["bn_recalibrate"] == 0
    assert got["top1"] == row["eval/ema_top1"] and got["top5"] == row["eval/ema_top5"]
    np.testing.assert_allclose(got["loss"], row["eval/ema_loss"], rtol=1e-6)
    model = load_model(out)
    logits = predict_logits(model, np.zeros((2, 32, 32, 3), np.float32))
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    from deepvit_jax.convert.__main__ import main as convert_main

    assert convert_main([str(out), "--to-pytorch", str(base / "l224.pth")]) == 0
    assert (base / "l224.pth").stat().st_size > 0
    # refused: an existing --out, an --out inside the input, a model directory as input
    capsys.readouterr()
    assert main(["--checkpoint", str(workdir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--checkpoint", str(workdir), "--out", str(workdir / "checkpoints" / "m")]) == 2
    assert "would write into the input" in capsys.readouterr().err
    assert main(["--checkpoint", str(out), "--out", str(base / "again")]) == 2
    assert "already a model directory" in capsys.readouterr().err
    assert not (base / "again").exists()


def test_fine_tune_384_style_from_the_export(pretrained):
    """configs/i1k_ft384.py:deepvit_l_384 with init_from = the export, at twice the
    resolution: with a zero learning rate the first checkpoint holds the exported weights,
    pos_embed resampled from the 2x2 to the 4x4 grid."""
    from deepvit_jax.model_dir import model_arrays, load_model
    from deepvit_jax.export import export
    from deepvit_jax.models.deepvit import resample_pos_embed
    from deepvit_jax.train.loop import train_and_evaluate

    base, workdir, _ = pretrained
    src = export(str(workdir), str(base / "l224_live"))
    c = _config("i1k_ft384", "deepvit_l_384", str(base / "tfds"),
                **{**TINY_L, "image_size": 64})
    c.init_from = src
    c.total_steps = 1
    c.optim.learning_rate = c.optim.warmup_lr = c.optim.min_lr = 0.0
    c.eval.every_steps = c.checkpoint.every_steps = 1
    c.eval.bn_recalibration_batches = 0
    train_and_evaluate(c, str(base / "l384"))
    out = export(str(base / "l384"), str(base / "l384_model"))
    want = model_arrays(load_model(src))
    got = model_arrays(load_model(out))
    assert load_model(out).config.image_size == 64
    np.testing.assert_allclose(got[("pos_embed",)],
                               resample_pos_embed(want[("pos_embed",)], 4), atol=1e-6)
    same = [p for p in want if p != ("pos_embed",) and "mean" not in p and "var" not in p]
    assert len(same) > 20
    for p in same:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
