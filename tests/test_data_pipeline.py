"""Digits builder, multi-process splitting, eval padding, determinism and resume."""

import collections
import hashlib
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepvit_jax.data import (dataset_info, default_data_config, make_eval_iterator,
                              make_train_iterator)
from deepvit_jax.data.dataset import ImageSpec
from deepvit_jax.data.builders.digits import NUM_TEST, NUM_TRAIN, digits_image

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _cfg(data_dir, plain=False):
    cfg = default_data_config()
    cfg.data_dir = data_dir
    cfg.shuffle_buffer = 512
    if plain:   # no augmentation: the batch image is the stored image, normalised
        cfg.random_resized_crop, cfg.hflip, cfg.randaugment, cfg.random_erasing = (
            False, 0.0, "", 0.0)
        cfg.train_interpolation = "bilinear"
    return cfg


def _key(img):
    return hashlib.sha1(np.round(np.asarray(img), 4).tobytes()).hexdigest()


def test_digits_builder_counts_labels_and_split(data_dir):
    import tensorflow_datasets as tfds
    from sklearn.datasets import load_digits

    info = dataset_info(_cfg(data_dir))
    assert (info.num_classes, info.num_train, info.num_eval) == (10, NUM_TRAIN, NUM_TEST)
    assert info.eval_split == "test" and info.image_shape == (32, 32, 3)
    digits = load_digits()
    from deepvit_jax.data.dataset import get_builder

    builder = get_builder(_cfg(data_dir))
    seen = {}
    for split in ("train", "test"):
        idx = []
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            i = int(ex["sklearn_index"])
            assert ex["label"] == digits.target[i]
            idx.append(i)
            if len(idx) <= 20:
                np.testing.assert_array_equal(ex["image"], digits_image(digits.images[i]))
        seen[split] = idx
    assert len(set(seen["train"]) | set(seen["test"])) == 1797
    assert not set(seen["train"]) & set(seen["test"])
    counts = collections.Counter(digits.target[seen["test"]])
    assert min(counts.values()) >= 35 and max(counts.values()) <= 37     # stratified


def test_unknown_dataset_split_and_size_fail_early(data_dir):
    cfg = _cfg(data_dir)
    cfg.dataset = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        dataset_info(cfg)
    cfg = _cfg(data_dir)
    cfg.eval_split = "validation"
    with pytest.raises(ValueError, match=r"validation.*available splits"):
        dataset_info(cfg)
    with pytest.raises(ValueError, match="image_size"):
        make_train_iterator(_cfg(data_dir), global_batch_size=8, spec=ImageSpec(0, MEAN, STD),
                            sharding=None, seed=0)
    with pytest.raises(ValueError, match="multiple of the process count"):
        make_train_iterator(_cfg(data_dir), global_batch_size=7, spec=ImageSpec(32, MEAN, STD),
                            sharding=None, seed=0, process_index=0, process_count=2)


def test_global_batches_are_sharded_arrays(data_dir):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    it = make_train_iterator(_cfg(data_dir), global_batch_size=16, spec=ImageSpec(32, MEAN, STD),
                             sharding=sharding, seed=0)
    b = next(it)
    assert isinstance(b["image"], jax.Array) and b["image"].shape == (16, 32, 32, 3)
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    assert b["image"].sharding.is_equivalent_to(sharding, 4)
    assert int(b["label"].min()) >= 0 and int(b["label"].max()) <= 9
    json.dumps(it.get_state())
    ev = make_eval_iterator(_cfg(data_dir), global_batch_size=100,
                            spec=ImageSpec(32, MEAN, STD, 0.9), sharding=sharding)
    batches = list(ev)
    assert len(batches) == len(ev) == 4
    assert sum(float(x["mask"].sum()) for x in batches) == NUM_TEST


def test_per_process_order_reads_disjoint_parts_covering_the_split(data_dir):
    """global_order=False: each process reads only its own part of the split, every epoch
    (the default global order is tested in tests/test_multiprocess.py)."""
    cfg = _cfg(data_dir, plain=True)
    cfg.global_order = False
    per_process = NUM_TRAIN // 2                     # 718: even split, remainder dropped
    seen = []
    for pi in range(2):
        it = make_train_iterator(cfg, global_batch_size=2 * per_process,
                                 spec=ImageSpec(32, MEAN, STD), sharding=None, seed=3,
                                 process_index=pi, process_count=2)
        assert it.batches_per_epoch == 1
        b = next(it)
        assert b["image"].shape == (per_process, 32, 32, 3)
        seen.append(collections.Counter(_key(x) for x in b["image"]))
        b2 = next(it)                                    # next epoch: same part, new order
        assert collections.Counter(_key(x) for x in b2["image"]) == seen[-1]
        assert any(_key(x) != _key(y) for x, y in zip(b["image"], b2["image"], strict=True))
    assert not set(seen[0]) & set(seen[1])
    full = make_train_iterator(cfg, global_batch_size=NUM_TRAIN, spec=ImageSpec(32, MEAN, STD),
                               sharding=None, seed=3, process_index=0, process_count=1)
    everything = collections.Counter(_key(x) for x in next(full)["image"])
    union = seen[0] + seen[1]
    assert sum(union.values()) == NUM_TRAIN - 1
    assert not union - everything and sum((everything - union).values()) == 1


@pytest.mark.parametrize("process_count,local_batch", [(1, 64), (3, 7), (7, 16)])
def test_eval_padding_counts_every_image_once(data_dir, process_count, local_batch):
    cfg = _cfg(data_dir)
    kw = dict(global_batch_size=local_batch * process_count, spec=ImageSpec(32, MEAN, STD, 1.0),
              sharding=None, process_count=process_count)
    keys, lengths = collections.Counter(), set()
    for pi in range(process_count):
        ev = make_eval_iterator(cfg, process_index=pi, **kw)
        n = 0
        for b in ev:
            n += 1
            assert b["image"].shape == (local_batch, 32, 32, 3)
            m = b["mask"].astype(bool)
            assert np.all(b["image"][~m] == 0)
            keys.update(_key(x) + str(int(y))
                        for x, y in zip(b["image"][m], b["label"][m], strict=True))
        assert n == len(ev)
        lengths.add(n)
    assert len(lengths) == 1                          # every process yields the same count
    assert sum(keys.values()) == NUM_TEST
    single = make_eval_iterator(cfg, global_batch_size=NUM_TEST, spec=ImageSpec(32, MEAN, STD, 1.0),
                                sharding=None, process_count=1,
                                process_index=0)
    b = next(iter(single))
    want = collections.Counter(_key(x) + str(int(y))
                               for x, y in zip(b["image"], b["label"], strict=True))
    assert keys == want


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
               for x, y in zip(a, b, strict=True))


def test_same_seed_same_batches_and_exact_resume(data_dir):
    cfg = _cfg(data_dir)            # full recipe: crop, flip, RandAugment, erasing
    cfg.train_split = "train[:300]"
    kw = dict(global_batch_size=64, spec=ImageSpec(32, MEAN, STD), sharding=None)
    a = make_train_iterator(cfg, seed=5, **kw)          # 4 batches per epoch
    first = _take(a, 3)
    state = a.get_state()
    assert state["epoch"] == 0 and state["position"] == 3
    state = json.loads(json.dumps(state))
    rest = _take(a, 3)                                  # crosses into epoch 1
    assert a.get_state() == {**state, "epoch": 1, "position": 2}
    b = make_train_iterator(cfg, seed=5, **kw)
    assert _same(_take(b, 3), first)                    # same seed -> same batches
    c = make_train_iterator(cfg, seed=5, **kw)
    c.set_state(state)
    assert _same(_take(c, 3), rest)                     # restored -> the very next batches
    d = make_train_iterator(cfg, seed=6, **kw)
    assert not np.array_equal(next(d)["image"], first[0]["image"])
    with pytest.raises(ValueError, match="global_batch_size"):
        make_train_iterator(cfg, seed=5, **{**kw, "global_batch_size": 100}).set_state(state)
