"""The Re-attention passes as Pallas kernels for GPU (Triton lowering of jax.experimental.pallas).

The dispatcher (``deepvit_jax.models.attention.pallas_passes``) imports this module and, in
a program lowered for CUDA / ROCm (and, in
interpret mode, for CPU) (``jax.lax.platform_dependent``), calls the contract's four
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
16 x 16). The kernels are in ``pallas_forward.py`` and
``pallas_backward.py``, their grid and tiling in ``pallas_common.py``.
``plain_attention`` takes ``interpret`` and ``block`` (its N tile).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from deepvit_jax.models.attention import pallas_backward as _backward
from deepvit_jax.models.attention import pallas_forward as _forward

BACKEND = "gpu"

reattn_stats = functools.partial(_forward.reattn_stats, backend=BACKEND)
reattn_apply = functools.partial(_forward.reattn_apply, backend=BACKEND)
reattn_bwd_stats = functools.partial(_backward.reattn_bwd_stats, backend=BACKEND)
reattn_bwd = functools.partial(_backward.reattn_bwd, backend=BACKEND)
# Eval mode: F1's first sweep alone, lse (B, H, N) without the Gram.
reattn_lse = functools.partial(_forward.reattn_lse, backend=BACKEND)


def plain_attention(q, k, v, *, scale, interpret=False, block=64):
    """softmax(scale q k^T) v for heads-major (B, H, N, D): the library Pallas flash kernel.

    ``jax.experimental.pallas.ops.gpu.attention.mha`` (its own custom VJP) wants tokens-major
    (B, N, H, D) and N a multiple of its tiles: N is zero-padded to a multiple of ``block``
    and the padding masked with segment ids (real tokens 1, padding 0; padded rows dropped).
    """
    from jax.experimental.pallas.ops.gpu import attention as lib

    b, _, n, _ = q.shape
    n_pad = -(-n // block) * block
    ids = jnp.broadcast_to((jnp.arange(n_pad) < n).astype(jnp.int32), (b, n_pad))

    def tokens_major(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n), (0, 0))).transpose(0, 2, 1, 3)

    sub = min(block, 32)
    sizes = lib.BlockSizes(block_q=block, block_k=block, block_q_dkv=sub, block_kv_dkv=sub,
                           block_q_dq=sub, block_kv_dq=sub)
    out = lib.mha(tokens_major(q), tokens_major(k), tokens_major(v), ids, sm_scale=float(scale),
                  block_sizes=sizes, interpret=interpret)
    return out.transpose(0, 2, 1, 3)[:, :, :n]
