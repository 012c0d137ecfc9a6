"""The Pallas Re-attention kernels (F1, F2, B1, B2 of the attention contract) in interpret mode.

Every kernel of both backends (GPU: Triton kernel code under the generic Pallas interpreter;
TPU: Mosaic kernel code under the TPU interpreter, which simulates SMEM / VMEM on CPU) is
compared with a plain jnp oracle of its formula, written here from the contract: the
explicit (B, H, N, N) maps for F1 / F2, and jax.grad of an unfolded scalar for B1 / B2.
Small tiles (8, 16) make N = 40 and N = 17 span several tiles with padding. Kernels are also
lowered (not compiled: no accelerator here) to Triton and Mosaic at the model's shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepvit_jax.models.attention import pallas_gpu, pallas_tpu

BACKENDS = {"gpu": pallas_gpu, "tpu": pallas_tpu}
B, H, D = 2, 4, 16
FP32_TOL = 1e-5  # max |error| / max |reference|
# bf16 inputs (q, k, v, dout rounded to bf16, maps cast to bf16 before @ v, outputs in bf16)
# against the float32 oracle on the same bf16-rounded inputs.
BF16_TOL = 2e-2


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


# ---- oracles: the contract's formulas on explicit maps, float32


def _maps(q, k, scale):
    s = jnp.einsum("bhid,bhjd->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jax.nn.logsumexp(s, axis=-1), jax.nn.softmax(s, axis=-1)


def oracle_stats(q, k, scale):
    lse, a = _maps(q, k, scale)
    c = a - 1.0 / q.shape[2]
    return lse, jnp.einsum("bhij,bgij->hg", c, c)


def oracle_apply(q, k, v, mix, shift, scale):
    _, a = _maps(q, k, scale)
    v = v.astype(jnp.float32)
    z = jnp.einsum("oh,bhij->boij", mix, a)
    return jnp.einsum("boij,bojd->boid", z, v) + shift[:, None, None] * v.sum(2, keepdims=True)


def oracle_bwd_stats(q, k, v, dout, scale):
    """d/d mix of <dout, (mix A_c) v>: the centred maps' mixing gradient."""
    _, a = _maps(q, k, scale)
    c = a - 1.0 / q.shape[2]

    def loss(mix):
        out = jnp.einsum("boij,bojd->boid", jnp.einsum("oh,bhij->boij", mix, c),
                         v.astype(jnp.float32))
        return jnp.sum(out * dout.astype(jnp.float32))

    return jax.grad(loss)(jnp.zeros((H, H)))


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
    return dict(interpret=True, block_q=block, block_k=block)


CASES = [  # (backend, N, tile): N = 40 spans 3 tiles of 16; N = 17 two tiles of 16, 3 of 8
    ("gpu", 40, 16), ("tpu", 40, 16), ("gpu", 17, 8), ("tpu", 17, 16),
]


@pytest.mark.parametrize("backend,n,block", CASES)
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


@pytest.mark.parametrize("backend,n,block", CASES)
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
