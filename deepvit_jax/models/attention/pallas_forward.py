"""The forward passes of the folded Re-attention as Pallas kernels (layout, tiling and
helpers in ``pallas_common.py``):

    F1 reattn_stats  -> lse (B, H, N); gram[h, g] = sum (A_h - 1/N)(A_g - 1/N)
       reattn_lse    -> lse alone (F1's first sweep: eval mode needs no Gram)
    F2 reattn_apply  -> out_o = (sum_h mix[o, h] A_h) @ v_o + shift[o] * sum_j v_o[j]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from deepvit_jax.models.attention.pallas_common import (F32, NEG, attn_probs, call, check_shapes,
                                                        hxh, jit_pass, layout, live_bytes, logits,
                                                        matmul_nn, pad, row_total, seq_spec,
                                                        small_spec, tile_rows, valid_mask)

# --------------------------------------------------------------------------------------
# F1: lse and the centred Gram


def _stats_kernel(q_ref, k_ref, lse_ref, gram_ref=None, *, scale, n, heads, bk, h_pad):
    bq = q_ref.shape[1]
    q_start = pl.program_id(1) * bq
    qs = [q_ref[h] for h in range(heads)]
    num_k = pl.cdiv(n, bk)  # static; key tiles of pure padding are skipped

    # Sweep 1: online max / sum over the key tiles -> lse per head.
    def sweep1(t, carry):
        ms, ls = carry
        valid = valid_mask(None, t * bk, bq, bk, n)  # keys only: every row gets an lse
        new_m, new_l = [], []
        for h in range(heads):
            s = jnp.where(valid, logits(qs[h], tile_rows(k_ref, h, t * bk, bk), scale), NEG)
            m = jnp.maximum(ms[h], jnp.max(s, axis=1, keepdims=True))
            new_l.append(ls[h] * jnp.exp(ms[h] - m)
                         + jnp.sum(jnp.exp(s - m), axis=1, keepdims=True))
            new_m.append(m)
        return tuple(new_m), tuple(new_l)

    init = (tuple(jnp.full((bq, 1), NEG, F32) for _ in range(heads)),
            tuple(jnp.zeros((bq, 1), F32) for _ in range(heads)))
    ms, ls = lax.fori_loop(0, num_k, sweep1, init)
    lses = [ms[h] + jnp.log(ls[h]) for h in range(heads)]
    for h in range(heads):
        lse_ref[h] = lses[h]
    if gram_ref is None:  # reattn_lse: no second sweep
        return

    # Sweep 2: the centred maps of all heads on one tile -> column sums of their products
    # ((1, bk) rows: a (bq, 1) column would take a whole lane-padded tile on TPU).
    pairs = [(h, g) for h in range(heads) for g in range(h + 1)]

    def sweep2(t, acc):
        valid = valid_mask(q_start, t * bk, bq, bk, n)
        cen = [jnp.where(valid,
                         attn_probs(qs[h], tile_rows(k_ref, h, t * bk, bk), lses[h], valid, scale)
                         - 1.0 / n, 0.0)
               for h in range(heads)]
        return tuple(a + jnp.sum(cen[h] * cen[g], axis=0, keepdims=True)
                     for a, (h, g) in zip(acc, pairs, strict=True))

    acc = lax.fori_loop(0, num_k, sweep2, tuple(jnp.zeros((1, bk), F32) for _ in pairs))
    sums = {}
    for a, (h, g) in zip(acc, pairs, strict=True):
        sums[(h, g)] = sums[(g, h)] = row_total(a)
    gram_ref[...] = hxh(sums, h_pad)


@jit_pass
def reattn_stats(q, k, *, scale, backend, interpret=False, block_q=None, block_k=None):
    """F1: (lse (B, H, N) float32, gram (H, H) float32, a sum over batch, rows and keys)."""
    return _stats(q, k, scale, backend, interpret, block_q, block_k, with_gram=True)


@jit_pass
def reattn_lse(q, k, *, scale, backend, interpret=False, block_q=None, block_k=None):
    """F1's first sweep alone: lse (B, H, N) float32 (eval mode needs no Gram)."""
    return _stats(q, k, scale, backend, interpret, block_q, block_k, with_gram=False)


def _stats(q, k, scale, backend, interpret, block_q, block_k, *, with_gram):
    check_shapes("reattn_stats", q, k)
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, h_pad = layout(backend, n, d, heads, block_q, block_k)
    nq = n_pad // bq
    kernel = functools.partial(_stats_kernel, scale=float(scale), n=n, heads=heads, bk=bk,
                               h_pad=h_pad)
    out_specs = [pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, heads, n_pad, 1), F32)]
    if with_gram:
        out_specs.append(pl.BlockSpec((None, None, h_pad, h_pad), lambda i, j: (i, j, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, nq, h_pad, h_pad), F32))
    outs = call(
        backend, interpret, kernel, grid=(b, nq),
        name="reattn_stats" if with_gram else "reattn_lse",
        temp_bytes=live_bytes(heads, bq, bk, 2),
        in_specs=[pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0)),
                  seq_spec(backend, heads, n_pad, d_pad)],
        out_specs=out_specs, out_shape=out_shape,
    )(pad(q, n_pad, d_pad), pad(k, n_pad, d_pad))
    lse = outs[0][:, :, :n, 0]
    if not with_gram:
        return lse
    return lse, jnp.sum(outs[1], axis=(0, 1))[:heads, :heads]


# --------------------------------------------------------------------------------------
# F2: the mixed maps times v


def _apply_kernel(q_ref, k_ref, v_ref, lse_ref, mix_ref, shift_ref, o_ref, *, scale, n, heads,
                  bk):
    bq = q_ref.shape[1]
    q_start = pl.program_id(1) * bq
    qs = [q_ref[h] for h in range(heads)]
    lses = [lse_ref[h] for h in range(heads)]
    mix = [[mix_ref[o, h] for h in range(heads)] for o in range(heads)]
    d = v_ref.shape[2]

    def body(t, carry):
        accs, vsums = carry
        valid = valid_mask(q_start, t * bk, bq, bk, n)
        probs = [attn_probs(qs[h], tile_rows(k_ref, h, t * bk, bk), lses[h], valid, scale)
                 for h in range(heads)]
        new_acc, new_vs = [], []
        for o in range(heads):
            v_t = tile_rows(v_ref, o, t * bk, bk)
            z = mix[o][0] * probs[0]
            for h in range(1, heads):
                z = z + mix[o][h] * probs[h]
            new_acc.append(accs[o] + matmul_nn(z.astype(v_t.dtype), v_t))
            # Padded value rows are zero: the column sum needs no mask.
            new_vs.append(vsums[o] + jnp.sum(v_t.astype(F32), axis=0, keepdims=True))
        return tuple(new_acc), tuple(new_vs)

    init = (tuple(jnp.zeros((bq, d), F32) for _ in range(heads)),
            tuple(jnp.zeros((1, d), F32) for _ in range(heads)))
    accs, vsums = lax.fori_loop(0, pl.cdiv(n, bk), body, init)
    for o in range(heads):
        o_ref[o] = (accs[o] + shift_ref[o] * vsums[o]).astype(o_ref.dtype)


@jit_pass
def reattn_apply(q, k, v, lse, mix, shift, *, scale, backend, interpret=False, block_q=None,
                 block_k=None):
    """F2: out_o = (sum_h mix[o, h] A_h) @ v_o + shift[o] * sum_j v_o[j], in q's dtype."""
    check_shapes("reattn_apply", q, k, v=v, lse=lse,
           mats=(("mix", mix, lambda h: (h, h)), ("shift", shift, lambda h: (h,))))
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, _ = layout(backend, n, d, heads, block_q, block_k)
    kernel = functools.partial(_apply_kernel, scale=float(scale), n=n, heads=heads, bk=bk)
    tile = pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0))
    full = seq_spec(backend, heads, n_pad, d_pad)
    out = call(
        backend, interpret, kernel, grid=(b, n_pad // bq), name="reattn_apply",
        temp_bytes=live_bytes(heads, bq, bk, 2),
        in_specs=[tile, full, full,
                  pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0)),
                  small_spec(backend), small_spec(backend)],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct((b, heads, n_pad, d_pad), q.dtype),
    )(pad(q, n_pad, d_pad), pad(k, n_pad, d_pad), pad(v, n_pad, d_pad),
      pad(lse.astype(F32), n_pad)[..., None], mix.astype(F32), shift.astype(F32))
    return out[:, :, :n, :d]
