"""Optimizer, schedule, losses, EMA and the train / eval steps, against independent
references (PyTorch for the losses, the timm formulas written out, plain arithmetic)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from deepvit_jax import get_config
from deepvit_jax.models.deepvit import resample_pos_embed
from deepvit_jax.train import state as state_lib
from deepvit_jax.train import step as step_lib
from deepvit_jax.train.config import base_config
from deepvit_jax.train.evaluator import recalibrate_batch_stats
from deepvit_jax.utils import path_str

TINY = dict(image_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=10)


def _opt_cfg(**kw):
    base = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=0.0,
                grad_accum_steps=1)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _plain_mix(key, images, labels, *, num_classes, label_smoothing, **_):
    return images, optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)


def _batch(n=8, seed=0, size=16):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.normal(k1, (n, size, size, 3)),
            "label": jax.random.randint(k2, (n,), 0, 10)}


def test_weight_decay_mask_is_the_official_one():
    cfg = get_config("deepvit_16b", **TINY)
    params = nnx.state(state_lib.build_model(cfg, 0), nnx.Param)
    mask = {path_str(p): bool(v) for p, v in
            jax.tree_util.tree_flatten_with_path(step_lib.weight_decay_mask(params))[0]}
    shapes = {path_str(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key, decay in mask.items():
        name = key.split("/")[-1]
        expected = len(shapes[key]) >= 2 and name not in ("pos_embed", "cls_token")
        assert decay == expected, key
    assert mask["blocks/0/attn/reattn_weight"] is True  # Theta (H, H) is decayed
    assert mask["pos_embed"] is False and mask["cls_token"] is False
    assert mask["blocks/0/attn/reattn_bias"] is False
    assert mask["blocks/0/attn/reattn_norm/scale"] is False
    assert mask["patch_embed/proj/kernel"] is True


def test_adamw_decay_follows_mask():
    # With zero gradients Adam's update is 0, so only decoupled weight decay moves params:
    # p <- p - lr * wd * p where the mask is True, unchanged elsewhere.
    cfg = get_config("deepvit_16b", **TINY)
    params = nnx.state(state_lib.build_model(cfg, 0), nnx.Param)
    tx = step_lib.make_optimizer(_opt_cfg(weight_decay=0.5), lambda _: 0.1)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["pos_embed"][...], params["pos_embed"][...])
    np.testing.assert_allclose(new["blocks"][0]["attn"]["reattn_weight"][...],
                               params["blocks"][0]["attn"]["reattn_weight"][...] * 0.95,
                               rtol=1e-6)


def test_schedule_is_timm_cosine():
    sched = step_lib.cosine_schedule(base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5,
                                     warmup_steps=5, decay_steps=100)

    def timm(t):  # CosineLRScheduler(t_initial=100, warmup_t=5), warmup_prefix=False
        if t < 5:
            return 1e-6 + t * (1e-3 - 1e-6) / 5
        if t >= 100:
            return 1e-5
        return 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 100))

    for t in (0, 1, 4, 5, 6, 50, 99, 100, 105):
        np.testing.assert_allclose(float(sched(t)), timm(t), rtol=1e-5, err_msg=str(t))


def test_soft_target_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    targets = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
    ref = torch.sum(-torch.tensor(targets) * torch.log_softmax(torch.tensor(logits), -1),
                    -1).mean()
    got = step_lib.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


def test_cosine_regulariser_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    maps = [rng.normal(size=(2, 4, 5, 5)).astype(np.float32) for _ in range(15)]
    cos = torch.nn.CosineSimilarity(dim=1)
    ref = np.mean([cos(torch.tensor(maps[i]), torch.tensor(maps[i + 1])).mean().item()
                   for i in range(12)])
    got = step_lib.cosine_regulariser([jnp.asarray(m) for m in maps], 12)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # Fewer blocks than pairs: all consecutive pairs.
    ref3 = np.mean([cos(torch.tensor(maps[i]), torch.tensor(maps[i + 1])).mean().item()
                    for i in range(2)])
    np.testing.assert_allclose(float(step_lib.cosine_regulariser(
        [jnp.asarray(m) for m in maps[:3]], 12)), ref3, rtol=1e-5)


def _setup(ema=0.0, accum=1, reg=0.0, model="deepvit_16b", opt=None, tx_wrap=None, **kw):
    cfg = get_config(model, **{**TINY, **kw})
    sched = step_lib.cosine_schedule(base_lr=1e-3, warmup_lr=1e-3, min_lr=1e-3,
                                     warmup_steps=0, decay_steps=10)
    tx = step_lib.make_optimizer(_opt_cfg(grad_accum_steps=accum, **(opt or {})), sched)
    if tx_wrap is not None:
        tx = tx_wrap(tx)
    md = state_lib.make_model_def(cfg)
    st, rest = jax.jit(lambda: state_lib.init_state(cfg, tx, 0, ema=ema > 0))()
    c = base_config()
    c.mix.label_smoothing, c.ema_decay = 0.1, ema
    c.optim.grad_accum_steps, c.loss.cosine_reg_weight = accum, reg
    step = jax.jit(step_lib.make_train_step(md, tx, sched, c, mix_fn=_plain_mix))
    return md, st, rest, step


def test_train_step_ema_covers_params_and_batch_stats():
    _md, st0, rest, step = _setup(ema=0.9)
    st1, m = step(st0, rest, _batch())
    assert st1.batch_stats  # re-attention BatchNorm statistics exist and moved
    for ema, old, new in ((st1.ema_params, st0.params, st1.params),
                          (st1.ema_batch_stats, st0.batch_stats, st1.batch_stats)):
        for e, o, n in zip(jax.tree.leaves(ema), jax.tree.leaves(old), jax.tree.leaves(new),
                           strict=True):
            np.testing.assert_allclose(e, 0.9 * o + 0.1 * n, rtol=1e-5, atol=1e-7)
    moved = [not np.allclose(o, n) for o, n in
             zip(jax.tree.leaves(st0.batch_stats), jax.tree.leaves(st1.batch_stats), strict=True)]
    assert all(moved)
    assert int(st1.step) == 1 and np.isfinite(float(m["train/loss"]))


def test_ema_moves_once_per_accumulated_update():
    """Gradient accumulation (2 micro-batches) with an EMA, as an ImageNet recipe on fewer
    devices runs it: after the first micro-batch the parameters and the EMA stay; after the
    second the parameters move and the EMA takes one step of decay 0.9 toward them (the
    BatchNorm statistics' EMA follows the statistics, which move every micro-batch)."""
    _md, st0, rest, step = _setup(ema=0.9, accum=2)
    st1, _ = step(st0, rest, _batch(seed=1))
    for a, b in zip(jax.tree.leaves(st1.params), jax.tree.leaves(st0.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(st1.ema_params), jax.tree.leaves(st0.ema_params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    st2, _ = step(st1, rest, _batch(seed=2))
    assert not np.allclose(_param_vector(st2), _param_vector(st1))
    for ema, old, new in ((st2.ema_params, st1.ema_params, st2.params),
                          (st2.ema_batch_stats, st1.ema_batch_stats, st2.batch_stats)):
        for e, o, n in zip(jax.tree.leaves(ema), jax.tree.leaves(old), jax.tree.leaves(new),
                           strict=True):
            np.testing.assert_allclose(e, 0.9 * o + 0.1 * n, rtol=1e-5, atol=1e-7)


# Scale-sensitive AdamW: an eps comparable to the gradients (Adam is otherwise nearly
# invariant to a constant gradient scale) and a clipping norm between the mean gradient's
# norm (2.2-5.1 in these tests) and twice it, so that summing the micro-batches instead
# of averaging them changes the update.
SCALE_SENSITIVE = dict(eps=1e-2, grad_clip_norm=6.0, weight_decay=0.0)


def _param_vector(st):
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(st.params)])


def _halves(b):
    return [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]


def test_gradient_accumulation_equals_large_batch():
    # A model without BatchNorm (plain ViT): 2 micro-batches of 4 == 1 step on 8, for three
    # optimizer updates, with a scale-sensitive optimizer setting.
    batches = [_batch(8, seed=s) for s in range(3)]
    _, st0, rest, step1 = _setup(model="vit_16b", opt=SCALE_SENSITIVE)
    big, norms = st0, []
    for b in batches:
        big, m = step1(big, rest, b)
        norms.append(float(m["train/grad_norm"]))
    # the mean gradient is never clipped, a sum would be
    assert max(norms) < SCALE_SENSITIVE["grad_clip_norm"] < 2 * max(norms), norms
    _, st, rest, step2 = _setup(model="vit_16b", accum=2, opt=SCALE_SENSITIVE)
    for b in batches:
        first, second = _halves(b)
        mid, _ = step2(st, rest, first)
        # After the first micro-batch nothing is applied yet.
        for a, c in zip(jax.tree.leaves(mid.params), jax.tree.leaves(st.params), strict=True):
            np.testing.assert_array_equal(a, c)
        st, _ = step2(mid, rest, second)
    assert int(st.step) == 6
    p0, want, got = _param_vector(st0), _param_vector(big), _param_vector(st)
    err = np.linalg.norm(got - want) / np.linalg.norm(want - p0)
    assert err < 1e-3, err  # relative to how far the parameters moved
    # (test_gradient_accumulation_with_batchnorm shows that a sum moves them > 5% away.)


def test_gradient_accumulation_with_batchnorm():
    """Re-attention BatchNorm normalises each micro-batch with its own statistics (as
    PyTorch accumulation does), so the reference is: the mean of the micro-batch gradients,
    each from a train-mode forward pass on that micro-batch, then one optimizer update;
    the running statistics move once per micro-batch."""
    b = _batch(8, seed=5)
    md, st0, rest, step = _setup(accum=2, opt=SCALE_SENSITIVE)
    st = st0
    for half in _halves(b):
        st, _ = step(st, rest, half)
    assert int(st.step) == 2

    sched = lambda _: 1e-3  # noqa: E731
    tx = step_lib.make_optimizer(_opt_cfg(**SCALE_SENSITIVE), sched)

    def micro(params, stats, batch):
        def loss_fn(p):
            model = md.merge(p, stats, rest, train=True)
            targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], 10), 0.1)
            loss = step_lib.soft_target_cross_entropy(model(batch["image"]), targets)
            return loss, nnx.state(model, nnx.BatchStat)
        return jax.grad(loss_fn, has_aux=True)(params)

    micro = jax.jit(micro)
    stats, grads = st0.batch_stats, []
    for half in _halves(b):
        g, stats = micro(st0.params, stats, half)
        grads.append(g)
    mean = jax.tree.map(lambda a, c: (a + c) / 2, *grads)
    updates, _ = tx.update(mean, tx.init(st0.params), st0.params)
    want = optax.apply_updates(st0.params, updates)
    p0, w, g = _param_vector(st0), np.concatenate(
        [np.ravel(v) for v in jax.tree.leaves(want)]), _param_vector(st)
    assert np.linalg.norm(g - w) / np.linalg.norm(w - p0) < 1e-3
    for a, c in zip(jax.tree.leaves(st.batch_stats), jax.tree.leaves(stats), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    # summing instead: visibly elsewhere
    summed = jax.tree.map(lambda a, c: a + c, *grads)
    updates, _ = tx.update(summed, tx.init(st0.params), st0.params)
    s_vec = np.concatenate([np.ravel(v) for v in jax.tree.leaves(
        optax.apply_updates(st0.params, updates))])
    assert np.linalg.norm(s_vec - w) / np.linalg.norm(w - p0) > 0.05


def test_remat_step_recomputes_the_forward_pass():
    """config.model.remat: the compiled train step computes each block's forward matmuls
    again in the backward pass (more dot ops in the optimised HLO, one extra set per
    block), and the step's result is the same."""
    import re

    b = _batch()
    out, dots = {}, {}
    for remat in (False, True):
        # plain SGD with lr 1: the parameter change is minus the gradient
        _, st, rest, step = _setup(remat=remat, tx_wrap=lambda _: optax.sgd(1.0))
        compiled = step.lower(st, rest, b).compile()
        dots[remat] = len(re.findall(r"= \S+ dot\(", compiled.as_text()))
        new, m = compiled(st, rest, b)
        out[remat] = m, _param_vector(st) - _param_vector(new)
    # qkv, q k^T, the weighing of v, proj, fc1, fc2 at least, for each of the 3 blocks
    assert dots[True] - dots[False] >= 6 * TINY["depth"], dots
    (m1, g1), (m0, g0) = out[True], out[False]
    np.testing.assert_allclose(float(m1["train/loss"]), float(m0["train/loss"]), rtol=1e-6)
    # another compiled program: float32 rounding (measured up to 1e-6, max |g| 0.58)
    np.testing.assert_allclose(g1, g0, rtol=2e-5, atol=1e-5 * np.abs(g0).max())



def test_scan_blocks_step_compiles_one_block_body():
    """config.model.scan_blocks: the compiled train step holds one block body in a loop
    (its dot count does not grow with the depth, unlike the unrolled blocks'), and the
    step's result is the unrolled one."""
    import re

    b = _batch()
    dots, out = {}, {}
    for scan in (False, True):
        for depth in (3, 6):
            _, st, rest, step = _setup(scan_blocks=scan, depth=depth,
                                       tx_wrap=lambda _: optax.sgd(1.0))
            compiled = step.lower(st, rest, b).compile()
            dots[scan, depth] = len(re.findall(r"= \S+ dot\(", compiled.as_text()))
            if depth == 3:
                new, m = compiled(st, rest, b)
                out[scan] = m, _param_vector(st) - _param_vector(new)
    assert dots[True, 6] == dots[True, 3] < dots[False, 3] < dots[False, 6], dots
    (m1, g1), (m0, g0) = out[True], out[False]
    np.testing.assert_allclose(float(m1["train/loss"]), float(m0["train/loss"]), rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=2e-5, atol=1e-5 * np.abs(g0).max())

def test_bfloat16_training_stays_in_a_band_of_float32():
    """config.model.dtype='bfloat16': 8 steps of the train step track the float32 loss
    curve within 2% (and are not the float32 numbers: bf16 is really used)."""
    batches = [_batch(8, seed=s) for s in range(2)]
    curves = {}
    for dtype in ("float32", "bfloat16"):
        _, st, rest, step = _setup(dtype=dtype)
        losses = []
        for i in range(8):
            st, m = step(st, rest, batches[i % 2])
            losses.append(float(m["train/loss"]))
        curves[dtype] = np.array(losses)
    f32, bf16 = curves["float32"], curves["bfloat16"]
    assert f32[-1] < f32[0] - 0.1  # the run learns
    rel = np.abs(bf16 - f32) / f32
    assert rel.max() < 2e-2, rel
    assert rel.max() > 1e-5, rel


@pytest.mark.parametrize("scan", [False, True])
def test_cosine_regulariser_enters_the_loss(scan):
    md, st, rest, step = _setup(reg=0.1, scan_blocks=scan)
    _, m = step(st, rest, _batch())
    np.testing.assert_allclose(float(m["train/loss"]),
                               float(m["train/ce"]) + 0.1 * float(m["train/cosine_reg"]),
                               rtol=1e-6)
    # Independent check of the regulariser value from the model's own attention maps.
    model = md.merge(st.params, st.batch_stats, rest, train=True)
    _, maps = model(_batch()["image"], return_attention=True)
    np.testing.assert_allclose(float(m["train/cosine_reg"]),
                               float(step_lib.cosine_regulariser(maps, 12)), rtol=1e-5)


def test_eval_step_counts_masked_top1_top5():
    md, st, rest, _ = _setup()
    b = _batch(8)
    model = md.merge(st.params, st.batch_stats, rest, train=False)
    logits = np.asarray(model(b["image"]))
    labels = np.asarray(b["label"])
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 1], np.float32)
    order = np.argsort(-logits, axis=1)
    top1 = ((order[:, 0] == labels) * mask).sum()
    top5 = ((order[:, :5] == labels[:, None]).any(1) * mask).sum()
    out = jax.jit(step_lib.make_eval_step(md))(st.params, st.batch_stats, rest,
                                               dict(b, mask=jnp.asarray(mask)))
    assert float(out["count"]) == 6
    assert float(out["top1"]) == top1 and float(out["top5"]) == top5


def test_dropout_randomness_depends_on_step_only():
    # Same state and batch -> same result (resumable); different step -> different draw.
    _, st, rest, step = _setup(drop_path_rate=0.5)
    a, _ = step(st, rest, _batch())
    b, _ = step(st, rest, _batch())
    c, _ = step(st.replace(step=st.step + 1), rest, _batch())
    leaf = lambda s: np.asarray(s.params["head"]["kernel"][...])  # noqa: E731
    np.testing.assert_array_equal(leaf(a), leaf(b))
    assert not np.allclose(leaf(a), leaf(c))


def test_resize_pos_embed_keeps_cls_and_grid():
    pos = np.random.default_rng(0).normal(size=(1, 1 + 4 * 4, 8)).astype(np.float32)
    out = resample_pos_embed(pos, 8)
    assert out.shape == (1, 65, 8)
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])
    # Cubic interpolation reproduces a linear field exactly away from the borders (grid
    # cell centres at (i + 0.5) / g on [0, 1])
    def linear(g):
        c = (np.arange(g) + 0.5) / g
        yy, xx = np.meshgrid(c, c, indexing="ij")
        return (0.3 + 2 * xx - yy).reshape(1, g * g, 1).astype(np.float32)

    src = np.concatenate([np.full((1, 1, 1), 7.0, np.float32), linear(8)], axis=1)
    got = resample_pos_embed(src, 16)[0, 1:, 0].reshape(16, 16)
    np.testing.assert_allclose(got[5:-5, 5:-5], linear(16).reshape(16, 16)[5:-5, 5:-5],
                               atol=1e-5)


def test_bn_stats_step_reestimates_every_batchnorm():
    # Tiny DeepViT-S: two BatchNorms in the CNN stem (over channels) and one in block 1's
    # Re-attention (over the head axis of the attention map).
    from deepvit_jax.models.deepvit import BatchNorm

    cfg = get_config("deepvit_s", image_size=32, depth=2, reattn_blocks=(1,), embed_dim=32,
                     num_heads=4, stem_channels=8, num_classes=10)
    md = state_lib.make_model_def(cfg)
    _, params, stats, rest = state_lib.split_model(state_lib.build_model(cfg, 0))
    # Arbitrary running statistics: the re-estimate must not depend on them.
    stats = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(3), v.shape), stats)
    batches = [_batch(6, seed=s, size=32)["image"] for s in range(3)]

    got = recalibrate_batch_stats(jax.jit(step_lib.make_bn_stats_step(md)), params,
                                  stats, rest, batches)

    # Direct: record every BatchNorm's input in a plain train-mode forward pass (no dropout
    # in this config), take its per-batch mean and unbiased variance, average over batches.
    call = BatchNorm.__call__

    # The reference attention computes the Re-attention map and calls its BatchNorm; the
    # step under test runs the default (folded) one, which never forms the map.
    md_ref = state_lib.make_model_def(cfg.replace(attention_impl="reference"))

    def bn_inputs(params, stats, rest, x):
        m = md_ref.merge(params, stats, rest, train=True)
        names = {id(b): "/".join(map(str, p)) for p, b in nnx.iter_modules(m)
                 if isinstance(b, BatchNorm)}
        seen = {}

        def recording(self, x):
            seen[names[id(self)]] = jnp.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])
            return call(self, x)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(BatchNorm, "__call__", recording)
            m(x)
        return seen

    bn_inputs = jax.jit(bn_inputs)
    inputs = {}
    for x in batches:
        for name, v in bn_inputs(params, stats, rest, x).items():
            inputs.setdefault(name, []).append(np.asarray(v, np.float64))
    assert sorted(inputs) == ["blocks/1/attn/reattn_norm", "patch_embed/bn1", "patch_embed/bn2"]
    flat = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    for name, xs in inputs.items():
        assert len(xs) == len(batches)
        means = [x.mean(0) for x in xs]
        variances = [x.var(0, ddof=1) for x in xs]
        np.testing.assert_allclose(flat[f"{name}/mean"], np.mean(means, 0), rtol=1e-4,
                                   atol=1e-6, err_msg=name)
        np.testing.assert_allclose(flat[f"{name}/var"], np.mean(variances, 0), rtol=1e-4,
                                   atol=1e-7, err_msg=name)


def test_training_with_ema_and_bn_recalibration(tmp_path, caplog):
    # A shortened digits run with EMA and BatchNorm re-estimation on: both models evaluated.
    import importlib.util
    import json
    import pathlib

    from deepvit_jax.train import evaluator as evaluation, loop

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
    spec = importlib.util.spec_from_file_location("cfg_default", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    o = c.model
    o.embed_dim, o.depth, o.num_heads, o.reattn_blocks = 16, 2, 2, (0, 1)
    c.update(dict(batch_size=32, total_steps=2, log_every_steps=2, ema_decay=0.9))
    c.eval.update(dict(every_steps=1000, bn_recalibration_batches=2,
                       bn_recalibration_batch_size=64))
    c.checkpoint.every_steps = 1000
    c.data.update(dict(shuffle_buffer=256, data_dir=str(tmp_path / "tfds")))
    with caplog.at_level("INFO", logger=evaluation.__name__):
        out = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert "re-estimated before each evaluation (live and EMA model) on 2 training batches " \
           "of 64" in caplog.text
    assert out["eval/count"] == 360
    for prefix in ("eval/", "eval/ema_"):
        # percentages of whole counts of the 360 images, top-5 >= top-1
        for k in ("top1", "top5"):
            hits = out[prefix + k] * 360 / 100
            assert abs(hits - round(hits)) < 1e-6, (prefix + k, out[prefix + k])
        assert out[prefix + "top5"] >= out[prefix + "top1"]
    # the EMA model (decay 0.9 over 2 steps) is another model: another loss
    assert out["eval/ema_loss"] != out["eval/loss"]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and "eval/ema_top1" in rows[-1]


def test_input_bound_warning_skips_the_start_up_window(caplog):
    """The first log window holds the input's start-up and the first compile: waiting there
    is no sign of an input-bound run. A later window that waits warns (once per 10 min)."""
    import logging

    from deepvit_jax.train.reporting import StepMeter

    m = {"train/loss": np.float32(2.0), "train/grad_norm": np.float32(1.0),
         "train/lr": np.float32(1e-3)}
    meter = StepMeter(batch_size=4, steps_per_epoch=10)
    with caplog.at_level(logging.WARNING, logger="deepvit_jax.train.reporting"):
        meter.add(1, m, wait_s=5.0)  # more wait than wall time: fraction > 0.25
        first = meter.summary(1)
        assert first["data_wait_fraction"] > StepMeter.WARN_WAIT_FRACTION
        assert not caplog.records
        meter.add(2, m, wait_s=5.0)
        meter.summary(2)
        assert [r.getMessage().split(":")[0] for r in caplog.records] == ["input-bound"]
        meter.add(3, m, wait_s=5.0)
        meter.summary(3)
        assert len(caplog.records) == 1
        assert caplog.records[0].getMessage().endswith("; add host cores")
        # No advice (a CPU backend: input and model share the cores): no warning at all.
        quiet = StepMeter(batch_size=4, steps_per_epoch=10, advice=None)
        for step in (1, 2, 3):
            quiet.add(step, m, wait_s=5.0)
            assert quiet.summary(step)["data_wait_fraction"] > StepMeter.WARN_WAIT_FRACTION
        assert len(caplog.records) == 1


def test_input_advice_names_only_settings_that_would_help():
    from deepvit_jax.data.config import default_data_config, digits_data_config
    from deepvit_jax.train.reporting import input_advice

    imagenet = default_data_config()  # RandAugment + erasing on the host, no cache
    assert input_advice(imagenet, "tpu") == (
        "move RandAugment / erasing to the accelerator (data.device_augment=True), cache a "
        "split that fits in host memory (data.cache=True), or add host cores")
    imagenet.device_augment = True
    assert input_advice(imagenet, "gpu") == (
        "cache a split that fits in host memory (data.cache=True), or add host cores")
    digits = digits_data_config()  # no RandAugment / erasing, cached
    assert input_advice(digits, "gpu") == "add host cores"
    assert input_advice(digits, "cpu") is None  # the embedded default on a CPU: no warning
