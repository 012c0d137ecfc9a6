"""The Re-attention passes as Pallas kernels for TPU (Mosaic lowering, jax.experimental.pallas.tpu).

The dispatcher (``deepvit_jax.models.attention.pallas_passes``) imports this module and, in
a program lowered for TPU (``jax.lax.platform_dependent``), calls the contract's four
functions, named as in ``xla.py``:

    reattn_stats(q, k, *, scale)                                  -> (lse, gram)
    reattn_apply(q, k, v, lse, mix, shift, *, scale)              -> out
    reattn_bwd_stats(q, k, v, lse, dout, *, scale)                -> dmix_c
    reattn_bwd(q, k, v, lse, dout, mix, shift, kmat, *, scale)    -> (dq, dk, dv)

and, beyond the contract, ``reattn_lse(q, k, *, scale) -> lse`` (F1 without the Gram, for
eval mode: ``reattn_apply(q, k, v, reattn_lse(q, k, scale=s), mix, shift, scale=s)``) and
``plain_attention(q, k, v, *, scale)`` (no mixing: the library Pallas flash kernel).

The passes and ``reattn_lse`` also take ``interpret=False`` (True: run in Pallas
interpret mode, e.g. on CPU in tests) and ``block_q``, ``block_k`` (query / key tile; default
128 x 128). The kernels are in ``pallas_forward.py`` and
``pallas_backward.py``, their grid and tiling in ``pallas_common.py``.
``plain_attention`` takes ``block`` (its N tile) and no ``interpret``
(see its docstring).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from deepvit_jax.models.attention import pallas_backward as _backward
from deepvit_jax.models.attention import pallas_forward as _forward

BACKEND = "tpu"

reattn_stats = functools.partial(_forward.reattn_stats, backend=BACKEND)
reattn_apply = functools.partial(_forward.reattn_apply, backend=BACKEND)
reattn_bwd_stats = functools.partial(_backward.reattn_bwd_stats, backend=BACKEND)
reattn_bwd = functools.partial(_backward.reattn_bwd, backend=BACKEND)
# Eval mode: F1's first sweep alone, lse (B, H, N) without the Gram.
reattn_lse = functools.partial(_forward.reattn_lse, backend=BACKEND)


def plain_attention(q, k, v, *, scale, block=128):
    """softmax(scale q k^T) v for heads-major (B, H, N, D): the library Pallas flash kernel.

    ``jax.experimental.pallas.ops.tpu.flash_attention`` (its own custom VJP) wants N a
    multiple of its tiles (128 by default): N is zero-padded to a multiple of ``block`` and
    the padding masked with segment ids (real tokens 1, padding 0; padded rows dropped).
    The library has no interpret argument: on CPU, trace the call and its gradient under
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as lib

    b, _, n, _ = q.shape
    n_pad = -(-n // block) * block
    ids = jnp.broadcast_to((jnp.arange(n_pad) < n).astype(jnp.int32), (b, n_pad))

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n), (0, 0)))

    sizes = lib.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                           block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block,
                           block_q_dkv=block, block_k_major_dq=block, block_k_dq=block,
                           block_q_dq=block)
    out = lib.flash_attention(pad(q), pad(k), pad(v), segment_ids=lib.SegmentIds(ids, ids),
                              sm_scale=float(scale), block_sizes=sizes)
    return out[:, :, :n]
