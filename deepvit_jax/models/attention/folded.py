"""Train-mode Re-attention with BatchNorm over the head axis, folded (Zhou et al. 2021,
Re-attention = BatchNorm(Theta A); the fold is our derivation, checked against autodiff of
the reference in tests/test_attention.py).

With no attention dropout every softmax row sums to 1, so over the batch (M = B N^2 entries
per head) the mean of the mixed head o is exactly rowsum(W)_o / N + b_o, and its (biased)
variance is the quadratic form var_o = w_o^T C w_o with C the H x H covariance of the
centred maps A - 1/N. BatchNorm, Theta and its bias then fold into one H x H matrix
mix = diag(gamma / sqrt(var + eps)) W and a per-head shift applied to the values'
column sums; the bias b cancels (its gradient is exactly zero, it only moves the running
mean). The backward pass has closed forms, so a ``jax.custom_vjp`` replaces autodiff
through the normalisation:

    forward:  F1 (lse, Gram) -> var, mix, shift (H x H work) -> F2 (out)
    backward: B1 (dmix) -> dW, dgamma, dbeta, dvar, kmat (H x H work) -> B2 (dq, dk, dv)

The passes are a parameter (:class:`Passes`): the jnp ones of ``xla.py`` or the Pallas
kernels. The H x H statistics are sums over the batch axis: under ``jax.jit`` with a
sharded batch, XLA makes those sums global (an all-reduce of H x H numbers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


class Passes(NamedTuple):
    """The four pass functions of the attention contract (F1, F2, B1, B2)."""

    stats: Callable  # F1 (q, k, *, scale) -> (lse, gram)
    apply: Callable  # F2 (q, k, v, lse, mix, shift, *, scale) -> out
    bwd_stats: Callable  # B1 (q, k, v, lse, dout, *, scale) -> dmix_c
    bwd: Callable  # B2 (q, k, v, lse, dout, mix, shift, kmat, *, scale) -> (dq, dk, dv)


def _fold(passes, scale, eps, q, k, weight, gamma, beta):
    b, _, n, _ = q.shape
    lse, gram = passes.stats(q, k, scale=scale)
    cov = gram / (b * n * n)
    var = jnp.einsum("oh,hg,og->o", weight, cov, weight)
    inv = jax.lax.rsqrt(var + eps)
    mix = (gamma * inv)[:, None] * weight
    shift = beta - jnp.sum(mix, axis=1) / n
    return lse, cov, var, inv, mix, shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def reattention_train(passes: Passes, scale: float, eps: float, q, k, v, weight, gamma, beta):
    """BatchNorm_train(W A + b) weighing v, for heads-major q, k, v (B, H, N, D).

    Returns ``(out, var)``: out (B, H, N, D) in q's dtype and the biased batch variance (H,)
    of the mixed maps (for the running statistics; the batch mean is rowsum(W) / N + b).
    ``gamma`` and ``beta`` carry any ``transform_scale`` factor already.
    """
    lse, _, var, _, mix, shift = _fold(passes, scale, eps, q, k, weight, gamma, beta)
    return passes.apply(q, k, v, lse, mix, shift, scale=scale), var


def _fwd(passes, scale, eps, q, k, v, weight, gamma, beta):
    lse, cov, var, inv, mix, shift = _fold(passes, scale, eps, q, k, weight, gamma, beta)
    out = passes.apply(q, k, v, lse, mix, shift, scale=scale)
    return (out, var), (q, k, v, lse, weight, gamma, cov, inv, mix, shift)


def _bwd(passes, scale, eps, res, cts):
    q, k, v, lse, weight, gamma, cov, inv, mix, shift = res
    dout, dvar_out = cts
    b, _, n, _ = q.shape
    dmix = passes.bwd_stats(q, k, v, lse, dout, scale=scale)  # d/d mix of the centred maps
    # shift = beta - rowsum(mix)/N enters as shift[o] * sum_j v_o[j]: d beta = that sum.
    dbeta = jnp.einsum("bhid,bhd->h", dout.astype(F32), jnp.sum(v.astype(F32), axis=2))
    ds = jnp.sum(dmix * weight, axis=1)  # mix = diag(s) W, s = gamma / sqrt(var + eps)
    dgamma = ds * inv
    dvar = -0.5 * ds * gamma * inv**3 + dvar_out
    dweight = (gamma * inv)[:, None] * dmix + 2.0 * dvar[:, None] * (weight @ cov)
    kmat = 2.0 * weight.T @ (dvar[:, None] * weight) / (b * n * n)
    dq, dk, dv = passes.bwd(q, k, v, lse, dout, mix, shift, kmat, scale=scale)
    return dq, dk, dv, dweight, dgamma, dbeta


reattention_train.defvjp(_fwd, _bwd)


def eval_fold(weight, bias, gamma, beta, mean, var, eps):
    """Ordinary BatchNorm folding with running statistics -> (mix, shift)."""
    s = gamma * jax.lax.rsqrt(var + eps)
    shift = beta - s * mean
    if bias is not None:
        shift = shift + s * bias
    return s[:, None] * weight, shift
