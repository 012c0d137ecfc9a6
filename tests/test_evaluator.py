"""The loop's evaluation with on-device augmentation: BatchNorm re-estimation must see the
same images whether the host or the device normalises them."""

import importlib.util
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_default(tmp_path, **data):
    spec = importlib.util.spec_from_file_location("cfg_default", ROOT / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    m = c.model
    m.embed_dim, m.depth, m.num_heads, m.reattn_blocks = 16, 2, 2, (0, 1)
    c.update(dict(batch_size=32, total_steps=2, log_every_steps=2, ema_decay=0.0,
                  collapse_every_steps=0))
    c.eval.update(dict(every_steps=1000, bn_recalibration_batches=2,
                       bn_recalibration_batch_size=64))
    c.checkpoint.every_steps = 1000
    c.data.update(dict(shuffle_buffer=256, data_dir=str(tmp_path / "tfds"), **data))
    return c


def test_bn_recalibration_applies_the_device_augmentation(tmp_path):
    """With RandAugment and erasing off, device augmentation is only the normalisation: the
    BatchNorm statistics re-estimated before an evaluation equal the host-only run's.
    Feeding the raw uint8 crops to the re-estimation would change them."""
    import jax

    from deepvit_jax.train import loop
    from deepvit_jax.utils import path_str

    def peaky(path, v):  # sharp attention maps, so their statistics depend on the images
        return v * 50.0 if "qkv" in path_str(path) else v

    stats = []
    for name, data in (("host", {}), ("device", {"device_augment": True})):
        run = loop.setup(_tiny_default(tmp_path, **data), str(tmp_path / name))
        params = jax.tree_util.tree_map_with_path(peaky, run.state.params)
        got = run.evaluator.batch_stats_for(params, run.state.batch_stats)
        stats.append(jax.tree.leaves(jax.device_get(got)))
        run.checkpointer.close()
    assert len(stats[0]) == 4  # mean and var of the two Re-attention BatchNorms
    assert min(float(v.min()) for v in stats[0][1::2]) > 1e-3  # variances far from uniform
    for host, dev in zip(*stats, strict=True):
        np.testing.assert_allclose(dev, host, rtol=1e-4, atol=1e-7)
