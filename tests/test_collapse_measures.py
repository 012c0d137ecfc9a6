"""The like-for-like collapse measures (issue 21) against independent NumPy computations
written out here, their defining cases (a sign flip, CKA's invariances), and the sweep
runner at a tiny setting: it writes its report and, re-run after an interruption, redoes
only what is missing."""

import json
import os

import numpy as np
import pytest

from deepvit_jax import analysis
from deepvit_jax.analysis import __main__ as analysis_main
from deepvit_jax.analysis import similarity as sim
from deepvit_jax.analysis import sweep


def _cos(x, y):
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _element_cosines(a, b):
    """cos(A^p[i, h, :, t], A^q[i, h, :, t]) for every image i, head h, token t: (B, H, N)."""
    bsz, heads, n, _ = a.shape
    out = np.zeros((bsz, heads, n))
    for i in range(bsz):
        for h in range(heads):
            for t in range(n):
                out[i, h, t] = _cos(a[i, h, :, t].astype(np.float64),
                                    b[i, h, :, t].astype(np.float64))
    return out


def _measures_numpy(maps):
    """(eq2, abs, aligned) D x D: the mean cosine; the mean |cosine|; per head the |mean
    cosine over images and tokens|, then the mean over heads."""
    d = len(maps)
    eq2, ab, al = np.zeros((d, d)), np.zeros((d, d)), np.zeros((d, d))
    for p in range(d):
        for q in range(d):
            c = _element_cosines(maps[p], maps[q])
            eq2[p, q], ab[p, q] = c.mean(), np.abs(c).mean()
            al[p, q] = np.mean([abs(c[:, h].mean()) for h in range(c.shape[1])])
    return eq2, ab, al


def _cka_numpy(x, y):
    """Linear CKA in its Gram-matrix (HSIC) form: tr(Kc Lc) / sqrt(tr(Kc Kc) tr(Lc Lc)),
    K = X X^T, L = Y Y^T, Kc = H K H with H the centring matrix."""
    n = len(x)
    hmat = np.eye(n) - np.ones((n, n)) / n
    k = hmat @ (x @ x.T) @ hmat
    m = hmat @ (y @ y.T) @ hmat
    return np.trace(k @ m) / np.sqrt(np.trace(k @ k) * np.trace(m @ m))


def _maps(rng, d=4, b=2, h=3, n=5):
    z = rng.normal(size=(d, b, h, n, n)) * 2.0
    e = np.exp(z - z.max(-1, keepdims=True))
    maps = list((e / e.sum(-1, keepdims=True)).astype(np.float32))
    maps[2] = ((maps[2] - maps[2].mean()) * 3.0).astype(np.float32)  # signed, like Re-attn
    maps[3] = (-maps[1] + 0.1 * rng.normal(size=maps[1].shape)).astype(np.float32)
    return maps


def test_pair_measures_and_element_cosines_match_numpy():
    maps = _maps(np.random.default_rng(0))
    b, _, n, _ = maps[0].shape
    signed, absolute = sim.pair_sums(maps)
    got = sim.pair_measures(signed, absolute, b * n)
    eq2, ab, al = _measures_numpy(maps)
    np.testing.assert_allclose(got["eq2"], eq2, atol=1e-5)
    np.testing.assert_allclose(got["abs"], ab, atol=1e-5)
    np.testing.assert_allclose(got["aligned"], al, atol=1e-5)
    assert got["eq2"][1, 3] < -0.5 < 0.5 < got["abs"][1, 3]  # the near sign flip
    cos = np.asarray(sim.adjacent_cosines(maps))
    want = np.stack([_element_cosines(maps[p], maps[p + 1]) for p in range(3)])
    np.testing.assert_allclose(cos, want, atol=1e-5)
    q = sim.quantiles(cos)
    for p in range(3):
        flat = sorted(want[p].ravel())
        for key, level in (("q05", 0.05), ("q50", 0.5), ("q95", 0.95)):
            pos = level * (len(flat) - 1)  # linear interpolation between order statistics
            lo = int(pos)
            assert q[key][p] == pytest.approx(
                flat[lo] + (pos - lo) * (flat[lo + 1] - flat[lo]), abs=1e-5)


def test_sign_flip_scores_one_for_the_sign_invariant_measures():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    got = sim.pair_measures(*sim.pair_sums([a, -a]), 2 * 6)
    assert got["eq2"][0, 1] == pytest.approx(-1, abs=1e-6)  # the paper's cosine: opposite
    assert got["abs"][0, 1] == pytest.approx(1, abs=1e-6)
    assert got["aligned"][0, 1] == pytest.approx(1, abs=1e-6)
    # one head flipped of two: the signed mean cancels to 0, the aligned one stays 1
    b = a.copy()
    b[:, 1] *= -1
    got = sim.pair_measures(*sim.pair_sums([a, b]), 2 * 6)
    assert got["eq2"][0, 1] == pytest.approx(0, abs=1e-6)
    assert got["abs"][0, 1] == pytest.approx(1, abs=1e-6)
    assert got["aligned"][0, 1] == pytest.approx(1, abs=1e-6)


def test_row_entropy_matches_numpy():
    rng = np.random.default_rng(2)
    maps = _maps(rng)[:2]
    maps[0][0, 0, 0] = np.eye(5)[2]  # one one-hot row (0 log 0 = 0)
    got = np.asarray(sim.row_entropy(maps))
    for p, m in enumerate(maps):
        rows = m.reshape(-1, 5).astype(np.float64)
        ent = [-sum(v * np.log(v) for v in r if v > 0) for r in rows]
        assert got[p] == pytest.approx(sum(ent) / np.log(5), rel=1e-5)
    uniform = np.full((1, 1, 4, 4), 0.25, np.float32)
    assert float(sim.row_entropy([uniform])[0]) == pytest.approx(4, rel=1e-6)  # 4 rows of 1


def test_cka_identity_rotation_scale_and_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert sim.linear_cka(x, x) == pytest.approx(1, abs=1e-10)
    assert sim.linear_cka(x, 3.7 * x @ q) == pytest.approx(1, abs=1e-10)  # rotation, scale
    assert sim.linear_cka(x, x + 5.0) == pytest.approx(1, abs=1e-10)  # centred
    y = rng.normal(size=(50, 8))
    z = np.tanh(x[:, :5]) + 0.3 * rng.normal(size=(50, 5))  # another width
    assert sim.linear_cka(x, y) == pytest.approx(_cka_numpy(x, y), abs=1e-10)
    assert sim.linear_cka(x, z) == pytest.approx(_cka_numpy(x, z), abs=1e-10)
    assert sim.linear_cka(x, y) < 0.5 < sim.linear_cka(x, z)
    m = sim.cka_matrix(np.stack([x, y, 2 * x @ q]))
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1)
    assert m[0, 2] == pytest.approx(1, abs=1e-10)
    assert m[0, 1] == pytest.approx(_cka_numpy(x, y), abs=1e-10)
    with pytest.raises(ValueError, match="expected \\(blocks, samples, channels\\)"):
        sim.cka_matrix(x)
