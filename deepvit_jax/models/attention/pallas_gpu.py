"""The Re-attention passes as Pallas kernels for GPU (Triton lowering of jax.experimental.pallas).

The dispatcher (``deepvit_jax.models.attention.pallas_passes``) imports this module on a
gpu backend and calls the contract's four functions, named as in ``xla.py``:

    reattn_stats(q, k, *, scale)                                  -> (lse, gram)
    reattn_apply(q, k, v, lse, mix, shift, *, scale)              -> out
    reattn_bwd_stats(q, k, v, lse, dout, *, scale)                -> dmix_c
    reattn_bwd(q, k, v, lse, dout, mix, shift, kmat, *, scale)    -> (dq, dk, dv)

Each also takes ``interpret=False`` (True: run in Pallas interpret mode, e.g. on CPU in
tests) and ``block_q``, ``block_k`` (query / key tile; default 32 x 32). The kernels
themselves, their grid and tiling are in ``pallas_common.py``.
"""

from __future__ import annotations

import functools

from deepvit_jax.models.attention import pallas_common as _common

BACKEND = "gpu"

reattn_stats = functools.partial(_common.reattn_stats, backend=BACKEND)
reattn_apply = functools.partial(_common.reattn_apply, backend=BACKEND)
reattn_bwd_stats = functools.partial(_common.reattn_bwd_stats, backend=BACKEND)
reattn_bwd = functools.partial(_common.reattn_bwd, backend=BACKEND)
