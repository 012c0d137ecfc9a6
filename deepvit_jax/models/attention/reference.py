"""The reference (Re-)attention: the paper's formulas as einsums over a tokens-major layout.

This is the readable parity oracle every faster implementation is tested against
(tests/test_attention.py), and the path taken whenever the fast ones do not apply
(attention dropout in training, vit-pytorch's LayerNorm over the head axis). The maps that
``return_attention=True`` returns are computed by these formulas too. The normalisation
of the mixed map (BatchNorm or LayerNorm over the head axis) is a module of the model and
is applied by the caller between :func:`mix_heads` and :func:`weigh_values`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def split_qkv(qkv, num_heads: int, head_dim: int):
    """(B, N, 3 H D) -> q, k, v each (B, N, H, D): rows ordered [q | k | v], heads inside."""
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, num_heads, head_dim)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def softmax_maps(q, k, scale: float):
    """A = softmax_j(scale q_i . k_j), (B, H, N, N) in float32."""
    logits = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=F32) * scale
    return jax.nn.softmax(logits, axis=-1)


def mix_heads(weight, bias, attn):
    """Theta: A'[b,o,i,j] = sum_h W[o,h] A[b,h,i,j] + bias[o], accumulated in float32."""
    attn = jnp.einsum("oh,bhij->boij", weight, attn, preferred_element_type=F32)
    if bias is not None:
        attn = attn + bias[None, :, None, None]
    return attn


def weigh_values(attn, v):
    """out[b,i] = sum_j A[b,h,i,j] v[b,j,h] -> (B, N, H D) in v's dtype."""
    b, n, h, d = v.shape
    out = jnp.einsum("bhij,bjhd->bihd", attn.astype(v.dtype), v)
    return out.reshape(b, n, h * d)
