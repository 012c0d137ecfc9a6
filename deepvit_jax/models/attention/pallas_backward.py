"""The backward passes of the folded Re-attention as Pallas kernels (layout, tiling and
helpers in ``pallas_common.py``):

    B1 reattn_bwd_stats  -> dmix_c[o, h] = sum dZ_o (A_h - 1/N),  dZ_o = dout_o v_o^T
    B2 reattn_bwd        -> dq, dk, dv (dA_h = sum_o mix[o, h] dZ_o
                                       + sum_g kmat[h, g] A_c,g)

B2 is two kernels: dq (with delta = rowsum(A dA)) per query tile, then dk, dv per key
tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from deepvit_jax.models.attention.pallas_common import (F32, attn_probs, call, check_shapes, hxh,
                                                        jit_pass, layout, live_bytes, logits,
                                                        matmul_nn, matmul_tn, pad, row_total,
                                                        seq_spec, small_spec, tile_rows, valid_mask)

# --------------------------------------------------------------------------------------
# B1: d mix of the centred maps


def _bwd_stats_kernel(q_ref, k_ref, v_ref, lse_ref, do_ref, dmix_ref, *, scale, n, heads, bk,
                      h_pad):
    bq = q_ref.shape[1]
    q_start = pl.program_id(1) * bq
    qs = [q_ref[h] for h in range(heads)]
    dos = [do_ref[o] for o in range(heads)]
    lses = [lse_ref[h] for h in range(heads)]
    pairs = [(o, h) for o in range(heads) for h in range(heads)]

    def body(t, acc):
        valid = valid_mask(q_start, t * bk, bq, bk, n)
        cen = [jnp.where(valid,
                         attn_probs(qs[h], tile_rows(k_ref, h, t * bk, bk), lses[h], valid, scale)
                         - 1.0 / n, 0.0)
               for h in range(heads)]
        # dZ_o = dout_o v_o^T (zero at padded keys and rows: both are zero-padded).
        dz = [logits(dos[o], tile_rows(v_ref, o, t * bk, bk), 1.0) for o in range(heads)]
        return tuple(a + jnp.sum(dz[o] * cen[h], axis=0, keepdims=True)
                     for a, (o, h) in zip(acc, pairs, strict=True))

    acc = lax.fori_loop(0, pl.cdiv(n, bk), body,
                        tuple(jnp.zeros((1, bk), F32) for _ in pairs))
    dmix_ref[...] = hxh({p: row_total(a) for a, p in zip(acc, pairs, strict=True)}, h_pad)


@jit_pass
def reattn_bwd_stats(q, k, v, lse, dout, *, scale, backend, interpret=False, block_q=None,
                     block_k=None):
    """B1: dmix_c[o, h] = sum_{b,i,j} (dout_o v_o^T)[i, j] (A_h[i, j] - 1/N), float32."""
    check_shapes("reattn_bwd_stats", q, k, v=v, lse=lse, dout=dout)
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, h_pad = layout(backend, n, d, heads, block_q, block_k)
    nq = n_pad // bq
    kernel = functools.partial(_bwd_stats_kernel, scale=float(scale), n=n, heads=heads, bk=bk,
                               h_pad=h_pad)
    tile = pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0))
    full = seq_spec(backend, heads, n_pad, d_pad)
    dmix = call(
        backend, interpret, kernel, grid=(b, nq), name="reattn_bwd_stats",
        temp_bytes=live_bytes(heads, bq, bk, 3),
        in_specs=[tile, full, full,
                  pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0)), tile],
        out_specs=pl.BlockSpec((None, None, h_pad, h_pad), lambda i, j: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nq, h_pad, h_pad), F32),
    )(pad(q, n_pad, d_pad), pad(k, n_pad, d_pad), pad(v, n_pad, d_pad),
      pad(lse.astype(F32), n_pad)[..., None], pad(dout.astype(q.dtype), n_pad, d_pad))
    return jnp.sum(dmix, axis=(0, 1))[:heads, :heads]


# --------------------------------------------------------------------------------------
# B2: dq (with delta = rowsum(A dA)) per query tile, then dk, dv per key tile


def _grad_maps(qs, k_ref, v_ref, dos, lses, mix, kmat, valid, k_start, bk, scale, n, heads):
    """One (query tile, key tile): the maps A_h and the map gradients dA_h of every head."""
    probs = [attn_probs(qs[h], tile_rows(k_ref, h, k_start, bk), lses[h], valid, scale)
             for h in range(heads)]
    cen = [jnp.where(valid, p - 1.0 / n, 0.0) for p in probs]
    dz = [logits(dos[o], tile_rows(v_ref, o, k_start, bk), 1.0) for o in range(heads)]
    dmaps = []
    for h in range(heads):
        da = mix[0][h] * dz[0]
        for o in range(1, heads):
            da = da + mix[o][h] * dz[o]
        for g in range(heads):
            da = da + kmat[h][g] * cen[g]
        dmaps.append(da)
    return probs, dmaps


def _scalars(ref, heads):
    return [[ref[r, c] for c in range(heads)] for r in range(heads)]


def _bwd_dq_kernel(q_ref, k_ref, v_ref, lse_ref, do_ref, mix_ref, kmat_ref, dq_ref, delta_ref,
                   *, scale, n, heads, bk):
    bq = q_ref.shape[1]
    q_start = pl.program_id(1) * bq
    qs = [q_ref[h] for h in range(heads)]
    dos = [do_ref[o] for o in range(heads)]
    lses = [lse_ref[h] for h in range(heads)]
    mix, kmat = _scalars(mix_ref, heads), _scalars(kmat_ref, heads)
    num_k = pl.cdiv(n, bk)

    def maps(t):
        valid = valid_mask(q_start, t * bk, bq, bk, n)
        return _grad_maps(qs, k_ref, v_ref, dos, lses, mix, kmat, valid, t * bk, bk, scale, n,
                          heads)

    # Sweep 1: delta_h = rowsum(A_h dA_h), which needs the whole row.
    def sweep1(t, deltas):
        probs, dmaps = maps(t)
        return tuple(dl + jnp.sum(p * da, axis=1, keepdims=True)
                     for dl, p, da in zip(deltas, probs, dmaps, strict=True))

    deltas = lax.fori_loop(0, num_k, sweep1, tuple(jnp.zeros((bq, 1), F32) for _ in qs))

    # Sweep 2: dS_h = A_h (dA_h - delta_h); dq_h = scale dS_h k_h.
    def sweep2(t, dqs):
        probs, dmaps = maps(t)
        out = []
        for h in range(heads):
            k_t = tile_rows(k_ref, h, t * bk, bk)
            ds = probs[h] * (dmaps[h] - deltas[h])
            out.append(dqs[h] + matmul_nn(ds.astype(k_t.dtype), k_t))
        return tuple(out)

    dqs = lax.fori_loop(0, num_k, sweep2, tuple(jnp.zeros(x.shape, F32) for x in qs))
    for h in range(heads):
        dq_ref[h] = (scale * dqs[h]).astype(dq_ref.dtype)
        delta_ref[h] = deltas[h]


def _bwd_dkv_kernel(q_ref, k_ref, v_ref, lse_ref, delta_ref, do_ref, mix_ref, shift_ref,
                    kmat_ref, dk_ref, dv_ref, *, scale, n, heads, bq):
    bk = k_ref.shape[1]
    k_start = pl.program_id(1) * bk
    mix, kmat = _scalars(mix_ref, heads), _scalars(kmat_ref, heads)
    d = k_ref.shape[2]

    def body(t, carry):
        dks, dvs, dosums = carry
        q_start = t * bq
        valid = valid_mask(q_start, k_start, bq, bk, n)
        qs = [tile_rows(q_ref, h, q_start, bq) for h in range(heads)]
        dos = [tile_rows(do_ref, o, q_start, bq) for o in range(heads)]
        lses = [tile_rows(lse_ref, h, q_start, bq) for h in range(heads)]
        deltas = [tile_rows(delta_ref, h, q_start, bq) for h in range(heads)]
        # k_ref / v_ref hold this program's key tile only: it starts at row 0 of the block.
        probs, dmaps = _grad_maps(qs, k_ref, v_ref, dos, lses, mix, kmat, valid, 0, bk, scale,
                                  n, heads)
        new_dk, new_dv, new_ds = [], [], []
        for h in range(heads):
            ds = probs[h] * (dmaps[h] - deltas[h])
            new_dk.append(dks[h] + matmul_tn(ds, qs[h]))
        for o in range(heads):
            z = mix[o][0] * probs[0]
            for h in range(1, heads):
                z = z + mix[o][h] * probs[h]
            new_dv.append(dvs[o] + matmul_tn(z, dos[o]))
            # Padded dout rows are zero: the column sum needs no mask.
            new_ds.append(dosums[o] + jnp.sum(dos[o].astype(F32), axis=0, keepdims=True))
        return tuple(new_dk), tuple(new_dv), tuple(new_ds)

    zeros = tuple(jnp.zeros((bk, d), F32) for _ in range(heads))
    init = (zeros, zeros, tuple(jnp.zeros((1, d), F32) for _ in range(heads)))
    dks, dvs, dosums = lax.fori_loop(0, pl.cdiv(n, bq), body, init)
    for h in range(heads):
        dk_ref[h] = (scale * dks[h]).astype(dk_ref.dtype)
        dv_ref[h] = (dvs[h] + shift_ref[h] * dosums[h]).astype(dv_ref.dtype)


@jit_pass
def reattn_bwd(q, k, v, lse, dout, mix, shift, kmat, *, scale, backend, interpret=False,
               block_q=None, block_k=None):
    """B2: (dq, dk, dv) in q's dtype, from the map gradient
    dA_h = sum_o mix[o, h] dZ_o + sum_g kmat[h, g] (A_g - 1/N)."""
    check_shapes("reattn_bwd", q, k, v=v, lse=lse, dout=dout,
           mats=(("mix", mix, lambda h: (h, h)), ("shift", shift, lambda h: (h,)),
                 ("kmat", kmat, lambda h: (h, h))))
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, _ = layout(backend, n, d, heads, block_q, block_k)
    # dout in q's dtype: the matrix units take one input dtype.
    qp, kp, vp, dop = (pad(x.astype(q.dtype), n_pad, d_pad) for x in (q, k, v, dout))
    lsep = pad(lse.astype(F32), n_pad)[..., None]
    mix, shift, kmat = mix.astype(F32), shift.astype(F32), kmat.astype(F32)
    small = small_spec(backend)
    full = seq_spec(backend, heads, n_pad, d_pad)
    full_col = seq_spec(backend, heads, n_pad, 1)
    q_tile = pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0))
    q_col = pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0))
    dq, delta = call(
        backend, interpret,
        functools.partial(_bwd_dq_kernel, scale=float(scale), n=n, heads=heads, bk=bk),
        grid=(b, n_pad // bq), name="reattn_bwd_dq", temp_bytes=live_bytes(heads, bq, bk, 5),
        in_specs=[q_tile, full, full, q_col, q_tile, small, small],
        out_specs=[q_tile, q_col],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct(lsep.shape, F32)],
    )(qp, kp, vp, lsep, dop, mix, kmat)
    k_tile = pl.BlockSpec((None, heads, bk, d_pad), lambda i, j: (i, 0, j, 0))
    dk, dv = call(
        backend, interpret,
        functools.partial(_bwd_dkv_kernel, scale=float(scale), n=n, heads=heads, bq=bq),
        grid=(b, n_pad // bk), name="reattn_bwd_dkv", temp_bytes=live_bytes(heads, bq, bk, 6),
        in_specs=[full, k_tile, k_tile, full_col, full_col, full, small, small, small],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, q.dtype)] * 2,
    )(qp, kp, vp, lsep, delta, dop, mix, shift, kmat)
    return tuple(x[:, :, :n, :d] for x in (dq, dk, dv))
