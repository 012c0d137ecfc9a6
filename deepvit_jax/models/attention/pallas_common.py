"""Pallas kernels of the folded Re-attention: the four passes F1, F2, B1, B2, for GPU and TPU.

The backends' modules (``pallas_gpu.py``, ``pallas_tpu.py``) bind this code to a backend; the
dispatcher imports those. Each pass has the signature of its jnp twin in ``xla.py``; the
formulas (heads-major q, k, v of shape (B, H, N, D), A_h = softmax(scale q_h k_h^T)):

    F1 reattn_stats      -> lse (B, H, N); gram[h, g] = sum (A_h - 1/N)(A_g - 1/N)
    F2 reattn_apply      -> out_o = (sum_h mix[o, h] A_h) @ v_o + shift[o] * sum_j v_o[j]
    B1 reattn_bwd_stats  -> dmix_c[o, h] = sum dZ_o (A_h - 1/N),  dZ_o = dout_o v_o^T
    B2 reattn_bwd        -> dq, dk, dv (dA_h = sum_o mix[o, h] dZ_o + sum_g kmat[h, g] A_c,g)

Layout of every kernel: grid (B, query tiles) -- or (B, key tiles) for dk/dv -- and each
program handles ALL H heads of its tile (the head mixing needs every head at one (i, j)),
looping over the other axis in tiles with ``lax.fori_loop``. Heads are a static Python loop
over 2-D (tile, tile) blocks: Triton needs power-of-two tensor dims (H = 12 is not) and
Mosaic lays out 2-D tiles best.

    F1  sweep 1 over key tiles: online max / sum -> lse; sweep 2: A = exp(S - lse), the
        H(H+1)/2 products of centred maps summed into (1, bk) rows -> an H x H partial sum
    F2  one sweep: A of every head, Z_o = sum_h mix[o, h] A_h, acc_o += Z_o @ v_o
    B1  one sweep: dZ_o = dout_o v_o^T, the H^2 products dZ_o (A_h - 1/N) -> H x H partial
    B2  kernel 1, per query tile: sweep 1 delta_h = rowsum(A_h dA_h), sweep 2 dq;
        kernel 2, per key tile, over query tiles: dk, dv (reads lse and delta)

Only lse, delta, the H x H partial sums (one per program, summed here) and the outputs go
to HBM; the (B, H, N, N) map never does. Every pass recomputes S = scale q k^T.

N is padded to a multiple of the tiles; padded keys get probability 0 (logits masked to a
large negative number, and maps masked after the exponential), padded query rows are masked
out of every sum (gram, dmix_c, dk, dv) and dropped. All accumulation is float32; bf16
inputs go into the matrix units as bf16 (the maps are cast to the value dtype before @ v).
On GPU the head dim is zero-padded to a power of two (>= 16), the H x H outputs to the next
power of two.

Hand-written because no library kernel mixes heads between the softmax and @ v (the library
flash-attention kernels in jax.experimental.pallas.ops handle one head per program).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
# Finite "minus infinity" for masked logits (as jax.experimental.pallas.ops.gpu.attention):
# exp() of it is 0 without the inf - inf = nan of a true -inf.
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)

BACKENDS = ("gpu", "tpu")
# Default tiles, untuned (no accelerator has measured them yet: bash benchmarks/gpu.sh).
# TPU: lane-aligned 128 (Mosaic wants the last two block dims multiples of (8, 128) or full;
# live tiles spill to VMEM). GPU: 16, the smallest tl.dot tile, because a program keeps
# up to five lists of H (tile x tile) float32 maps live in registers: 12 heads x 16 x 16 x
# 4 B = 12 KiB per list, ~120 registers a thread at 4 warps (32 x 32 would spill).
DEFAULT_BLOCKS = {"gpu": (16, 16), "tpu": (128, 128)}


# --------------------------------------------------------------------------------------
# Backend glue


def _cfg(backend, n, d, h, block_q, block_k):
    """Static layout: tiles, padded N, padded head dim, padded H x H output size."""
    if backend not in BACKENDS:
        raise ValueError(f"Pallas attention backend {backend!r}: use one of {BACKENDS}")
    dq_, dk_ = DEFAULT_BLOCKS[backend]
    bq, bk = int(block_q or dq_), int(block_k or dk_)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"Pallas attention tiles: block_q={bq}, block_k={bk} must be > 0")
    step = math.lcm(bq, bk)
    n_pad = -(-n // step) * step
    if backend == "gpu":
        # Triton tensors have power-of-two dims: pad the head dim (zeros change no dot
        # product) and the H x H partial sums.
        d_pad = max(16, pl.next_power_of_2(d))
        h_pad = pl.next_power_of_2(h)
    else:
        d_pad, h_pad = d, h  # full-dim blocks: any size is legal for Mosaic
    return bq, bk, n_pad, d_pad, h_pad


def _call(backend, interpret, kernel, *, grid, in_specs, out_specs, out_shape, name,
          temp_bytes=0):
    """pallas_call with the backend's compiler parameters.

    TPU: ``temp_bytes`` (the kernel's live float32 tiles) plus the VMEM blocks are estimated
    (:func:`_vmem_estimate`); past 12 MiB the scoped-VMEM limit (16 MiB by default on some
    chips) is raised to 1.5x the estimate, at most 64 MiB (v7x has 64 MiB per core).
    """
    kw = {}
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        specs = list(in_specs) + (list(out_specs) if isinstance(out_specs, (list, tuple))
                                  else [out_specs])
        est = temp_bytes + sum(_vmem_estimate(sp) for sp in specs)
        limit = min(int(1.5 * est), 64 << 20) if est > 12 << 20 else None
        kw["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=limit)
        # TPU interpret mode simulates TPU memory spaces (SMEM scalars, VMEM blocks) on CPU.
        interp = pltpu.InterpretParams() if interpret else False
    else:
        from jax.experimental.pallas import triton as plgpu

        kw["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
        interp = bool(interpret)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interp, name=name, **kw)


def _vmem_estimate(spec):
    """Bytes of VMEM a TPU BlockSpec takes: (8, 128)-tiled float32-sized words (bf16 is
    counted as float32: an upper bound), times its number of buffers."""
    shape = getattr(spec, "block_shape", None)
    if shape is None:  # a whole-array SMEM operand (mix, shift, kmat)
        return 0
    dims = [x for x in shape if x is not None]
    rows, cols = dims[-2] if len(dims) > 1 else 1, dims[-1]
    words = math.prod(dims[:-2]) * (-(-rows // 8) * 8) * (-(-cols // 128) * 128)
    mode = getattr(spec, "pipeline_mode", None)
    return 4 * words * (mode.buffer_count if mode is not None else 2)


def _temps(heads, bq, bk, maps):
    """Live float32 (bq, bk) tiles of a kernel: ``maps`` per-head lists of them, plus H^2
    (8, 128)-padded accumulators."""
    return 4 * (maps * heads * bq * bk + heads * heads * 8 * max(bk, 128))


def _seq_spec(backend, heads, n_pad, width):
    """The whole (padded) sequence of every head of one batch element: (H, N_pad, width).

    Its block index changes only with the batch element, so on TPU one VMEM buffer is kept
    instead of two (the whole-sequence K and V are the largest blocks).
    """
    kw = {"pipeline_mode": pl.Buffered(1)} if backend == "tpu" else {}
    return pl.BlockSpec((None, heads, n_pad, width), lambda i, j: (i, 0, 0, 0), **kw)


_jit = functools.partial(
    jax.jit, static_argnames=("scale", "backend", "interpret", "block_q", "block_k"))


def _small_spec(backend):
    """A whole small parameter array (mix, shift, kmat): SMEM scalars on TPU."""
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(memory_space=None)


def _pad(x, n_pad, d_pad=None):
    """(B, H, N[, D]) -> zero-padded (B, H, n_pad[, d_pad])."""
    widths = [(0, 0), (0, 0), (0, n_pad - x.shape[2])]
    if x.ndim == 4:
        widths.append((0, d_pad - x.shape[3]))
    return jnp.pad(x, widths)


def _check(name, q, k, v=None, lse=None, dout=None, mats=()):
    if q.ndim != 4:
        raise ValueError(f"{name}: q must be heads-major (B, H, N, D), got shape {q.shape}")
    for label, x in (("k", k), ("v", v), ("dout", dout)):
        if x is not None and x.shape != q.shape:
            raise ValueError(f"{name}: {label} shape {x.shape} != q shape {q.shape}")
    if lse is not None and lse.shape != q.shape[:3]:
        raise ValueError(f"{name}: lse shape {lse.shape} != (B, H, N) {q.shape[:3]}")
    h = q.shape[1]
    for label, x, shape in mats:
        if x.shape != shape(h):
            raise ValueError(f"{name}: {label} shape {x.shape} != {shape(h)} (H = {h})")


# --------------------------------------------------------------------------------------
# In-kernel helpers (2-D tiles only)


def _precision(x):
    """16-bit tiles: DEFAULT, explicitly. A bf16 x bf16 product accumulated in float32 is
    exact in one MXU pass, and Mosaic rejects a bf16 matmul at float32 contract precision
    ("Bad lhs type"), which a global ``jax_default_matmul_precision='highest'`` would ask
    for. Float32 tiles: None, the configured precision."""
    return lax.Precision.DEFAULT if x.dtype.itemsize < 4 else None


def _logits(q_tile, k_tile, scale):
    """scale * q k^T in float32: (bq, D) x (bk, D) -> (bq, bk)."""
    s = lax.dot_general(q_tile, k_tile, (((1,), (1,)), ((), ())), preferred_element_type=F32,
                        precision=_precision(q_tile))
    return s * scale


def _tn(a, b):
    """a^T b in float32 for a float32 a: (bq, bk) x (bq, D) -> (bk, D). The float32 tile is
    transposed, then cast to b's dtype (as the library TPU flash-attention backward does)."""
    return _nn(a.T.astype(b.dtype), b)


def _nn(a, b):
    """a b in float32: (bq, bk) x (bk, D) -> (bq, D)."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32,
                           precision=_precision(a))


def _valid(q_start, k_start, bq, bk, n):
    """(bq, bk) bool: the key column (and, unless q_start is None, the query row) is a real
    (< n) token."""
    cols = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if q_start is None:
        return cols < n
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    return jnp.logical_and(rows < n, cols < n)


def _probs(q_tile, k_tile, lse, valid, scale):
    """A = exp(S - lse) on one tile, 0 at padded keys and padded query rows."""
    return jnp.where(valid, jnp.exp(_logits(q_tile, k_tile, scale) - lse), 0.0)


def _tile(ref, h, start, size):
    """Rows [start, start + size) of head h of a (H, N_pad, X) block."""
    if not isinstance(start, int):  # a loop index times the tile: tell the compiler
        start = pl.multiple_of(start, size)
    return ref[h, pl.ds(start, size), :]


def _hxh(values, h_pad):
    """H x H (1, 1) float32 partial sums -> an (h_pad, h_pad) array (zeros beyond H)."""
    rows = lax.broadcasted_iota(jnp.int32, (h_pad, h_pad), 0)
    cols = lax.broadcasted_iota(jnp.int32, (h_pad, h_pad), 1)
    out = jnp.zeros((h_pad, h_pad), F32)
    for (r, c), val in values.items():
        out = jnp.where(jnp.logical_and(rows == r, cols == c), val, out)
    return out


def _total(row):
    """(1, bk) -> (1, 1) sum."""
    return jnp.sum(row, axis=1, keepdims=True)


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
        valid = _valid(None, t * bk, bq, bk, n)  # keys only: every row gets an lse
        new_m, new_l = [], []
        for h in range(heads):
            s = jnp.where(valid, _logits(qs[h], _tile(k_ref, h, t * bk, bk), scale), _NEG)
            m = jnp.maximum(ms[h], jnp.max(s, axis=1, keepdims=True))
            new_l.append(ls[h] * jnp.exp(ms[h] - m)
                         + jnp.sum(jnp.exp(s - m), axis=1, keepdims=True))
            new_m.append(m)
        return tuple(new_m), tuple(new_l)

    init = (tuple(jnp.full((bq, 1), _NEG, F32) for _ in range(heads)),
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
        valid = _valid(q_start, t * bk, bq, bk, n)
        cen = [jnp.where(valid,
                         _probs(qs[h], _tile(k_ref, h, t * bk, bk), lses[h], valid, scale)
                         - 1.0 / n, 0.0)
               for h in range(heads)]
        return tuple(a + jnp.sum(cen[h] * cen[g], axis=0, keepdims=True)
                     for a, (h, g) in zip(acc, pairs, strict=True))

    acc = lax.fori_loop(0, num_k, sweep2, tuple(jnp.zeros((1, bk), F32) for _ in pairs))
    sums = {}
    for a, (h, g) in zip(acc, pairs, strict=True):
        sums[(h, g)] = sums[(g, h)] = _total(a)
    gram_ref[...] = _hxh(sums, h_pad)


@_jit
def reattn_stats(q, k, *, scale, backend, interpret=False, block_q=None, block_k=None):
    """F1: (lse (B, H, N) float32, gram (H, H) float32, a sum over batch, rows and keys)."""
    return _stats(q, k, scale, backend, interpret, block_q, block_k, with_gram=True)


@_jit
def reattn_lse(q, k, *, scale, backend, interpret=False, block_q=None, block_k=None):
    """F1's first sweep alone: lse (B, H, N) float32 (eval mode needs no Gram)."""
    return _stats(q, k, scale, backend, interpret, block_q, block_k, with_gram=False)


def _stats(q, k, scale, backend, interpret, block_q, block_k, *, with_gram):
    _check("reattn_stats", q, k)
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, h_pad = _cfg(backend, n, d, heads, block_q, block_k)
    nq = n_pad // bq
    kernel = functools.partial(_stats_kernel, scale=float(scale), n=n, heads=heads, bk=bk,
                               h_pad=h_pad)
    out_specs = [pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, heads, n_pad, 1), F32)]
    if with_gram:
        out_specs.append(pl.BlockSpec((None, None, h_pad, h_pad), lambda i, j: (i, j, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, nq, h_pad, h_pad), F32))
    outs = _call(
        backend, interpret, kernel, grid=(b, nq),
        name="reattn_stats" if with_gram else "reattn_lse",
        temp_bytes=_temps(heads, bq, bk, 2),
        in_specs=[pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0)),
                  _seq_spec(backend, heads, n_pad, d_pad)],
        out_specs=out_specs, out_shape=out_shape,
    )(_pad(q, n_pad, d_pad), _pad(k, n_pad, d_pad))
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
        valid = _valid(q_start, t * bk, bq, bk, n)
        probs = [_probs(qs[h], _tile(k_ref, h, t * bk, bk), lses[h], valid, scale)
                 for h in range(heads)]
        new_acc, new_vs = [], []
        for o in range(heads):
            v_t = _tile(v_ref, o, t * bk, bk)
            z = mix[o][0] * probs[0]
            for h in range(1, heads):
                z = z + mix[o][h] * probs[h]
            new_acc.append(accs[o] + _nn(z.astype(v_t.dtype), v_t))
            # Padded value rows are zero: the column sum needs no mask.
            new_vs.append(vsums[o] + jnp.sum(v_t.astype(F32), axis=0, keepdims=True))
        return tuple(new_acc), tuple(new_vs)

    init = (tuple(jnp.zeros((bq, d), F32) for _ in range(heads)),
            tuple(jnp.zeros((1, d), F32) for _ in range(heads)))
    accs, vsums = lax.fori_loop(0, pl.cdiv(n, bk), body, init)
    for o in range(heads):
        o_ref[o] = (accs[o] + shift_ref[o] * vsums[o]).astype(o_ref.dtype)


@_jit
def reattn_apply(q, k, v, lse, mix, shift, *, scale, backend, interpret=False, block_q=None,
                 block_k=None):
    """F2: out_o = (sum_h mix[o, h] A_h) @ v_o + shift[o] * sum_j v_o[j], in q's dtype."""
    _check("reattn_apply", q, k, v=v, lse=lse,
           mats=(("mix", mix, lambda h: (h, h)), ("shift", shift, lambda h: (h,))))
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, _ = _cfg(backend, n, d, heads, block_q, block_k)
    kernel = functools.partial(_apply_kernel, scale=float(scale), n=n, heads=heads, bk=bk)
    tile = pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0))
    full = _seq_spec(backend, heads, n_pad, d_pad)
    out = _call(
        backend, interpret, kernel, grid=(b, n_pad // bq), name="reattn_apply",
        temp_bytes=_temps(heads, bq, bk, 2),
        in_specs=[tile, full, full,
                  pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0)),
                  _small_spec(backend), _small_spec(backend)],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct((b, heads, n_pad, d_pad), q.dtype),
    )(_pad(q, n_pad, d_pad), _pad(k, n_pad, d_pad), _pad(v, n_pad, d_pad),
      _pad(lse.astype(F32), n_pad)[..., None], mix.astype(F32), shift.astype(F32))
    return out[:, :, :n, :d]


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
        valid = _valid(q_start, t * bk, bq, bk, n)
        cen = [jnp.where(valid,
                         _probs(qs[h], _tile(k_ref, h, t * bk, bk), lses[h], valid, scale)
                         - 1.0 / n, 0.0)
               for h in range(heads)]
        # dZ_o = dout_o v_o^T (zero at padded keys and rows: both are zero-padded).
        dz = [_logits(dos[o], _tile(v_ref, o, t * bk, bk), 1.0) for o in range(heads)]
        return tuple(a + jnp.sum(dz[o] * cen[h], axis=0, keepdims=True)
                     for a, (o, h) in zip(acc, pairs, strict=True))

    acc = lax.fori_loop(0, pl.cdiv(n, bk), body,
                        tuple(jnp.zeros((1, bk), F32) for _ in pairs))
    dmix_ref[...] = _hxh({p: _total(a) for a, p in zip(acc, pairs, strict=True)}, h_pad)


@_jit
def reattn_bwd_stats(q, k, v, lse, dout, *, scale, backend, interpret=False, block_q=None,
                     block_k=None):
    """B1: dmix_c[o, h] = sum_{b,i,j} (dout_o v_o^T)[i, j] (A_h[i, j] - 1/N), float32."""
    _check("reattn_bwd_stats", q, k, v=v, lse=lse, dout=dout)
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, h_pad = _cfg(backend, n, d, heads, block_q, block_k)
    nq = n_pad // bq
    kernel = functools.partial(_bwd_stats_kernel, scale=float(scale), n=n, heads=heads, bk=bk,
                               h_pad=h_pad)
    tile = pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0))
    full = _seq_spec(backend, heads, n_pad, d_pad)
    dmix = _call(
        backend, interpret, kernel, grid=(b, nq), name="reattn_bwd_stats",
        temp_bytes=_temps(heads, bq, bk, 3),
        in_specs=[tile, full, full,
                  pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0)), tile],
        out_specs=pl.BlockSpec((None, None, h_pad, h_pad), lambda i, j: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nq, h_pad, h_pad), F32),
    )(_pad(q, n_pad, d_pad), _pad(k, n_pad, d_pad), _pad(v, n_pad, d_pad),
      _pad(lse.astype(F32), n_pad)[..., None], _pad(dout.astype(q.dtype), n_pad, d_pad))
    return jnp.sum(dmix, axis=(0, 1))[:heads, :heads]


# --------------------------------------------------------------------------------------
# B2: dq (with delta = rowsum(A dA)) per query tile, then dk, dv per key tile


def _grad_maps(qs, k_ref, v_ref, dos, lses, mix, kmat, valid, k_start, bk, scale, n, heads):
    """One (query tile, key tile): the maps A_h and the map gradients dA_h of every head."""
    probs = [_probs(qs[h], _tile(k_ref, h, k_start, bk), lses[h], valid, scale)
             for h in range(heads)]
    cen = [jnp.where(valid, p - 1.0 / n, 0.0) for p in probs]
    dz = [_logits(dos[o], _tile(v_ref, o, k_start, bk), 1.0) for o in range(heads)]
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
        valid = _valid(q_start, t * bk, bq, bk, n)
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
            k_t = _tile(k_ref, h, t * bk, bk)
            ds = probs[h] * (dmaps[h] - deltas[h])
            out.append(dqs[h] + _nn(ds.astype(k_t.dtype), k_t))
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
        valid = _valid(q_start, k_start, bq, bk, n)
        qs = [_tile(q_ref, h, q_start, bq) for h in range(heads)]
        dos = [_tile(do_ref, o, q_start, bq) for o in range(heads)]
        lses = [_tile(lse_ref, h, q_start, bq) for h in range(heads)]
        deltas = [_tile(delta_ref, h, q_start, bq) for h in range(heads)]
        # k_ref / v_ref hold this program's key tile only: it starts at row 0 of the block.
        probs, dmaps = _grad_maps(qs, k_ref, v_ref, dos, lses, mix, kmat, valid, 0, bk, scale,
                                  n, heads)
        new_dk, new_dv, new_ds = [], [], []
        for h in range(heads):
            ds = probs[h] * (dmaps[h] - deltas[h])
            new_dk.append(dks[h] + _tn(ds, qs[h]))
        for o in range(heads):
            z = mix[o][0] * probs[0]
            for h in range(1, heads):
                z = z + mix[o][h] * probs[h]
            new_dv.append(dvs[o] + _tn(z, dos[o]))
            # Padded dout rows are zero: the column sum needs no mask.
            new_ds.append(dosums[o] + jnp.sum(dos[o].astype(F32), axis=0, keepdims=True))
        return tuple(new_dk), tuple(new_dv), tuple(new_ds)

    zeros = tuple(jnp.zeros((bk, d), F32) for _ in range(heads))
    init = (zeros, zeros, tuple(jnp.zeros((1, d), F32) for _ in range(heads)))
    dks, dvs, dosums = lax.fori_loop(0, pl.cdiv(n, bq), body, init)
    for h in range(heads):
        dk_ref[h] = (scale * dks[h]).astype(dk_ref.dtype)
        dv_ref[h] = (dvs[h] + shift_ref[h] * dosums[h]).astype(dv_ref.dtype)


@_jit
def reattn_bwd(q, k, v, lse, dout, mix, shift, kmat, *, scale, backend, interpret=False,
               block_q=None, block_k=None):
    """B2: (dq, dk, dv) in q's dtype, from the map gradient
    dA_h = sum_o mix[o, h] dZ_o + sum_g kmat[h, g] (A_g - 1/N)."""
    _check("reattn_bwd", q, k, v=v, lse=lse, dout=dout,
           mats=(("mix", mix, lambda h: (h, h)), ("shift", shift, lambda h: (h,)),
                 ("kmat", kmat, lambda h: (h, h))))
    b, heads, n, d = q.shape
    bq, bk, n_pad, d_pad, _ = _cfg(backend, n, d, heads, block_q, block_k)
    # dout in q's dtype: the matrix units take one input dtype.
    qp, kp, vp, dop = (_pad(x.astype(q.dtype), n_pad, d_pad) for x in (q, k, v, dout))
    lsep = _pad(lse.astype(F32), n_pad)[..., None]
    mix, shift, kmat = mix.astype(F32), shift.astype(F32), kmat.astype(F32)
    small = _small_spec(backend)
    full = _seq_spec(backend, heads, n_pad, d_pad)
    full_col = _seq_spec(backend, heads, n_pad, 1)
    q_tile = pl.BlockSpec((None, heads, bq, d_pad), lambda i, j: (i, 0, j, 0))
    q_col = pl.BlockSpec((None, heads, bq, 1), lambda i, j: (i, 0, j, 0))
    dq, delta = _call(
        backend, interpret,
        functools.partial(_bwd_dq_kernel, scale=float(scale), n=n, heads=heads, bk=bk),
        grid=(b, n_pad // bq), name="reattn_bwd_dq", temp_bytes=_temps(heads, bq, bk, 5),
        in_specs=[q_tile, full, full, q_col, q_tile, small, small],
        out_specs=[q_tile, q_col],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct(lsep.shape, F32)],
    )(qp, kp, vp, lsep, dop, mix, kmat)
    k_tile = pl.BlockSpec((None, heads, bk, d_pad), lambda i, j: (i, 0, j, 0))
    dk, dv = _call(
        backend, interpret,
        functools.partial(_bwd_dkv_kernel, scale=float(scale), n=n, heads=heads, bq=bq),
        grid=(b, n_pad // bk), name="reattn_bwd_dkv", temp_bytes=_temps(heads, bq, bk, 6),
        in_specs=[full, k_tile, k_tile, full_col, full_col, full, small, small, small],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, q.dtype)] * 2,
    )(qp, kp, vp, lsep, delta, dop, mix, shift, kmat)
    return tuple(x[:, :, :n, :d] for x in (dq, dk, dv))
