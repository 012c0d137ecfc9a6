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
    ``attention_impl='pallas'`` to use them. Under a context mesh (``jax.set_mesh``, as the
    training loop and ``evaluate`` set) that splits the batch, the Pallas passes run per
    shard with a psum of the H x H statistics between them (:func:`per_shard`).
    """
    if impl not in IMPLS:
        raise ValueError(f"ModelConfig.attention_impl: {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    del backend  # every backend resolves to 'xla' today (see the docstring)
    return "xla"


def _kernels(platform: str):
    try:
        return importlib.import_module(f"deepvit_jax.models.attention.pallas_{platform}")
    except ImportError as e:
        raise ValueError(f"ModelConfig.attention_impl='pallas': no Pallas attention kernels "
                         f"for {platform!r} ({e}); use attention_impl='xla'") from None


def _by_platform(name: str):
    """Pass ``name`` with its kernel chosen by the platform the program is *lowered for*
    (``jax.lax.platform_dependent``), not by the host's default backend: a TPU program
    compiled ahead of time on a CPU host (``deepvit_jax.aot``) gets the Mosaic kernels, a
    CUDA/ROCm one the Triton kernels, a CPU one the GPU kernel code in Pallas interpret mode
    (slow; for tests). Every branch is traced; only the target platform's is lowered."""
    tpu, gpu = getattr(_kernels("tpu"), name), getattr(_kernels("gpu"), name)

    def fn(*args, **kw):
        triton = functools.partial(gpu, **kw)  # one object: cuda and rocm share one branch
        return jax.lax.platform_dependent(
            *args, tpu=functools.partial(tpu, **kw), cuda=triton, rocm=triton,
            default=functools.partial(gpu, interpret=True, **kw))

    return fn


def pallas_passes() -> Passes:
    """The Pallas kernels of the attention contract (``pallas_gpu.py`` / ``pallas_tpu.py``),
    imported on first use and chosen per lowering platform (:func:`_by_platform`)."""
    return Passes(*(_by_platform(f) for f in PASS_NAMES))


def _batch_axes(mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` (the data-parallel ones of deepvit_jax.parallel) that split the
    batch, or () for no mesh / an unsplit batch."""
    from deepvit_jax.parallel import BATCH_AXES

    if mesh is None or mesh.empty:
        return ()
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def per_shard(p: Passes, mesh, axes: tuple[str, ...]) -> Passes:
    """``p`` run on each shard of a batch split over ``axes`` of ``mesh`` (``jax.shard_map``):
    a ``pallas_call`` is opaque to XLA's partitioner, which would gather the whole batch to
    every device. Each pass sees its own examples; the H x H sums of F1 (Gram) and B1
    (dmix) are psum-ed over the shards, so the fold between the passes is global, as
    BatchNorm's batch statistics must be."""
    from jax.sharding import PartitionSpec as P

    bat, rep = P(axes), P()

    def sm(f, in_specs, out_specs):
        # check_vma=False: the kernels' outputs carry no varying-axis annotations.
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    def stats(q, k, *, scale):
        def f(q, k):
            lse, gram = p.stats(q, k, scale=scale)
            return lse, jax.lax.psum(gram, axes)
        return sm(f, (bat, bat), (bat, rep))(q, k)

    def apply(q, k, v, lse, mix, shift, *, scale):
        return sm(functools.partial(p.apply, scale=scale), (bat,) * 4 + (rep, rep),
                  bat)(q, k, v, lse, mix, shift)

    def bwd_stats(q, k, v, lse, dout, *, scale):
        def f(*a):
            return jax.lax.psum(p.bwd_stats(*a, scale=scale), axes)
        return sm(f, (bat,) * 5, rep)(q, k, v, lse, dout)

    def bwd(q, k, v, lse, dout, mix, shift, kmat, *, scale):
        return sm(functools.partial(p.bwd, scale=scale), (bat,) * 5 + (rep,) * 3,
                  (bat,) * 3)(q, k, v, lse, dout, mix, shift, kmat)

    return Passes(stats, apply, bwd_stats, bwd)


def passes(impl: str) -> Passes:
    if impl != "pallas":
        return XLA_PASSES
    mesh = jax.sharding.get_abstract_mesh()
    axes = _batch_axes(mesh)
    return per_shard(pallas_passes(), mesh, axes) if axes else pallas_passes()


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
        p = passes(impl)
        lse, _ = p.stats(q, k, scale=scale)
        return p.apply(q, k, v, lse, mix, shift, scale=scale)
    return xla.reattn_eval(q, k, v, mix, shift, scale=scale)


def reattention_train(impl: str, q, k, v, weight, gamma, beta, *, scale: float, eps: float):
    """Train-mode Re-attention (BatchNorm with batch statistics) -> (out, biased batch var)."""
    return folded.reattention_train(passes(impl), float(scale), float(eps), q, k, v,
                                    weight, gamma, beta)


__all__ = ["IMPLS", "Passes", "eval_fold", "passes", "per_shard", "plain", "reattention_eval",
           "reattention_train", "resolve"]
