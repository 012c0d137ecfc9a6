"""TFDS's real imagenet2012 preparation, through our `prepare` command, on miniature tars in
ImageNet's own distribution layout; then augmented and evaluation batches from it."""

import contextlib
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from deepvit_jax.data import (dataset_info, default_data_config, make_eval_iterator,
                              make_train_iterator)
from deepvit_jax.data.dataset import ImageSpec
from deepvit_jax.data.__main__ import main

SYNSETS = ["n01440764", "n01443537", "n01484850"]   # the first three ImageNet classes


def _jpeg(rng, mode="RGB", fmt="JPEG"):
    h, w = rng.integers(40, 90, size=2)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_manual_dir(root):
    rng = np.random.default_rng(0)
    os.makedirs(root)
    with tarfile.open(os.path.join(root, "ILSVRC2012_img_train.tar"), "w") as train:
        for k, syn in enumerate(SYNSETS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(3):
                    _add(t, f"{syn}_{i}.JPEG", _jpeg(rng))
                if k == 0:
                    _add(t, f"{syn}_cmyk.JPEG", _jpeg(rng, "CMYK"))           # CMYK JPEG
                    _add(t, f"{syn}_png.JPEG", _jpeg(rng, fmt="PNG"))         # PNG named .JPEG
                if k == 1:
                    _add(t, f"{syn}_corrupt.JPEG", b"\xff\xd8\xff\xe0 not a jpeg")
            _add(train, f"{syn}.tar", inner.getvalue())
    with tarfile.open(os.path.join(root, "ILSVRC2012_img_val.tar"), "w") as val:
        for i in range(1, 7):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng))


def test_missing_manual_dir_names_the_files(tmp_path, capsys):
    os.makedirs(tmp_path / "manual")
    assert main(["prepare", "imagenet2012", "--manual-dir", str(tmp_path / "manual"),
                 "--data-dir", str(tmp_path / "tfds")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "ILSVRC2012_img_train.tar" in err
    assert "ILSVRC2012_img_val.tar" in err and str(tmp_path / "manual") in err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The miniature ImageNet prepared once: the training recipe's data config for it."""
    tmp = tmp_path_factory.mktemp("imagenet")
    manual, data_dir = str(tmp / "manual"), str(tmp / "tfds")
    _make_manual_dir(manual)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["prepare", "imagenet2012", "--manual-dir", manual, "--data-dir",
                     data_dir]) == 0
    cfg = default_data_config()               # the full training recipe
    cfg.dataset, cfg.data_dir, cfg.shuffle_buffer = "imagenet2012", data_dir, 64
    cfg.prepare_output = out.getvalue()
    return cfg


@pytest.mark.slow
def test_prepare_imagenet_from_mini_tars_and_read_batches(prepared):
    cfg = prepared
    info = dataset_info(cfg)
    # 12 training files: the CMYK JPEG and the PNG named .JPEG kept, the corrupt one skipped
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 11, 6)
    assert info.eval_split == "validation"
    assert "train: skipped 1 undecodable image(s)" in cfg.prepare_output
    assert "validation: skipped" not in cfg.prepare_output

    it = make_train_iterator(cfg, global_batch_size=4, spec=ImageSpec(32), sharding=None, seed=0)
    assert it.batches_per_epoch == 2
    labels = []
    for _ in range(2):
        b = next(it)
        assert b["image"].shape == (4, 32, 32, 3) and np.isfinite(b["image"]).all()
        labels += list(b["label"])
    assert set(labels) <= {0, 1, 2}

    # validation labels come from TFDS's shipped list for the official file names
    import tensorflow_datasets as tfds

    label_file = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
    names = open(os.path.join(label_file, "labels.txt")).read().split()
    want = sorted(names.index(s) for s in
                  open(os.path.join(label_file, "validation_labels.txt")).read().split()[:6])
    ev = make_eval_iterator(cfg, global_batch_size=4, spec=ImageSpec(32, crop_pct=0.875),
                            sharding=None)
    got = []
    for b in ev:
        got += [int(y) for y, m in zip(b["label"], b["mask"], strict=True) if m]
    assert sorted(got) == want and len(ev) == 2


@pytest.mark.slow
def test_undecodable_image_is_counted_and_epochs_are_exact(prepared):
    cfg = prepared
    info = dataset_info(cfg)
    assert info.num_train == 11  # 12 files, one undecodable: skipped and counted
    it = make_train_iterator(cfg, global_batch_size=4, spec=ImageSpec(32), sharding=None,
                             seed=0, dataset=info)
    assert it.batches_per_epoch == 2  # 11 // 4: the remainder (3) dropped
    batches = [next(it) for _ in range(3)]
    assert (it.get_state()["epoch"], it.get_state()["position"]) == (1, 1)
    resumed = make_train_iterator(cfg, global_batch_size=4, spec=ImageSpec(32), sharding=None,
                                  seed=0, dataset=info)
    resumed.set_state({**it.get_state(), "epoch": 0, "position": 1})
    for want in batches[1:]:
        np.testing.assert_array_equal(next(resumed)["image"], want["image"])
