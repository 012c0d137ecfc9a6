"""Attention implementations and the dispatcher that picks one (``ModelConfig.attention_impl``).

* ``reference``: the paper's einsums over a tokens-major layout (``reference.py``), the parity
  oracle. The model also falls back to it wherever a faster path does not apply: attention
  dropout in training, vit-pytorch's LayerNorm over the head axis. (``return_attention=True``
  runs the configured implementation and computes the maps by the reference formulas.)
* ``xla``: heads-major q, k, v; the head mixing as fused multiply-adds; train-mode
  Re-attention with BatchNorm folded into an H x H matrix and a custom VJP (``folded.py``)
  whose four passes are jnp (``xla.py``).
* ``pallas``: the same fold, its passes as Pallas kernels that never write the (B, H, N, N)
  map to memory (imported lazily, only when asked for).
* ``auto``: the fastest correct one for the backend (:func:`resolve`).

All functions here take heads-major q, k, v: (B, H, N, D).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from deepvit_jax.models.attention import folded, xla
from deepvit_jax.models.attention.folded import Passes, eval_fold

IMPLS = ("auto", "reference", "xla", "pallas")

# The contract's names of F1, F2, B1, B2, in a Pallas module as in xla.py.
PASS_NAMES = ("reattn_stats", "reattn_apply", "reattn_bwd_stats", "reattn_bwd")
XLA_PASSES = Passes(xla.reattn_stats, xla.reattn_apply, xla.reattn_bwd_stats, xla.reattn_bwd)


def resolve(impl: str, backend: str | None = None) -> str:
    """'auto' -> the implementation to use on ``backend`` (default: JAX's default backend).

    CPU: 'xla' (faster than the reference per block and end to end: benchmarks/attention.py,
    benchmarks/vs_pytorch.py, README). GPU and TPU: 'xla' as well (plain blocks take cuDNN
    flash attention where eligible) until ``bash benchmarks/gpu.sh`` has measured the Pallas
    kernels on the hardware (they are tested in interpret mode only); ask for
    ``attention_impl='pallas'`` to use them. The Pallas path has no shard_map yet (per-shard
    kernels with a psum of the H x H statistics between the passes): under a sharded batch
    use 'xla', whose H x H sums XLA makes global.
    """
    if impl not in IMPLS:
        raise ValueError(f"ModelConfig.attention_impl: {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    del backend  # every backend resolves to 'xla' today (see the docstring)
    return "xla"


def pallas_passes() -> Passes:
    """The Pallas kernels of the attention contract (``pallas_gpu.py`` / ``pallas_tpu.py``),
    imported on first use. On CPU: the GPU kernel code under the Pallas interpreter (slow;
    for tests)."""
    backend = jax.default_backend()
    name = {"cpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    try:
        mod = importlib.import_module(f"deepvit_jax.models.attention.pallas_{name}")
    except ImportError as e:
        raise ValueError(f"ModelConfig.attention_impl='pallas': no Pallas attention kernels "
                         f"for backend {backend!r} ({e}); use attention_impl='xla'") from None
    fns = [getattr(mod, f) for f in PASS_NAMES]
    if backend == "cpu":
        fns = [functools.partial(f, interpret=True) for f in fns]
    return Passes(*fns)


def passes(impl: str) -> Passes:
    return pallas_passes() if impl == "pallas" else XLA_PASSES


def _cudnn_eligible(q) -> bool:
    """cuDNN flash attention: GPU, 16-bit inputs, head dim a multiple of 8 up to 128."""
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 128)


def plain(impl: str, q, k, v, *, scale: float):
    """softmax(scale q k^T) v for heads-major q, k, v -> (B, H, N, D)."""
    if _cudnn_eligible(q):
        # jax.nn.dot_product_attention takes tokens-major (B, N, H, D).
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        return out.transpose(0, 2, 1, 3)
    del impl  # the XLA form for 'xla' and 'pallas' alike (no plain Pallas kernel yet)
    return xla.plain_attention(q, k, v, scale=scale)


def reattention_eval(impl: str, q, k, v, mix, shift, *, scale: float):
    """Eval-mode Re-attention with BatchNorm folded into (mix, shift) (:func:`eval_fold`)."""
    if impl == "pallas":
        p = pallas_passes()
        lse, _ = p.stats(q, k, scale=scale)
        return p.apply(q, k, v, lse, mix, shift, scale=scale)
    return xla.reattn_eval(q, k, v, mix, shift, scale=scale)


def reattention_train(impl: str, q, k, v, weight, gamma, beta, *, scale: float, eps: float):
    """Train-mode Re-attention (BatchNorm with batch statistics) -> (out, biased batch var)."""
    return folded.reattention_train(passes(impl), float(scale), float(eps), q, k, v,
                                    weight, gamma, beta)


__all__ = ["IMPLS", "Passes", "eval_fold", "passes", "plain", "reattention_eval",
           "reattention_train", "resolve"]
