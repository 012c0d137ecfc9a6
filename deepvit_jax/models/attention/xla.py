"""Layout-aware (Re-)attention in plain jnp, for every backend.

q, k and v are heads-major, (B, H, N, D), so that both attention matmuls are batched over
(B, H) with contiguous N x D operands: on the 2-core CPU the same maths runs ~5x faster than
the reference's tokens-major einsums (issue 9). The Re-attention of a training step is the
BatchNorm fold of ``folded.py``; this module provides its four passes (F1, F2, B1, B2 of the
attention contract) as jnp functions with the same signatures as the Pallas kernels. Here the
(B, H, N, N) maps are materialised, and XLA shares the maps that several passes recompute
(common-subexpression elimination within one jitted step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32

# How the H x H head mixing is written. 'einsum': a dot over the head axis; 'fma': H fused
# multiply-adds of whole maps (one elementwise loop). Alone, on (16, 12, 197, 197) maps, the
# multiply-adds are ~2x faster on the 2-core CPU; inside the whole attention (softmax, mixing,
# @ v, and the backward) the einsum is faster: 1.7x (train) and 1.5x (eval) for the
# attention alone, and the 'xla-fma' rows of benchmarks/attention.py for a block.
MIXING = "einsum"


def split_qkv(qkv, num_heads: int, head_dim: int):
    """(B, N, 3 H D) -> q, k, v each (B, H, N, D): one reshape and one transpose."""
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(out):
    """(B, H, N, D) -> (B, N, H D), the layout of the output projection's input."""
    b, h, n, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def logits(q, k, scale: float):
    return jnp.einsum("bhid,bhjd->bhij", q, k, preferred_element_type=F32) * scale


def mix_heads(mix, maps):
    """Z[b,o] = sum_h mix[o,h] maps[b,h] for (O, H) ``mix`` and (B, H, N, N) float32 maps."""
    if MIXING == "einsum":
        return jnp.einsum("oh,bhij->boij", mix, maps, preferred_element_type=F32)
    # Written out as H multiply-adds: XLA fuses them into one elementwise loop that reads
    # each map once per output head, instead of a dot with a contraction of length H.
    out = mix[None, :, 0, None, None] * maps[:, None, 0]
    for h in range(1, maps.shape[1]):
        out = out + mix[None, :, h, None, None] * maps[:, None, h]
    return out


def plain_attention(q, k, v, *, scale: float):
    """softmax(scale q k^T) v, heads-major in and out; softmax in float32."""
    a = jax.nn.softmax(logits(q, k, scale), axis=-1)
    return jnp.einsum("bhij,bhjd->bhid", a.astype(v.dtype), v)


def _values_term(z, v, shift):
    """Z_o @ v_o + shift[o] * sum_j v_o[j], accumulated in float32."""
    out = jnp.einsum("boij,bojd->boid", z.astype(v.dtype), v, preferred_element_type=F32)
    return out + shift[None, :, None, None] * jnp.sum(v.astype(F32), axis=2, keepdims=True)


def reattn_eval(q, k, v, mix, shift, *, scale: float):
    """Eval-mode Re-attention with BatchNorm folded into (mix, shift): F2 without the lse pass."""
    a = jax.nn.softmax(logits(q, k, scale), axis=-1)
    return _values_term(mix_heads(mix, a), v, shift).astype(q.dtype)


# -- the four passes of the folded train-mode Re-attention (attention contract) ----------------


def _maps(q, k, lse, scale):
    return jnp.exp(logits(q, k, scale) - lse[..., None])


def _dz(dout, v):
    """dZ_o[b,i,j] = dout_o[b,i] . v_o[b,j]."""
    return jnp.einsum("boid,bojd->boij", dout, v, preferred_element_type=F32)


def _head_products(x, y):
    """SUM over b, i, j of x[b,o,i,j] y[b,h,i,j] -> (O, H).

    Written per sample, (B, H, N^2) x (B, H, N^2)^T, then summed over b: each operand is
    contiguous along the contraction, so XLA needs no transpose. The single contraction over
    (b, i, j) ('bhij,bgij->hg') transposes the maps first: 5x slower on the 2-core CPU."""
    b, o, n, _ = x.shape
    per_sample = jnp.einsum("bok,bhk->boh", x.reshape(b, o, n * n),
                            y.reshape(b, y.shape[1], n * n), preferred_element_type=F32)
    return jnp.sum(per_sample, axis=0)


def reattn_stats(q, k, *, scale: float):
    """F1 -> (lse (B, H, N), gram (H, H)): gram = SUM over b, i, j of the centred maps' products."""
    s = logits(q, k, scale)
    lse = jax.nn.logsumexp(s, axis=-1)
    centred = jnp.exp(s - lse[..., None]) - 1.0 / q.shape[2]
    return lse, _head_products(centred, centred)


def reattn_apply(q, k, v, lse, mix, shift, *, scale: float):
    """F2: out_o = (sum_h mix[o,h] A_h) @ v_o + shift[o] * sum_j v_o[j]."""
    return _values_term(mix_heads(mix, _maps(q, k, lse, scale)), v, shift).astype(q.dtype)


def reattn_bwd_stats(q, k, v, lse, dout, *, scale: float):
    """B1: dmix_c[o, h] = SUM over b, i, j of dZ_o (A_h - 1/N)."""
    centred = _maps(q, k, lse, scale) - 1.0 / q.shape[2]
    return _head_products(_dz(dout, v), centred)


def reattn_bwd(q, k, v, lse, dout, mix, shift, kmat, *, scale: float):
    """B2 -> (dq, dk, dv) through the softmax, for the map gradient
    dA_h = sum_o mix[o,h] dZ_o + sum_g kmat[h,g] (A_g - 1/N)."""
    a = _maps(q, k, lse, scale)
    dz = _dz(dout, v)
    da = mix_heads(mix.T, dz) + mix_heads(kmat, a - 1.0 / q.shape[2])
    ds = a * (da - jnp.sum(a * da, axis=-1, keepdims=True))
    ds = ds.astype(q.dtype)
    dq = scale * jnp.einsum("bhij,bhjd->bhid", ds, k, preferred_element_type=F32)
    dk = scale * jnp.einsum("bhij,bhid->bhjd", ds, q, preferred_element_type=F32)
    z = mix_heads(mix, a).astype(v.dtype)
    dv = jnp.einsum("boij,boid->bojd", z, dout, preferred_element_type=F32)
    dv = dv + shift[None, :, None, None] * jnp.sum(dout.astype(F32), axis=2, keepdims=True)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
