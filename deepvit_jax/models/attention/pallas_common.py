"""Pallas kernels of the folded Re-attention: the four passes F1, F2, B1, B2, for GPU and TPU.

This module holds what the passes share: the tiling (:func:`layout`), the backend glue
(:func:`call`, block specs, padding, shape checks) and the in-kernel helpers on 2-D tiles.
The passes are in ``pallas_forward.py`` (F1, F2) and ``pallas_backward.py`` (B1, B2); the
backends' modules (``pallas_gpu.py``, ``pallas_tpu.py``) bind them to a backend; the
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
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)

BACKENDS = ("gpu", "tpu")
# Default tiles, untuned (no accelerator has measured them yet: bash benchmarks/gpu.sh).
# TPU: lane-aligned 128 (Mosaic wants the last two block dims multiples of (8, 128) or full;
# live tiles spill to VMEM). GPU: 16, the smallest tl.dot tile, because a program keeps
# up to five lists of H (tile x tile) float32 maps live in registers: 12 heads x 16 x 16 x
# 4 B = 12 KiB per list, ~120 registers a thread at 4 warps (32 x 32 would spill).
DEFAULT_BLOCKS = {"gpu": (16, 16), "tpu": (128, 128)}


# --------------------------------------------------------------------------------------
# Backend glue


def layout(backend, n, d, h, block_q, block_k):
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


def call(backend, interpret, kernel, *, grid, in_specs, out_specs, out_shape, name,
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


def live_bytes(heads, bq, bk, maps):
    """Live float32 (bq, bk) tiles of a kernel: ``maps`` per-head lists of them, plus H^2
    (8, 128)-padded accumulators."""
    return 4 * (maps * heads * bq * bk + heads * heads * 8 * max(bk, 128))


def seq_spec(backend, heads, n_pad, width):
    """The whole (padded) sequence of every head of one batch element: (H, N_pad, width).

    Its block index changes only with the batch element, so on TPU one VMEM buffer is kept
    instead of two (the whole-sequence K and V are the largest blocks).
    """
    kw = {"pipeline_mode": pl.Buffered(1)} if backend == "tpu" else {}
    return pl.BlockSpec((None, heads, n_pad, width), lambda i, j: (i, 0, 0, 0), **kw)


# The passes' jit: tiles, backend and interpret mode are static.
jit_pass = functools.partial(
    jax.jit, static_argnames=("scale", "backend", "interpret", "block_q", "block_k"))


def small_spec(backend):
    """A whole small parameter array (mix, shift, kmat): SMEM scalars on TPU."""
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(memory_space=None)


def pad(x, n_pad, d_pad=None):
    """(B, H, N[, D]) -> zero-padded (B, H, n_pad[, d_pad])."""
    widths = [(0, 0), (0, 0), (0, n_pad - x.shape[2])]
    if x.ndim == 4:
        widths.append((0, d_pad - x.shape[3]))
    return jnp.pad(x, widths)


def check_shapes(name, q, k, v=None, lse=None, dout=None, mats=()):
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


def logits(q_tile, k_tile, scale):
    """scale * q k^T in float32: (bq, D) x (bk, D) -> (bq, bk)."""
    s = lax.dot_general(q_tile, k_tile, (((1,), (1,)), ((), ())), preferred_element_type=F32,
                        precision=_precision(q_tile))
    return s * scale


def matmul_tn(a, b):
    """a^T b in float32 for a float32 a: (bq, bk) x (bq, D) -> (bk, D). The float32 tile is
    transposed, then cast to b's dtype (as the library TPU flash-attention backward does)."""
    return matmul_nn(a.T.astype(b.dtype), b)


def matmul_nn(a, b):
    """a b in float32: (bq, bk) x (bk, D) -> (bq, D)."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32,
                           precision=_precision(a))


def valid_mask(q_start, k_start, bq, bk, n):
    """(bq, bk) bool: the key column (and, unless q_start is None, the query row) is a real
    (< n) token."""
    cols = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if q_start is None:
        return cols < n
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    return jnp.logical_and(rows < n, cols < n)


def attn_probs(q_tile, k_tile, lse, valid, scale):
    """A = exp(S - lse) on one tile, 0 at padded keys and padded query rows."""
    return jnp.where(valid, jnp.exp(logits(q_tile, k_tile, scale) - lse), 0.0)


def tile_rows(ref, h, start, size):
    """Rows [start, start + size) of head h of a (H, N_pad, X) block."""
    if not isinstance(start, int):  # a loop index times the tile: tell the compiler
        start = pl.multiple_of(start, size)
    return ref[h, pl.ds(start, size), :]


def hxh(values, h_pad):
    """H x H (1, 1) float32 partial sums -> an (h_pad, h_pad) array (zeros beyond H)."""
    rows = lax.broadcasted_iota(jnp.int32, (h_pad, h_pad), 0)
    cols = lax.broadcasted_iota(jnp.int32, (h_pad, h_pad), 1)
    out = jnp.zeros((h_pad, h_pad), F32)
    for (r, c), val in values.items():
        out = jnp.where(jnp.logical_and(rows == r, cols == c), val, out)
    return out


def row_total(row):
    """(1, bk) -> (1, 1) sum."""
    return jnp.sum(row, axis=1, keepdims=True)
