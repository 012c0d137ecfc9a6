"""The Pallas Re-attention kernels (F1, F2, B1, B2 of the attention contract) in interpret mode.

Every kernel of both backends (GPU: Triton kernel code under the generic Pallas interpreter;
TPU: Mosaic kernel code under the TPU interpreter, which simulates SMEM / VMEM on CPU) is
compared with a plain jnp oracle of its formula, written here from the contract: the
explicit (B, H, N, N) maps for F1 / F2, and jax.grad of an unfolded scalar for B1 / B2.
Small tiles (8, 16) make N = 40 and N = 17 span several tiles with padding. Kernels are also
lowered (not compiled: no accelerator here) to Triton and Mosaic at the model's shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import batchnorm_reattention

from deepvit_jax.models.attention import folded, pallas_gpu, pallas_tpu
from deepvit_jax.models.attention.folded import Passes

BACKENDS = {"gpu": pallas_gpu, "tpu": pallas_tpu}
B, H, D = 2, 3, 16
FP32_TOL = 1e-5  # max |error| / max |reference|
# bf16 inputs against the float32 oracle on the same bf16-rounded inputs: the float32
# statistics (lse, gram, dmix_c; products of bf16 numbers are exact in float32) keep
# FP32_TOL; the bf16 outputs (out, dq, dk, dv: rounded to bf16, and the maps cast to bf16
# before @ v) are held to 1e-2 (measured ~3e-3; bf16 has a 2^-9 relative rounding step).
BF16_TOL = 1e-2


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def _inputs(n, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    q, k, v, dout = (jax.random.normal(ks[i], (B, H, n, D)).astype(dtype) for i in range(4))
    mix = jax.random.normal(ks[4], (H, H))
    shift = jax.random.normal(ks[5], (H,))
    kmat = jax.random.normal(ks[6], (H, H))
    kmat = kmat + kmat.T  # the caller's kmat = 2 W^T diag(dvar) W / M is symmetric
    return q, k, v, dout, mix, shift, kmat


# ---- oracles: the contract's formulas on explicit maps, float32 (jitted: eager op-by-op
# dispatch would compile each small op separately)


def _maps(q, k, scale):
    s = jnp.einsum("bhid,bhjd->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jax.nn.logsumexp(s, axis=-1), jax.nn.softmax(s, axis=-1)


@functools.partial(jax.jit, static_argnames="scale")
def oracle_stats(q, k, scale):
    lse, a = _maps(q, k, scale)
    c = a - 1.0 / q.shape[2]
    return lse, jnp.einsum("bhij,bgij->hg", c, c)


@functools.partial(jax.jit, static_argnames="scale")
def oracle_apply(q, k, v, mix, shift, scale):
    _, a = _maps(q, k, scale)
    v = v.astype(jnp.float32)
    z = jnp.einsum("oh,bhij->boij", mix, a)
    return jnp.einsum("boij,bojd->boid", z, v) + shift[:, None, None] * v.sum(2, keepdims=True)


@functools.partial(jax.jit, static_argnames="scale")
def oracle_bwd_stats(q, k, v, dout, scale):
    """d/d mix of <dout, (mix A_c) v>: the centred maps' mixing gradient."""
    _, a = _maps(q, k, scale)
    c = a - 1.0 / q.shape[2]

    def loss(mix):
        out = jnp.einsum("boij,bojd->boid", jnp.einsum("oh,bhij->boij", mix, c),
                         v.astype(jnp.float32))
        return jnp.sum(out * dout.astype(jnp.float32))

    return jax.grad(loss)(jnp.zeros((H, H)))


@functools.partial(jax.jit, static_argnames="scale")
def oracle_bwd(q, k, v, dout, mix, shift, kmat, scale):
    """B2 is the gradient of <dout, F2(q, k, v)> + 1/2 sum_hg kmat[h, g] gram[h, g](q, k):
    d/dA_h of the second term is sum_g kmat[h, g] (A_g - 1/N) for a symmetric kmat."""

    def loss(q, k, v):
        _, gram = oracle_stats(q, k, scale)
        out = oracle_apply(q, k, v, mix, shift, scale)
        return jnp.sum(out * dout.astype(jnp.float32)) + 0.5 * jnp.sum(kmat * gram)

    return jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))


# ---- the kernels


def _kw(block):
    """Interpret mode with (query, key) tiles ``block`` (a pair, or one size for both)."""
    bq, bk = block if isinstance(block, tuple) else (block, block)
    return dict(interpret=True, block_q=bq, block_k=bk)


# (backend, N, tiles): N = 40 in 3 tiles of 16 (8 padded tokens); N = 17 with query tiles of
# 8 and key tiles of 16, padded to 32 (4 query tiles, the last one all padding; 2 key tiles).
# H = 3 also pads the GPU kernels' H x H partial sums to 4 x 4.
CASES = [("gpu", 40, 16), ("tpu", 17, (8, 16))]
CASE_IDS = ["gpu-N40-tile16", "tpu-N17-tiles8x16"]


@pytest.mark.parametrize("backend,n,block", CASES, ids=CASE_IDS)
def test_forward_passes_match_oracle(backend, n, block):
    mod = BACKENDS[backend]
    q, k, v, _, mix, shift, _ = _inputs(n)
    scale = D**-0.5
    lse, gram = mod.reattn_stats(q, k, scale=scale, **_kw(block))
    out = mod.reattn_apply(q, k, v, lse, mix, shift, scale=scale, **_kw(block))
    want_lse, want_gram = oracle_stats(q, k, scale)
    assert lse.shape == (B, H, n) and gram.shape == (H, H) and out.shape == q.shape
    assert _rel(lse, want_lse) < FP32_TOL
    assert _rel(gram, want_gram) < FP32_TOL
    assert _rel(out, oracle_apply(q, k, v, mix, shift, scale)) < FP32_TOL
    assert _rel(mod.reattn_lse(q, k, scale=scale, **_kw(block)), want_lse) < FP32_TOL


@pytest.mark.parametrize("backend,n,block", CASES, ids=CASE_IDS)
def test_backward_passes_match_oracle(backend, n, block):
    mod = BACKENDS[backend]
    q, k, v, dout, mix, shift, kmat = _inputs(n, seed=1)
    scale = D**-0.5
    lse, _ = oracle_stats(q, k, scale)
    dmix = mod.reattn_bwd_stats(q, k, v, lse, dout, scale=scale, **_kw(block))
    assert dmix.shape == (H, H)
    assert _rel(dmix, oracle_bwd_stats(q, k, v, dout, scale)) < FP32_TOL
    grads = mod.reattn_bwd(q, k, v, lse, dout, mix, shift, kmat, scale=scale, **_kw(block))
    wants = oracle_bwd(q, k, v, dout, mix, shift, kmat, scale)
    for name, got, want in zip("qkv", grads, wants, strict=True):
        assert got.shape == q.shape, name
        assert _rel(got, want) < FP32_TOL, name


def test_bf16_inputs():
    """bf16 q, k, v, dout through all four passes (GPU kernel code; the TPU code is the same
    kernels with other block specs); float32 statistics, bf16 outputs."""
    mod = pallas_gpu
    q, k, v, dout, mix, shift, kmat = _inputs(40, jnp.bfloat16, seed=2)
    scale = D**-0.5
    lse, gram = mod.reattn_stats(q, k, scale=scale, **_kw(16))
    want_lse, want_gram = oracle_stats(q, k, scale)
    assert lse.dtype == gram.dtype == jnp.float32
    assert _rel(lse, want_lse) < FP32_TOL and _rel(gram, want_gram) < FP32_TOL
    out = mod.reattn_apply(q, k, v, lse, mix, shift, scale=scale, **_kw(16))
    assert out.dtype == jnp.bfloat16
    assert _rel(out, oracle_apply(q, k, v, mix, shift, scale)) < BF16_TOL
    dmix = mod.reattn_bwd_stats(q, k, v, want_lse, dout, scale=scale, **_kw(16))
    assert _rel(dmix, oracle_bwd_stats(q, k, v, dout, scale)) < FP32_TOL
    grads = mod.reattn_bwd(q, k, v, want_lse, dout, mix, shift, kmat, scale=scale, **_kw(16))
    wants = oracle_bwd(q, k, v, dout, mix, shift, kmat, scale)
    for name, got, want in zip("qkv", grads, wants, strict=True):
        assert got.dtype == jnp.bfloat16, name
        assert _rel(got, want) < BF16_TOL, name


def test_folded_vjp_with_pallas_passes_matches_autodiff_of_batchnorm():
    """The whole chain: the custom VJP of folded.py driving the four kernels (GPU kernel code,
    interpret mode) against autodiff of BatchNorm_train(W A + b) weighing v, written out here.
    """
    mod = pallas_gpu
    passes = Passes(*(functools.partial(f, **_kw(8)) for f in (
        mod.reattn_stats, mod.reattn_apply, mod.reattn_bwd_stats, mod.reattn_bwd)))
    q, k, v, dout, w, _, _ = _inputs(17, seed=3)
    ks = jax.random.split(jax.random.key(4), 3)
    gamma = 1.0 + 0.2 * jax.random.normal(ks[0], (H,))
    beta, bias = jax.random.normal(ks[1], (H,)), jnp.ones(H)
    dvar = jax.random.normal(ks[2], (H,))
    eps, scale = 1e-5, D**-0.5

    def unfolded(q, k, v, w, gamma, beta):
        _, a = _maps(q, k, scale)
        return batchnorm_reattention(a, v, w, bias, gamma, beta, eps)

    def fold(*args):
        return folded.reattention_train(passes, scale, eps, *args)

    def loss(f):
        def fn(*args):
            out, var = f(*args)
            return jnp.sum(out * dout) + jnp.sum(var * dvar)
        return fn

    args = (q, k, v, w, gamma, beta)
    (out_r, var_r), (out_f, var_f) = jax.jit(unfolded)(*args), jax.jit(fold)(*args)
    assert _rel(out_f, out_r) < FP32_TOL and _rel(var_f, var_r) < FP32_TOL
    g_r = jax.jit(jax.grad(loss(unfolded), argnums=tuple(range(6))))(*args)
    g_f = jax.jit(jax.grad(loss(fold), argnums=tuple(range(6))))(*args)
    for name, want, got in zip(["q", "k", "v", "W", "gamma", "beta"], g_r, g_f, strict=True):
        assert _rel(got, want) < FP32_TOL, name


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_the_accelerators(platform):
    """Lowering (not compiling: no accelerator here) at DeepViT-S's shapes (12 heads of 33,
    N = 197, bf16), default tiles: Triton IR for 'cuda' (head dim padded to 64), Mosaic for
    'tpu' (this checks TPU block-shape rules too)."""
    dtype, d = jnp.bfloat16, 33
    mod = pallas_gpu if platform == "cuda" else pallas_tpu
    b, h, n = 2, 12, 197
    x = jax.ShapeDtypeStruct((b, h, n, d), dtype)
    lse = jax.ShapeDtypeStruct((b, h, n), jnp.float32)
    hh, hv = jax.ShapeDtypeStruct((h, h), jnp.float32), jax.ShapeDtypeStruct((h,), jnp.float32)
    scale = d**-0.5

    def plain_grad(q, k, v):
        return jax.grad(lambda *a: jnp.sum(mod.plain_attention(*a, scale=scale)
                                           .astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    calls = [(mod.reattn_stats, (x, x)), (mod.reattn_apply, (x, x, x, lse, hh, hv)),
             (mod.reattn_bwd_stats, (x, x, x, lse, x)),
             (mod.reattn_bwd, (x, x, x, lse, x, hh, hv, hh))]
    calls = [(functools.partial(fn, scale=scale), args) for fn, args in calls]
    for fn, args in [*calls, (plain_grad, (x, x, x))]:
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
        text = lowered.as_text()
        assert ("triton" if platform == "cuda" else "tpu_custom_call") in text, fn


def _plain_oracle(q, k, v, scale):
    _, a = _maps(q, k, scale)
    return jnp.einsum("bhij,bhjd->bhid", a, v)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_plain_attention_library_kernels(backend):
    """The library flash kernels behind plain_attention, N padded and masked by segment ids:
    forward and gradient against softmax(scale q k^T) v (GPU: interpret=True; TPU: the
    library has no interpret argument, so the whole gradient is traced in TPU interpret
    mode)."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, dout, *_ = _inputs(40, seed=5)
    scale = D**-0.5
    if backend == "gpu":
        fn = functools.partial(pallas_gpu.plain_attention, scale=scale, interpret=True,
                               block=16)
    else:
        fn = functools.partial(pallas_tpu.plain_attention, scale=scale)  # tiles of 128

    def both(f):
        def run(q, k, v):
            return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * dout), argnums=(0, 1, 2))(
                q, k, v)
        return jax.jit(run)

    want, want_grads = both(lambda *a: _plain_oracle(*a, scale))(q, k, v)
    if backend == "tpu":
        with pltpu.force_tpu_interpret_mode():
            got, grads = both(fn)(q, k, v)
    else:
        got, grads = both(fn)(q, k, v)
    assert _rel(got, want) < FP32_TOL
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        assert _rel(g, w) < FP32_TOL, name


def test_bad_shapes_are_named():
    q, k, v, dout, mix, shift, kmat = _inputs(17)
    lse = jnp.zeros((B, H, 17))
    with pytest.raises(ValueError, match=r"reattn_apply: lse shape \(2, 3, 16\)"):
        pallas_gpu.reattn_apply(q, k, v, lse[..., :16], mix, shift, scale=1.0)
    with pytest.raises(ValueError, match=r"reattn_bwd: kmat shape \(3, 4\) != \(3, 3\)"):
        pallas_tpu.reattn_bwd(q, k, v, lse, dout, mix, shift, kmat[:, :2].repeat(2, 1),
                              scale=1.0)
    with pytest.raises(ValueError, match=r"reattn_stats: k shape"):
        pallas_gpu.reattn_stats(q, k[:, :, :5], scale=1.0)
    with pytest.raises(ValueError, match="heads-major"):
        pallas_tpu.reattn_lse(q[0], k[0], scale=1.0)
