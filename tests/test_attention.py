"""Attention implementations against the reference (models/attention/), in float32.

Each fast implementation must give the reference's logits, every parameter's gradient and
the updated BatchNorm statistics within 1e-5 relative (per array, in the 2-norm), on one
device and with the batch sharded over an 8-device CPU mesh (a subprocess with
``--xla_force_host_platform_device_count=8``). The reference itself is checked against
NumPy and PyTorch in tests/test_models.py and tests/test_convert*.py.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deepvit_jax as dj
from deepvit_jax.models import attention
from deepvit_jax.models.attention import folded, xla

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5
IMPLS = ["xla"]  # the Pallas kernels are tested in interpret mode in test_attention_pallas.py

# Small models with every kind of block: DeepViT-S-like (CNN stem, transform_scale,
# adjust_ratio 0.5, plain blocks then Re-attention blocks), DeepViT-16-like (Re-attention
# everywhere, conv patches) and the ViT baseline (plain only).
CONFIGS = {
    "deepvit_s": dict(name="deepvit_s", image_size=48, depth=3, embed_dim=48, num_heads=4,
                      reattn_blocks=(1, 2)),
    "deepvit_16b": dict(name="deepvit_16b", image_size=32, patch_size=8, depth=2,
                        embed_dim=48, num_heads=4),
    "vit_16b": dict(name="vit_16b", image_size=32, patch_size=8, depth=2, embed_dim=48,
                    num_heads=4),
}


def make(name, impl, *, theta_bias=False, **kw):
    kw = {**CONFIGS[name], **kw}
    model = dj.create_model(kw.pop("name"), num_classes=5, attention_impl=impl,
                            rngs=nnx.Rngs(0), **kw)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, dj.models.deepvit.Attention):
            # Sharper attention than at initialisation (nearly uniform maps): a per-head
            # variance of the mixed maps well above BatchNorm's eps, so that its gradient
            # terms matter and fp32 rounding is not amplified by 1/sqrt(var).
            m.qkv.kernel[...] = 8.0 * m.qkv.kernel[...]
            if m.reattention and m.reattn_bias is not None and not theta_bias:
                # Theta's bias cancels in train mode, but an offset of ~0.5 on maps that
                # deviate from their mean by ~1e-2 costs the reference's fp32 variance
                # (mean of (x - mean)^2) digits: ~3e-5 relative error in its own gradients.
                m.reattn_bias[...] = jnp.zeros_like(m.reattn_bias[...])
        if isinstance(m, dj.models.deepvit.BatchNorm):
            m.momentum = 0.0  # the updated statistics are the batch statistics themselves
    return model


def train_outputs(model, x, y):
    """(logits, grads, updated batch statistics) of one training forward/backward."""
    model.train()

    def loss_fn(m):
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return logits, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def assert_close_trees(ref, got, what):
    ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
    got_leaves = jax.tree.leaves(got)
    assert len(ref_leaves) == len(got_leaves)
    for (path, a), b in zip(ref_leaves, got_leaves, strict=True):
        key = jax.tree_util.keystr(path)
        if key.endswith("['reattn_bias']"):
            # Theta's bias cancels in train-mode BatchNorm: its gradient is 0 exactly in the
            # fold and rounding noise (~1e-6 of Theta's) in the reference's autodiff.
            assert np.all(np.asarray(b) == 0), key
            continue
        assert rel_err(a, b) <= RTOL, f"{what} {key}: relative error {rel_err(a, b):.2e}"


def images(b, size, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


def check_parity(name, impl, batch=4, sharding=None, **kw):
    size = CONFIGS[name]["image_size"]
    x, y = images(batch, size), jnp.arange(batch) % 5
    if sharding is not None:
        x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
    results = {}
    for which in ("reference", impl):
        model = make(name, which, **kw)
        graph, state = nnx.split(model)

        @jax.jit
        def run(state, x, y, graph=graph):
            m = nnx.merge(graph, state)
            out = train_outputs(m, x, y)
            m.eval()
            return out, m(x)

        results[which] = run(state, x, y)
    (logits_r, grads_r, stats_r), eval_r = results["reference"]
    (logits_i, grads_i, stats_i), eval_i = results[impl]
    assert rel_err(logits_r, logits_i) <= RTOL
    assert rel_err(eval_r, eval_i) <= RTOL
    assert_close_trees(grads_r, grads_i, "gradient")
    assert_close_trees(stats_r, stats_i, "BatchNorm statistic")
    return grads_r


@pytest.mark.parametrize("impl", IMPLS)
# DeepViT-S-like covers the CNN stem, transform_scale and both block kinds; the
# DeepViT-16-like model (Re-attention everywhere) runs in the tests further down.
@pytest.mark.parametrize("name", ["deepvit_s", "vit_16b"])
def test_parity_with_reference(name, impl):
    grads = check_parity(name, impl)
    # The comparison is not vacuous: Theta and its BatchNorm do get gradient.
    if name != "vit_16b":
        attn = grads["blocks"][CONFIGS[name].get("depth") - 1]["attn"]
        assert np.abs(attn["reattn_weight"]).max() > 1e-4
        assert np.abs(attn["reattn_norm"]["scale"]).max() > 1e-4


@pytest.mark.slow
def test_pallas_parity_with_reference():
    """The dispatcher's 'pallas' path end to end (on CPU: the GPU kernel code in Pallas
    interpret mode; the kernels themselves are tested in test_attention_pallas.py). One
    Re-attention block keeps the interpreter's compile time small."""
    check_parity("deepvit_16b", "pallas", batch=2, depth=1)


def test_sharded_parity_on_8_devices():
    """The fold's H x H statistics are global under a sharded batch (subprocess, 8 CPUs):
    XLA's sums for 'xla'; per-shard Pallas passes with a psum for 'pallas'."""
    if os.environ.get("DEEPVIT_ATTENTION_MESH_CHILD"):
        assert jax.device_count() == 8
        # Auto axes, as deepvit_jax/parallel.py builds the training mesh.
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        check_parity("deepvit_s", "xla", batch=8, sharding=sharding)  # plain + Re-attention
        # Pallas under the context mesh: each pass per shard, the H x H sums psum-ed
        with jax.set_mesh(mesh):
            check_parity("deepvit_16b", "pallas", batch=8, sharding=sharding, depth=1)
            q = jax.device_put(jnp.ones((8, 2, 5, 4)), sharding)
            jaxpr = str(jax.make_jaxpr(
                lambda q: attention.passes("pallas").stats(q, q, scale=1.0))(q))
        assert "shard_map" in jaxpr and "psum" in jaxpr
        return
    env = {**os.environ, "DEEPVIT_ATTENTION_MESH_CHILD": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_sharded_parity_on_8_devices"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def batchnorm_reattention(a, v, w, bias, gamma, beta, eps):
    """BatchNorm_train(W A + b) weighing v, written out in jnp (the oracle of the fold):
    (out, biased batch variance of the mixed maps)."""
    mixed = jnp.einsum("oh,bhij->boij", w, a) + bias[None, :, None, None]
    mean = mixed.mean(axis=(0, 2, 3), keepdims=True)
    var = jnp.mean((mixed - mean) ** 2, axis=(0, 2, 3))
    normed = (mixed - mean) * jax.lax.rsqrt(var[None, :, None, None] + eps)
    normed = normed * gamma[None, :, None, None] + beta[None, :, None, None]
    return jnp.einsum("boij,bojd->boid", normed, v), var


def test_folded_vjp_matches_autodiff_of_batchnorm():
    """The custom VJP alone, on random heads-major q, k, v, against autodiff of
    BatchNorm_train(W A + b) written out in jnp (the cotangent of the returned variance
    included)."""
    kq, kk, kv, kw, kd = jax.random.split(jax.random.key(3), 5)
    b, h, n, d = 2, 3, 7, 5
    q, k, v = (2 * jax.random.normal(key, (b, h, n, d)) for key in (kq, kk, kv))
    w = jax.random.normal(kw, (h, h))
    gamma, beta, bias = jnp.array([1.2, 0.7, 0.9]), jnp.array([0.1, -0.2, 0.3]), jnp.ones(h)
    dout = jax.random.normal(kd, (b, h, n, d))
    eps, scale = 1e-5, d**-0.5

    def unfolded(q, k, v, w, gamma, beta):
        a = jax.nn.softmax(jnp.einsum("bhid,bhjd->bhij", q, k) * scale, axis=-1)
        return batchnorm_reattention(a, v, w, bias, gamma, beta, eps)

    def fold(q, k, v, w, gamma, beta):
        return folded.reattention_train(attention.XLA_PASSES, scale, eps, q, k, v, w, gamma,
                                        beta)

    def loss(f):
        def fn(*args):
            out, var = f(*args)
            return jnp.sum(out * dout) + jnp.sum(var * jnp.array([3.0, -1.0, 2.0]))
        return fn

    args = (q, k, v, w, gamma, beta)
    (out_r, var_r), (out_f, var_f) = unfolded(*args), fold(*args)
    assert rel_err(out_r, out_f) <= RTOL and rel_err(var_r, var_f) <= RTOL
    g_r = jax.jit(jax.grad(loss(unfolded), argnums=tuple(range(6))))(*args)
    g_f = jax.jit(jax.grad(loss(fold), argnums=tuple(range(6))))(*args)
    for name, a, bb in zip(["q", "k", "v", "W", "gamma", "beta"], g_r, g_f, strict=True):
        assert rel_err(a, bb) <= RTOL, (name, rel_err(a, bb))


@pytest.mark.parametrize("form", ["einsum", "fma"])
def test_xla_mixing_forms_agree(form, monkeypatch):
    monkeypatch.setattr(xla, "MIXING", form)
    maps = jax.random.uniform(jax.random.key(0), (2, 4, 6, 6))
    mix = jax.random.normal(jax.random.key(1), (4, 4))
    want = np.einsum("oh,bhij->boij", np.asarray(mix, np.float64), np.asarray(maps, np.float64))
    np.testing.assert_allclose(np.asarray(xla.mix_heads(mix, maps)), want, rtol=1e-5, atol=1e-6)


def test_return_attention_gives_the_reference_maps():
    name = "deepvit_s"  # plain and Re-attention blocks
    x = images(2, CONFIGS[name]["image_size"])
    maps = {}
    for impl in ("reference", "xla"):
        model = make(name, impl)
        model.eval()
        logits, maps[impl] = model(x, return_attention=True)
        # The maps come from the reference formulas; the logits are the same either way.
        assert rel_err(logits, model(x)) <= RTOL
    for a, b in zip(maps["reference"], maps["xla"], strict=True):
        assert rel_err(a, b) <= RTOL
    assert all(m is not None and m.shape[1] == 4 for m in maps["xla"])


def test_running_mean_includes_theta_bias():
    """The fold's batch mean rowsum(W)/N + b equals the reference's mean over the maps."""
    x = images(4, 32)
    stats = []
    for impl in ("reference", "xla"):
        model = make("deepvit_16b", impl, theta_bias=True)
        model.train()
        model(x)
        stats.append([np.asarray(b.attn.reattn_norm.mean[...]) for b in model.blocks])
    assert np.abs(stats[0][0]).max() > 0.05  # the bias moves the mean
    for a, b in zip(*stats, strict=True):
        assert rel_err(a, b) <= RTOL


def test_fallbacks_to_reference_are_the_reference():
    """Attention dropout in training and vit-pytorch's LayerNorm variant take the reference
    path: the same random draws give bit-identical results."""
    x = images(2, 32)
    for kw in (dict(attn_drop_rate=0.3), dict(reattn_norm="layernorm", reattn_bias=False)):
        outs = []
        for impl in ("reference", "xla"):
            model = make("deepvit_16b", impl, **kw)
            model.train()
            outs.append(np.asarray(model(x)))
        np.testing.assert_array_equal(outs[0], outs[1])


def test_auto_resolves_per_backend_and_config_round_trips():
    assert attention.resolve("auto", "cpu") == "xla"
    assert attention.resolve("reference") == "reference"
    cfg = dj.get_config("deepvit_s", attention_impl="xla")
    assert dj.ModelConfig.from_dict(cfg.to_dict()) == cfg
    # config.json files written before the field existed load with the default.
    old = {k: v for k, v in cfg.to_dict().items() if k != "attention_impl"}
    assert dj.ModelConfig.from_dict(old).attention_impl == "auto"
    with pytest.raises(ValueError, match=r"attention_impl: 'flash' is not one of"):
        dj.get_config("deepvit_s", attention_impl="flash")
