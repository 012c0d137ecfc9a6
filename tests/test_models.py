"""Model tests: variants, parameter counts, Re-attention maths, BatchNorm, training behaviour.

Parity with the official PyTorch code lives in tests/test_convert*.py; here the references
are the paper's formulas written in NumPy and the official parameter counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deepvit_jax as dj
from deepvit_jax.models.deepvit import Attention, ModelConfig

# Official parameter counts, counted from the released code (github.com/zhoudaquan/dvit_repo).
OFFICIAL_PARAMS = {
    "deepvit_16b": 24_426_664,
    "deepvit_24b": 36_261_448,
    "deepvit_32b": 48_096_232,
    "deepvit_s": 27_312_632,
    "deepvit_l": 58_883_708,
    "deepvit_l_384": 59_043_308,
}


def tiny(**kw):
    """A tiny DeepViT: 32 px, 4 blocks, Re-attention on blocks 2-3."""
    args = dict(image_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4,
                reattn_blocks=(2, 3), num_classes=10)
    args.update(kw)
    return dj.create_model("deepvit_16b", rngs=nnx.Rngs(0), **args)


def images(b=2, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


def test_list_models_has_every_variant():
    assert set(dj.list_models()) == set(OFFICIAL_PARAMS) | {"vit_16b", "vit_24b", "vit_32b"}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name):
    # eval_shape builds the module abstractly: exact counts without allocating 59M floats.
    model = nnx.eval_shape(lambda: dj.create_model(name))
    assert dj.count_params(model) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("depth", [16, 24, 32])
def test_vit_baselines_have_180_fewer_params_per_block(depth):
    model = nnx.eval_shape(lambda: dj.create_model(f"vit_{depth}b"))
    assert dj.count_params(model) == OFFICIAL_PARAMS[f"deepvit_{depth}b"] - 180 * depth
    # ...and no BatchNorm statistics at all (24 per Re-attention block in DeepViT).
    assert not jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    deep = nnx.eval_shape(lambda: dj.create_model(f"deepvit_{depth}b"))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(deep, nnx.BatchStat))) == 24 * depth


@pytest.mark.parametrize("name", dj.list_models())
def test_every_variant_builds_and_runs(name):
    # Full width and depth, small images (the CNN stem and patch 16 allow 32 px).
    model = dj.create_model(name, image_size=32, num_classes=7)
    cfg = model.config
    model.eval()
    logits, maps = model(images(2, 32), return_attention=True)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert len(maps) == cfg.depth
    assert all(m.shape == (2, 12, 5, 5) for m in maps)
    assert np.isfinite(np.asarray(logits)).all()
    types = ["reattn" if hasattr(b.attn, "reattn_weight") else "plain" for b in model.blocks]
    assert types == ["reattn" if i in cfg.reattn_indices else "plain" for i in range(cfg.depth)]
    expected_reattn = {"deepvit_s": 5, "deepvit_l": 12, "deepvit_l_384": 12}.get(
        name, 0 if name.startswith("vit") else cfg.depth)
    assert types.count("reattn") == expected_reattn


def test_norm_eps_per_variant():
    """Official code: LayerNorm eps 1e-6 everywhere, BatchNorm eps 1e-5 (stem and
    Re-attention), in every variant's config and in every norm module built from it.
    test_convert.py::test_norm_eps_pinned_by_parity shows that each value matters."""
    from deepvit_jax.models.deepvit import BatchNorm

    for name in dj.list_models():
        cfg = dj.get_config(name)
        assert (cfg.ln_eps, cfg.bn_eps, cfg.reattn_norm_eps) == (1e-6, 1e-5, 1e-5), name
    # Modules: a conv-patch DeepViT, a CNN-stem DeepViT-S and a ViT, shortened to 2 blocks.
    for name, reattn in (("deepvit_16b", (0, 1)), ("deepvit_s", (1,)), ("vit_16b", ())):
        model = nnx.eval_shape(lambda name=name, reattn=reattn: dj.create_model(
            name, image_size=32, depth=2, reattn_blocks=reattn, num_classes=2))
        cfg = model.config
        lns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.LayerNorm)]
        bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
        assert len(lns) == 2 * cfg.depth + 1, name
        assert len(bns) == len(reattn) + 2 * (cfg.patch_embed == "cnn_stem"), name
        assert {m.epsilon for m in lns} == {1e-6}, name
        assert {m.epsilon for m in bns} == ({1e-5} if bns else set()), name


def test_variant_structure_matches_reference_table():
    s, large = dj.get_config("deepvit_s"), dj.get_config("deepvit_l")
    assert (s.embed_dim, s.dim_head, s.reattn_blocks, s.transform_scale, s.adjust_ratio,
            s.patch_embed) == (396, 33, (11, 12, 13, 14, 15), True, 0.5, "cnn_stem")
    assert (large.embed_dim, large.dim_head, large.reattn_blocks, large.adjust_ratio) == (
        420, 35, tuple(range(20, 32)), 0.5)
    l384 = dj.get_config("deepvit_l_384")
    assert (l384.image_size, l384.crop_pct, l384.num_tokens) == (384, 1.0, 577)
    assert dj.get_config("deepvit_patch16_224_re_attn_24b") == dj.get_config("deepvit_24b")


# ----------------------------------------------------------------------------------------
# Re-attention maths against NumPy
# ----------------------------------------------------------------------------------------


def numpy_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, theta=None, theta_b=None,
                    bn=None, eps=1e-5, scale_map=1.0):
    """The paper's (Re-)attention in NumPy float64, step by step as in the official code."""
    b, n, _ = x.shape
    hd = qkv_w.shape[1] // 3 // heads
    qkv = (x @ qkv_w + qkv_b).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    if theta is not None:
        a = np.einsum("oh,bhij->boij", theta, a) + theta_b[None, :, None, None]
        gamma, beta, mean, var = bn
        a = (a - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
        a = (a * gamma[None, :, None, None] + beta[None, :, None, None]) * scale_map
    out = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, heads * hd)
    return out @ proj_w + proj_b, a


def _attention(reattention, transform_scale=False, seed=0):
    cfg = ModelConfig(embed_dim=24, num_heads=4, transform_scale=transform_scale)
    attn = Attention(cfg, reattention=reattention, rngs=nnx.Rngs(seed))
    attn.eval()
    return attn


def _np(p):
    return np.asarray(p[...], np.float64)


@pytest.mark.parametrize("transform_scale", [False, True])
def test_reattention_matches_numpy_formula(transform_scale):
    attn = _attention(True, transform_scale)
    rng = np.random.default_rng(0)
    # Random (non-identity) Theta and BatchNorm statistics and affine parameters.
    bn = attn.reattn_norm
    for var, value in [(bn.scale, rng.uniform(0.5, 1.5, 4)), (bn.bias, rng.normal(0, .1, 4)),
                       (bn.mean, rng.normal(0, .1, 4)), (bn.var, rng.uniform(.01, .2, 4))]:
        var[...] = jnp.asarray(value, jnp.float32)
    x = rng.normal(size=(2, 9, 24)).astype(np.float32)
    out, a = attn(jnp.asarray(x), return_attention=True)  # maps: the reference formulas
    ref_out, ref_a = numpy_attention(
        x.astype(np.float64), _np(attn.qkv.kernel), _np(attn.qkv.bias), _np(attn.proj.kernel),
        _np(attn.proj.bias), 4, theta=_np(attn.reattn_weight), theta_b=_np(attn.reattn_bias),
        bn=[_np(bn.scale), _np(bn.bias), _np(bn.mean), _np(bn.var)],
        scale_map=6**-0.5 if transform_scale else 1.0)
    np.testing.assert_allclose(np.asarray(a), ref_a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)
    # The default implementation (no maps returned) computes the same output.
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))[0]), ref_out, atol=1e-5,
                               rtol=1e-5)
    # The mixed map is not re-normalised: its rows do not sum to 1.
    assert np.abs(np.asarray(a).sum(-1) - 1).max() > 1e-2


def test_plain_attention_matches_numpy_and_rows_sum_to_one():
    attn = _attention(False)
    x = np.random.default_rng(1).normal(size=(2, 9, 24)).astype(np.float32)
    out, a = attn(jnp.asarray(x), return_attention=True)
    ref_out, _ = numpy_attention(x.astype(np.float64), _np(attn.qkv.kernel),
                                     _np(attn.qkv.bias), _np(attn.proj.kernel),
                                     _np(attn.proj.bias), 4)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, atol=1e-6)
    assert (np.asarray(a) >= 0).all()


def test_identity_reattention_equals_plain_attention():
    """Theta = I, zero bias, BatchNorm at its initial statistics, eval mode: plain attention."""
    plain = _attention(False, seed=3)
    re = _attention(True, seed=3)
    nnx.update(re, nnx.state(plain))  # same qkv / proj weights
    re.reattn_weight[...] = jnp.eye(4)
    re.reattn_bias[...] = jnp.zeros(4)
    x = jax.random.normal(jax.random.key(0), (2, 9, 24))
    (out_p, a_p), (out_r, a_r) = plain(x, return_attention=True), re(x, return_attention=True)
    np.testing.assert_allclose(np.asarray(a_r), np.asarray(a_p), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(out_r), np.asarray(out_p), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------
# BatchNorm semantics
# ----------------------------------------------------------------------------------------


def test_reattention_batchnorm_train_mode_uses_and_moves_batch_statistics():
    attn = _attention(True)
    attn.train()
    # Large inputs give peaked softmax maps, so the per-head variance is not tiny.
    x = 10 * jax.random.normal(jax.random.key(5), (3, 9, 24))
    _, a = attn(x, return_attention=True)
    # Recompute the mixed, un-normalised map and its per-head statistics in NumPy.
    attn.eval()
    bn = attn.reattn_norm
    saved = bn.mean[...], bn.var[...]
    bn.mean[...] = jnp.zeros(4)  # identity BatchNorm: (x - 0) / sqrt(1 - eps + eps)
    bn.var[...] = jnp.ones(4) - bn.epsilon
    _, mixed = attn(x, return_attention=True)
    mixed = np.asarray(mixed, np.float64)
    mu = mixed.mean(axis=(0, 2, 3))
    var = mixed.var(axis=(0, 2, 3))
    expected = (mixed - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(np.asarray(a), expected, atol=2e-5)
    n = mixed.size // 4
    np.testing.assert_allclose(np.asarray(saved[0]), 0.1 * mu, atol=1e-6)
    np.testing.assert_allclose(np.asarray(saved[1]), 0.9 + 0.1 * var * n / (n - 1), atol=1e-6)


def test_stem_batchnorm_train_vs_eval():
    model = dj.create_model("deepvit_s", image_size=32, depth=2, reattn_blocks=(1,),
                            num_classes=5)
    x = images(4, 32)
    model.eval()
    before = model(x)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(before))  # eval: stateless
    model.train()
    model(x)
    model.eval()
    after = model(x)
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-4  # running stats moved
    assert float(jnp.abs(model.patch_embed.bn1.mean[...]).max()) > 0


# ----------------------------------------------------------------------------------------
# Training behaviour
# ----------------------------------------------------------------------------------------


def test_gradients_finite_and_tiny_model_overfits_one_batch():
    model = tiny()
    model.train()
    x = images(8, 32, seed=1)
    y = jnp.arange(8) % 10
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    first, grads = step(model, opt, x, y)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # Theta and its BatchNorm receive gradient.
    assert float(jnp.abs(grads["blocks"][3]["attn"]["reattn_weight"][...]).max()) > 0
    for _ in range(60):
        loss, _ = step(model, opt, x, y)
    model.eval()
    acc = float((model(x).argmax(-1) == y).mean())
    assert float(loss) < 0.1 * float(first) and acc == 1.0


def test_jit_and_eager_agree():
    model = tiny()
    model.eval()
    x = images(2, 32)
    eager = model(x)
    jitted = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


def test_remat_gives_the_same_logits_and_gradients():
    x, y = images(2, 32), jnp.array([1, 2])

    @nnx.jit
    def logits_and_grads(model):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        return model(x), nnx.grad(loss_fn)(model)

    (l1, g1), (l2, g2) = logits_and_grads(tiny()), logits_and_grads(tiny(remat=True))
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), rtol=0, atol=1e-6)
    # Another compiled program: float32 rounding, measured up to 4e-6 (on the key bias,
    # whose gradient is 0 in exact arithmetic): bounded relative to the largest gradient.
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5 * scale)
    # (test_train.py::test_remat_step_recomputes_the_forward_pass: the compiled step.)



@pytest.mark.parametrize("remat", [False, True])
def test_scan_blocks_is_the_same_model(remat):
    """model.scan_blocks: the runs of alike blocks (here plain 0-1, Re-attention 2-3) as
    scans give, over two train steps with drop path and Re-attention's BatchNorm, the same
    loss, gradients and state (parameters, BatchNorm statistics, every rng count) as the
    unrolled blocks, and the same eval logits and attention maps; the parameter layout is
    the unrolled one (same checkpoints)."""
    x, y = images(4, 32, seed=1), jnp.arange(4) % 10

    @nnx.jit
    def step(model):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        return nnx.value_and_grad(loss_fn)(model)

    runs = {}
    for scan in (False, True):
        model = tiny(drop_path_rate=0.3, remat=remat, scan_blocks=scan)
        steps = [step(model) for _ in range(2)]
        train_state = nnx.state(model)
        model.eval()
        first = model(x, return_attention=True, attention_blocks=3)[1]   # runs 0-1, 2 | 3
        runs[scan] = steps, train_state, model(x, return_attention=True), first
    (steps0, st0, (lo0, maps0), _), (steps1, st1, (lo1, maps1), first) = runs[False], runs[True]
    assert len(first) == 3 and len(runs[False][3]) == 3
    for a, b in zip(maps0[:3], first, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    for (l0, g0), (l1, g1) in zip(steps0, steps1, strict=True):
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
        # another compiled program: float32 rounding (measured up to 4e-6)
        scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g0))
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4,
                                       atol=2e-5 * scale)
    flat0, flat1 = nnx.to_flat_state(st0), nnx.to_flat_state(st1)
    assert [k for k, _ in flat0] == [k for k, _ in flat1]
    counts = 0
    for (path, v0), (_, v1) in zip(flat0, flat1, strict=True):
        a, b = v0[...], v1[...]
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        if path[-1] == "count":
            counts += int(a) > 0
            assert int(a) == int(b), path     # each block's dropout stream, used alike
        else:
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                       err_msg=str(path))
    assert counts == 3          # blocks 1-3 drew drop-path masks; block 0 (rate 0) did not
    np.testing.assert_allclose(np.asarray(lo1), np.asarray(lo0), rtol=0, atol=1e-5)
    assert len(maps1) == len(maps0) == 4
    for a, b in zip(maps0, maps1, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)

def test_dropout_and_drop_path_only_in_train_mode():
    model = tiny(drop_path_rate=0.5, drop_rate=0.2, attn_drop_rate=0.2)
    x = images(4, 32)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    model.train()
    a, b = model(x), model(x)  # fresh dropout keys each call
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def _matmul_dtypes(model, x):
    """(primitive, operand dtypes) of every dot_general / convolution in the traced forward
    pass, sub-jaxprs included."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr
    found = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append((e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars)))
            for v in e.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr)
    return found


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_bfloat16_compute_keeps_float32_params_and_logits(impl):
    from deepvit_jax.models.deepvit import Block

    model = tiny(dtype="bfloat16", attention_impl=impl)
    model.eval()
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # The activations are bfloat16: the residual stream entering every block, and the
    # operands of the patch convolution and of every Linear (qkv, proj, fc1, fc2 per block,
    # head). Only the Re-attention head mixing of the reference maps stays float32.
    seen, call = [], Block.__call__

    def recording(self, x, **kw):
        seen.append(x.dtype)
        return call(self, x, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Block, "__call__", recording)
        ops = _matmul_dtypes(model, images(2, 32))
    assert seen == [jnp.bfloat16] * 4
    bf16 = [op for op in ops if op[1] == ("bfloat16", "bfloat16")]
    assert ("conv_general_dilated", ("bfloat16", "bfloat16")) in bf16
    assert len(bf16) >= 4 * 4 + 1 and len(ops) - len(bf16) <= 2, ops
    assert not [op for op in _matmul_dtypes(tiny(attention_impl=impl), images(2, 32))
                if "bfloat16" in op[1]]  # and a float32 model has none

    logits, maps = model(images(2, 32), return_attention=True)
    assert logits.dtype == jnp.float32 and maps[-1].dtype == jnp.float32
    ref = tiny(attention_impl=impl)
    ref.eval()
    # bf16 logits stay close to fp32 ones (same weights: same seed), and are not the fp32
    # ones (bf16 has 8 bits of mantissa: ~4e-3 relative per rounding).
    diff = np.abs(np.asarray(model(images(2, 32))) - np.asarray(ref(images(2, 32)))).max()
    assert 1e-4 < diff < 5e-2, diff


def test_vit_pytorch_style_switches_build_and_run():
    model = dj.create_model(
        "deepvit_16b", image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
        head_dim=16, mlp_dim=64, qkv_bias=False, reattn_bias=False, reattn_norm="layernorm",
        patch_embed="linear", pool="mean", head_norm="after_pool", ln_eps=1e-5,
        num_classes=3)
    model.eval()
    assert model(images(2, 32)).shape == (2, 3)
    assert model.blocks[0].attn.reattn_bias is None
    assert model.blocks[0].attn.qkv.kernel[...].shape == (32, 3 * 64)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_unknown_variant_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown model 'deepvit_99b'.*deepvit_16b.*deepvit_l"):
        dj.create_model("deepvit_99b")


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match=r"image_size: 100 is not divisible by patch_size 16"):
        dj.create_model("deepvit_16b", image_size=100)


def test_unknown_override_key_lists_allowed_fields():
    with pytest.raises(ValueError, match=r"unknown model config keys \['emb_dim'\].*embed_dim"):
        dj.create_model("deepvit_16b", emb_dim=10)


def test_bad_enum_value_names_the_choices():
    with pytest.raises(ValueError, match=r"pool: 'max' is not one of \('cls', 'mean'\)"):
        dj.create_model("deepvit_16b", pool="max")


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 32, 32, 4), (2, 3, 32, 32),
                                   (2, 64, 64, 3), (32, 32, 3)])
def test_wrong_input_shape_is_a_clear_error(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"expected NHWC images of shape \(batch, 32, 32, 3\)"):
        model(jnp.zeros(shape))
