"""python -m deepvit_jax.predict: image files (scikit-image samples) and .npy batches through
the official eval transform, top-5 with ImageNet names, --output logits."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deepvit_jax import model_dir as ck
from deepvit_jax import predict
from deepvit_jax.models.registry import get_config

skimage_data = pytest.importorskip("skimage.data")


def test_imagenet_classes_file():
    classes = predict.imagenet_classes()
    assert len(classes) == 1000
    wnids = [w for w, _ in classes]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert classes[0] == ("n01440764", "tench")
    assert classes[281] == ("n02123045", "tabby")
    assert classes[999] == ("n15075141", "toilet tissue")
    tfds_labels = os.path.join(os.path.dirname(__import__("tensorflow_datasets").__file__),
                               "datasets", "imagenet2012", "labels.txt")
    if os.path.exists(tfds_labels):  # the label order TFDS's imagenet2012 uses
        assert wnids == open(tfds_labels).read().split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random 1000-class model saved as a model directory (crop_pct 0.9 -> 35 -> 32)."""
    cfg = get_config("deepvit_16b", image_size=32, depth=2)
    rng = np.random.RandomState(0)
    arrays = {p: (rng.uniform(0.5, 1.5, s) if p[-1] == "var" else rng.normal(0, 0.2, s))
              .astype(np.float32) for p, (s, _) in ck.weight_shapes(cfg).items()}
    return ck.save_model(ck.model_from_arrays(cfg, arrays),
                         tmp_path_factory.mktemp("predict") / "model")


def test_predict_images_and_npy(model_dir, tmp_path, capsys):
    from PIL import Image

    cat = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(cat)
    coffee = tmp_path / "coffee.jpg"
    Image.fromarray(skimage_data.coffee()).save(coffee, quality=95)
    out = tmp_path / "logits.npy"
    assert predict.main(["--checkpoint", str(model_dir), str(cat), str(coffee),
                         "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    logits = np.load(out)
    assert logits.shape == (2, 1000) and logits.dtype == np.float32

    # independent check of the preprocessing: PIL bicubic resize of the shorter side to
    # int(32 / 0.9) = 35, centre crop 32, (x / 255 - 0.5) / 0.5 -> the same logits
    model = ck.load_model(model_dir)
    img = Image.fromarray(skimage_data.chelsea())
    w, h = img.size
    img = img.resize((int(35 * w / h), 35), Image.BICUBIC)
    left = round((img.size[0] - 32) / 2.0)
    top = round((img.size[1] - 32) / 2.0)
    x = np.asarray(img.crop((left, top, left + 32, top + 32)), np.float32) / 255.0
    ref = predict.predict_logits(model, ((x - 0.5) / 0.5)[None])
    np.testing.assert_allclose(logits[0], ref[0], atol=0.05 * np.abs(ref).max())
    assert np.argmax(logits[0]) == np.argmax(ref[0])

    # top-5 printed for each image with names and probabilities, best first, matching the
    # saved logits (softmax and ranking recomputed here in float64)
    lines = printed.splitlines()
    classes = predict.imagenet_classes()
    for n, path in enumerate((cat, coffee)):
        block = lines[6 * n: 6 * n + 6]
        assert block[0] == f"{path}:"
        z = logits[n].astype(np.float64)
        prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        order = np.argsort(-z)[:5]
        for rank, i in enumerate(order, 1):
            wnid, name = classes[i]
            assert block[rank] == f"  {rank}. {prob[i]:6.2%}  {name} ({wnid})  [{i}]", \
                (rank, block)
    assert len([ln for ln in lines if ln.startswith("  ")]) == 10

    # a .npy batch of preprocessed images gives the same logits
    images, _labels = predict.load_inputs([str(cat), str(coffee)], model.config)
    np.save(tmp_path / "batch.npy", images)
    out2 = tmp_path / "logits2.npy"
    assert predict.main(["--checkpoint", str(model_dir), str(tmp_path / "batch.npy"),
                         "--output", str(out2)]) == 0
    np.testing.assert_allclose(np.load(out2), logits, atol=1e-5)


def test_predict_errors(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 16, 16, 3), np.float32))
    assert predict.main(["--checkpoint", str(model_dir), str(bad)]) == 2
    assert "(N, 32, 32, 3)" in capsys.readouterr().err
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    out = tmp_path / "o.npy"
    assert predict.main(["--checkpoint", str(model_dir), str(junk), "--output", str(out)]) == 2
    assert "not an image file" in capsys.readouterr().err
    assert not out.exists()
    assert predict.main(["--checkpoint", str(tmp_path / "nope"), str(junk)]) == 2
    assert "no such model directory" in capsys.readouterr().err
