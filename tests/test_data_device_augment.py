"""On-device RandAugment / erasing (data/device_augment.py) against the host ops (augment.py,
themselves tested against PIL and timm): op by op on the same image and magnitude, draws by
their statistics, reproducibility from the key, and the host + device split of the recipe."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deepvit_jax.data import augment as A
from deepvit_jax.data import device_augment as D
from deepvit_jax.data.config import default_data_config

FILL = (124, 116, 104)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ALL_OPS = sorted(set(A.RAND_TRANSFORMS) | set(A.RAND_INCREASING_TRANSFORMS))


@pytest.fixture(scope="module")
def img():
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.coffee()).resize((96, 64), Image.BICUBIC))


def _cfg(**kw):
    cfg = default_data_config()
    cfg.device_augment = True
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_level_table_is_the_hosts():
    for name in ALL_OPS:
        for level in (0.0, 4.3, 9.0, 10.0):
            for neg in (False, True):
                assert float(D.level_to_arg(name, level, neg)) == pytest.approx(
                    float(A.level_to_arg(name, level, neg)), abs=1e-6), (name, level, neg)


@pytest.mark.parametrize("name", ALL_OPS)
def test_each_op_matches_host(img, name):
    """Pixel-wise ops: identical (autocontrast: float rounding may move a pixel by one grey
    level); geometric ops: the same warp, rare pixels one grey level apart."""
    op = jax.jit(lambda x, a: D.apply_op(name, x, a, FILL))
    for level, neg in ((9.3, False), (6.1, True)):
        arg_h = A.level_to_arg(name, level, neg)
        ref = A.apply_op(name, tf.constant(img), arg_h, tf.constant(FILL, tf.float32))
        out = np.asarray(op(img, D.level_to_arg(name, level, neg))).astype(int)
        d = np.abs(out - ref.numpy().astype(int))
        assert out.shape == img.shape
        if name in GEOMETRIC or name == "AutoContrast":
            assert d.max() <= 1 and (d > 0).mean() < 1e-3, (name, d.max(), (d > 0).mean())
        else:
            assert d.max() == 0, (name, level, neg)
    # and the op did something (an identity would pass the comparison too)
    assert np.abs(out - img.astype(int)).mean() > 0.5, name


def _host_draws(n):
    params = A.parse_randaugment("rand-m9-mstd0.5-inc1")
    seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.fill([n], tf.constant(5, tf.int64))], 1)
    draw = tf.function(lambda s: tf.map_fn(
        lambda x: tuple(tf.cast(v, tf.float32) for v in A.draw_layer(x, params)), s,
        fn_output_signature=(tf.float32,) * 4))
    return [v.numpy() for v in draw(seeds)]


def test_draws_have_the_hosts_distribution():
    n = 3000
    params = A.parse_randaugment("rand-m9-mstd0.5-inc1")
    keys = jax.random.split(jax.random.key(0), n)
    dev = [np.asarray(v, np.float64) for v in jax.vmap(lambda k: D.draw_layer(k, params))(keys)]
    host = _host_draws(n)
    for draws in (dev, host):
        op, apply, level, negate = draws
        counts = np.bincount(op.astype(int), minlength=15)
        assert len(counts) == 15 and counts.min() > 0
        # each op 1/15: binomial sd sqrt(n p (1 - p)) ~ 13.7; 4.5 sd
        assert np.abs(counts - n / 15).max() < 62
        assert abs(apply.mean() - 0.5) < 0.03 and abs(negate.mean() - 0.5) < 0.03
        assert abs(level.mean() - 8.996) < 0.03 and abs(level.std() - 0.48) < 0.03
        assert level.max() <= 10.0
    for a, b in zip(dev, host, strict=True):       # the two samplers agree with each other
        assert abs(a.mean() - b.mean()) < 0.05 * max(1.0, abs(b.mean()))


def test_erasing_has_the_hosts_distribution():
    size, n = 32, 600
    zeros = jnp.zeros((size, size, 3))
    keys = jax.random.split(jax.random.key(1), n)
    dev = np.asarray(jax.jit(jax.vmap(
        lambda k: D.random_erasing(k, zeros, probability=0.5)))(keys))
    host_fn = tf.function(lambda seeds: tf.map_fn(lambda s: A.random_erasing(
        tf.zeros((size, size, 3)), s, probability=0.5), seeds, fn_output_signature=tf.float32))
    host = host_fn(tf.stack([tf.range(n // 2, dtype=tf.int64),
                             tf.fill([n // 2], tf.constant(9, tf.int64))], 1)).numpy()

    def stats(batch):
        masks = np.any(batch != 0, axis=-1)
        hit = masks.reshape(len(batch), -1).any(1)
        areas, ratios = [], []
        for m in masks[hit]:
            rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
            h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            assert m.sum() == h * w and h < size and w < size        # one box, inside
            areas.append(h * w / size**2)
            ratios.append(math.log(h / w))
        noise = np.concatenate([x[m] for m, x in zip(masks[hit], batch[hit], strict=True)])
        return hit.mean(), np.mean(areas), np.mean(ratios), noise.std()

    d, h = stats(dev), stats(host)
    assert abs(d[0] - 0.5) < 0.07 and abs(h[0] - 0.5) < 0.1      # erased with p = 0.5
    assert abs(d[1] - h[1]) < 0.035                               # mean area (~0.16)
    assert abs(d[2]) < 0.15 and abs(h[2]) < 0.2                   # aspect symmetric in log
    assert abs(d[3] - 1.0) < 0.05 and abs(h[3] - 1.0) < 0.05      # N(0, 1) noise


@pytest.fixture(scope="module")
def aug16():
    """The recipe with erasing always on, jitted once for the module (16 px)."""
    return jax.jit(D.make_device_augment(_cfg(random_erasing=1.0), image_size=16,
                                         mean=(0.5,) * 3, std=(0.25,) * 3))


def _images(n):
    return jax.random.randint(jax.random.key(3), (n, 16, 16, 3), 0, 256).astype(jnp.uint8)


def test_reproducible_from_the_key(aug16):
    fn = aug16
    images = _images(8)
    key = jax.random.key(7)
    a = np.asarray(fn(key, images))
    b = np.asarray(fn(key, images))
    d = np.asarray(fn(jax.random.key(8), images))
    assert a.dtype == np.float32 and a.shape == (8, 16, 16, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - d).mean() > 0.05
    # an example's result depends on its position and the key only, not on its batch-mates
    e = np.asarray(fn(key, images.at[3:].set(0)))
    np.testing.assert_array_equal(a[:3], e[:3])


def test_jit_equals_no_jit(img):
    """RandAugment (one op of each kind) and erasing give the same numbers op by op (no jit)
    as compiled."""
    params = dict(A.parse_randaugment("rand-m9-mstd0.5-inc1"), num_layers=4,
                  transforms=("Rotate", "Equalize", "ColorIncreasing", "SharpnessIncreasing",
                              "SolarizeAdd"))
    x = jnp.asarray(img[:24, :24])

    def f(key):
        y = D.randaugment(key, x, params, FILL)
        return y, D.random_erasing(key, y.astype(jnp.float32), probability=1.0)

    key = jax.random.key(2)
    (a, ea), (b, eb) = f(key), jax.jit(f)(key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(ea), np.asarray(eb), atol=1e-6)
    assert np.abs(np.asarray(a, float) - x).mean() > 1.0        # some op was applied


def test_same_across_shardings(aug16, tmp_path):
    """This process (1 device) vs the batch sharded over 4 CPU devices in a fresh process (the
    device count is fixed at start-up)."""
    code = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from deepvit_jax.data import device_augment as D
        from deepvit_jax.data.config import default_data_config
        cfg = default_data_config(); cfg.device_augment = True; cfg.random_erasing = 1.0
        fn = jax.jit(D.make_device_augment(cfg, image_size=16, mean=(0.5,) * 3,
                                           std=(0.25,) * 3))
        x = jax.random.randint(jax.random.key(3), (8, 16, 16, 3), 0, 256).astype(jnp.uint8)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        sharded = fn(jax.random.key(1), jax.device_put(x, NamedSharding(mesh, P("data"))))
        assert len(sharded.sharding.device_set) == 4, sharded.sharding
        np.save(sys.argv[1], np.asarray(sharded))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sharded.npy")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    one = np.asarray(aug16(jax.random.key(1), _images(8)))
    np.testing.assert_array_equal(one, np.load(tmp_path / "sharded.npy"))


def test_host_plus_device_is_the_host_recipe(img):
    """With RandAugment and erasing off, host (device_augment) + device == the host-only
    recipe exactly: same crop, resize, flip stream, same normalisation."""
    enc = tf.io.encode_jpeg(tf.constant(img))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = _cfg(randaugment="", random_erasing=0.0)
    host_part = A.make_train_augment(cfg, image_size=24, mean=mean, std=std)
    dev = D.make_device_augment(cfg, image_size=24, mean=mean, std=std)
    cfg_host = _cfg(randaugment="", random_erasing=0.0, device_augment=False)
    full = A.make_train_augment(cfg_host, image_size=24, mean=mean, std=std)
    seeds = [tf.constant([i, 4], tf.int64) for i in range(4)]
    u8 = np.stack([host_part(enc, s).numpy() for s in seeds])
    assert u8.dtype == np.uint8 and u8.shape == (4, 24, 24, 3)
    ref = np.stack([full(enc, s).numpy() for s in seeds])
    np.testing.assert_allclose(np.asarray(jax.jit(dev)(jax.random.key(0), u8)), ref, atol=1e-6)


def test_switch_and_bad_input():
    cfg = default_data_config()
    assert D.make_device_augment(cfg, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3) is None
    fn = D.make_device_augment(_cfg(), image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=r"\(B, 8, 8, 3\)"):
        fn(jax.random.key(0), jnp.zeros((2, 16, 16, 3), jnp.uint8))
    with pytest.raises(ValueError, match="uint8"):
        fn(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.float32))
    with pytest.raises(ValueError, match="erasing_mode"):
        D.make_device_augment(_cfg(erasing_mode="noise"), image_size=8, mean=(0.5,) * 3,
                              std=(0.5,) * 3)
