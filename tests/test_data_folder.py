"""`python -m deepvit_jax.data prepare folder`: every file decoded once with PIL, RGB JPEG /
PNG stored as they are, anything else re-encoded as an RGB JPEG, undecodable files skipped
and counted exactly; epochs and resume exact afterwards; an all-corrupt split is a clear
error with nothing left behind."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deepvit_jax.data import dataset_info, default_data_config, make_train_iterator
from deepvit_jax.data.__main__ import main
from deepvit_jax.data.dataset import ImageSpec


def _image(rng, mode="RGB", fmt="JPEG", size=(40, 48)):
    """A smooth random image (JPEG re-encoding keeps it to a few grey levels)."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    f, ph = rng.uniform(0.05, 0.2, (3, 2)), rng.uniform(0, 6, 3)
    rgb = np.stack([127 + 100 * np.sin(f[c, 0] * yy + f[c, 1] * xx + ph[c]) for c in range(3)],
                   axis=-1)
    img = Image.fromarray(rgb.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _make_folder(root):
    rng = np.random.default_rng(0)
    truncated = _image(rng)
    files = {
        "train/cat/rgb.jpg": _image(rng),                      # stored as is
        "train/cat/png_named.jpg": _image(rng, fmt="PNG"),     # PNG named .jpg: as is
        "train/cat/grey.png": _image(rng, "L", "PNG"),         # grey PNG: as is
        "train/cat/cmyk.jpg": _image(rng, "CMYK"),             # re-encoded
        "train/cat/palette.gif": _image(rng, "P", "GIF"),      # re-encoded
        "train/cat/corrupt.jpg": b"\xff\xd8\xff\xe0 not a jpeg",   # skipped
        "train/dog/rgb1.jpg": _image(rng),
        "train/dog/rgb2.jpg": _image(rng),
        "train/dog/bitmap.bmp": _image(rng, fmt="BMP"),        # re-encoded
        "train/dog/truncated.jpg": truncated[: len(truncated) // 2],  # skipped
        "validation/cat/v1.jpg": _image(rng),
        "validation/dog/v2.jpg": _image(rng),
        "validation/dog/empty.png": b"",                        # skipped
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    root, data_dir = tmp / "pets", tmp / "tfds"
    files = _make_folder(root)
    return root, data_dir, files


def test_prepare_counts_reencodes_and_reads_exactly(prepared, capsys):
    root, data_dir, files = prepared
    assert main(["prepare", "folder", "--folder", str(root), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "train: skipped 2 undecodable image(s)" in out
    assert "validation: skipped 1 undecodable image(s)" in out

    cfg = default_data_config()
    cfg.dataset, cfg.folder_path, cfg.data_dir = "folder", str(root), str(data_dir)
    info = dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (2, 8, 2)

    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = info.builder.as_dataset(split="train",
                                 decoders={"image": tfds.decode.SkipDecoding()})
    stored = {ex["file_name"].decode(): ex for ex in tfds.as_numpy(ds)}
    assert sorted(stored) == sorted(n for n in files if n.startswith("train/")
                                    and "corrupt" not in n and "truncated" not in n)
    for name in ("cat/rgb.jpg", "cat/png_named.jpg", "cat/grey.png", "dog/rgb1.jpg"):
        assert stored["train/" + name]["image"] == files["train/" + name], name  # as is
    for name in ("cat/cmyk.jpg", "cat/palette.gif", "dog/bitmap.bmp"):
        data = stored["train/" + name]["image"]
        assert data[:2] == b"\xff\xd8", name  # a JPEG now
        got = tf.io.decode_image(data, channels=3).numpy().astype(np.float64)
        want = np.asarray(Image.open(io.BytesIO(files["train/" + name])).convert("RGB"),
                          np.float64)
        assert got.shape == want.shape, name

        def blocks(a):  # 8x8 block means: JPEG keeps them even for a dithered GIF
            return a.reshape(5, 8, 6, 8, 3).mean(axis=(1, 3))

        assert np.abs(blocks(got) - blocks(want)).max() < 6.0, name
    labels = {n: int(ex["label"]) for n, ex in stored.items()}
    assert {labels[n] for n in labels if n.startswith("train/cat/")} == {0}
    assert {labels[n] for n in labels if n.startswith("train/dog/")} == {1}

    # Epochs are exact (8 images, batch 2: 4 batches, every image once per epoch) and a
    # resumed iterator continues with the same batches.
    cfg.shuffle_buffer, cfg.randaugment, cfg.random_erasing = 16, "", 0.0
    it = make_train_iterator(cfg, global_batch_size=2, spec=ImageSpec(16), sharding=None,
                             seed=0, dataset=info)
    assert it.batches_per_epoch == 4
    batches = [next(it) for _ in range(6)]
    assert it.get_state()["epoch"] == 1 and it.get_state()["position"] == 2
    first_epoch = np.concatenate([b["label"] for b in batches[:4]])
    assert sorted(first_epoch.tolist()) == sorted(labels.values())
    again = make_train_iterator(cfg, global_batch_size=2, spec=ImageSpec(16), sharding=None,
                                seed=0, dataset=info)
    again.set_state({**it.get_state(), "epoch": 0, "position": 3})
    for want in batches[3:]:
        got = next(again)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_all_corrupt_split_is_a_clear_error(tmp_path, capsys):
    root, data_dir = tmp_path / "broken", tmp_path / "tfds"
    for name in ("train/cat/a.jpg", "train/dog/b.png", "validation/cat/c.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not an image")
    assert main(["prepare", "folder", "--folder", str(root), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 image file(s) of split 'train' can be decoded" in err
    assert "AssertionError" not in err and "Traceback" not in err
    leftovers = list((data_dir / "image_folder").glob("*")) if data_dir.exists() else []
    assert leftovers == []
