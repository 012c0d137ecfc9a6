"""Attention-collapse measures (deepvit_jax.analysis) against an independent NumPy reading of
the paper's Eq. 2, hand-made cases, the model's own maps, plots and the CLI."""

import json
import os

import numpy as np
import pytest

from deepvit_jax import analysis


def _eq2_numpy(maps):
    """Eq. 2 written out with loops: M^{p,q}_{h,t} = cos(A^p[h, :, t], A^q[h, :, t]) for every
    image b, head h, token t, then the plain mean over (b, h, t)."""
    d = len(maps)
    b, h, n, _ = maps[0].shape
    out = np.zeros((d, d))
    for p in range(d):
        for q in range(d):
            vals = []
            for i in range(b):
                for hh in range(h):
                    for t in range(n):
                        x = maps[p][i, hh, :, t].astype(np.float64)
                        y = maps[q][i, hh, :, t].astype(np.float64)
                        vals.append(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
            out[p, q] = np.mean(vals)
    return out


def _heads_numpy(maps):
    d = len(maps)
    b, h, n, _ = maps[0].shape
    out = np.zeros((d, h, h))
    for p in range(d):
        for g in range(h):
            for hh in range(h):
                vals = [maps[p][i, g, :, t] @ maps[p][i, hh, :, t]
                        / (np.linalg.norm(maps[p][i, g, :, t])
                           * np.linalg.norm(maps[p][i, hh, :, t]))
                        for i in range(b) for t in range(n)]
                out[p, g, hh] = np.mean(vals)
    return out


def _softmax_maps(rng, d, b, h, n):
    z = rng.normal(size=(d, b, h, n, n)) * 2.0
    e = np.exp(z - z.max(-1, keepdims=True))
    return list((e / e.sum(-1, keepdims=True)).astype(np.float32))


def test_cross_layer_similarity_matches_numpy_eq2():
    rng = np.random.default_rng(0)
    maps = _softmax_maps(rng, 4, 2, 3, 5)
    # signed maps too (Re-attention's normalised maps are not positive)
    maps[2] = (maps[2] - maps[2].mean()) * 3.0
    want = _eq2_numpy(maps)
    got = np.asarray(analysis.cross_layer_similarity(maps))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(analysis.adjacent_similarity(maps)),
                               np.diag(want, 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(analysis.inter_head_similarity(maps)),
                               _heads_numpy(maps), atol=1e-5)
    # centred: Eq. 2 on columns minus their mean over the queries (a correlation)
    centred = [m - m.mean(axis=-2, keepdims=True) for m in maps]
    np.testing.assert_allclose(np.asarray(analysis.cross_layer_similarity(maps, center=True)),
                               _eq2_numpy(centred), atol=1e-5)
    # stacked input gives the same
    np.testing.assert_allclose(np.asarray(analysis.cross_layer_similarity(np.stack(maps))),
                               got, atol=1e-7)


def test_hand_made_cases():
    n = 4
    eye = np.eye(n, dtype=np.float32)[None, None]  # one image, one head: A = I
    perm = np.roll(np.eye(n, dtype=np.float32), 1, axis=0)[None, None]
    scaled = 3.0 * eye  # cosine ignores the scale
    m = np.asarray(analysis.cross_layer_similarity([eye, scaled, perm]))
    # identical (up to scale) -> 1; a permutation moves every column onto another query:
    # columns e_t vs e_{t+1} are orthogonal -> 0
    np.testing.assert_allclose(m, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-6)
    # uniform maps (an untrained model's) are all identical -> 1
    uni = np.full((2, 3, n, n), 1.0 / n, np.float32)
    np.testing.assert_allclose(np.asarray(analysis.cross_layer_similarity([uni, uni])), 1,
                               atol=1e-6)
    # opposite sign -> -1
    np.testing.assert_allclose(np.asarray(analysis.cross_layer_similarity([eye, -eye]))[0, 1],
                               -1, atol=1e-6)
    # uniform maps carry no pattern once centred: 0, whereas two different patterns plus
    # the same large uniform part have a cosine near 1 but a correlation of 0
    assert np.asarray(analysis.cross_layer_similarity([uni, uni], center=True))[0, 1] == 0
    a = (eye + 10.0)
    b = (perm + 10.0)
    assert np.asarray(analysis.cross_layer_similarity([a, b]))[0, 1] > 0.99
    np.testing.assert_allclose(
        np.asarray(analysis.cross_layer_similarity([a, b], center=True))[0, 1], -1 / 3,
        atol=1e-5)
    # an all-zero column counts as 0, not NaN
    zero = np.zeros_like(eye)
    assert np.asarray(analysis.cross_layer_similarity([eye, zero]))[0, 1] == 0


def test_to_next_and_similar_blocks():
    m = np.array([[1.0, 0.95, 0.5, 0.1],
                  [0.95, 1.0, 0.92, 0.3],
                  [0.5, 0.92, 1.0, 0.8],
                  [0.1, 0.3, 0.8, 1.0]])
    np.testing.assert_allclose(analysis.similarity_to_next(m, 1), [0.95, 0.92, 0.8])
    np.testing.assert_allclose(analysis.similarity_to_next(m, 2),
                               [(0.95 + 0.5) / 2, (0.92 + 0.3) / 2, 0.8])
    assert analysis.similar_blocks(m, 0.9, k=1) == 2
    assert analysis.similar_blocks(m, 0.7, k=2) == 2  # 0.725, 0.61, 0.8
    assert analysis.similar_blocks(m, 0.75, k=2) == 1
    assert analysis.similar_blocks(m, 0.99) == 0
    np.testing.assert_allclose(analysis.mean_off_diagonal(np.array([[[1, 0.2], [0.4, 1]]])),
                               [0.3])
    with pytest.raises(ValueError, match="k=0"):
        analysis.similarity_to_next(m, 0)


def test_model_maps_and_analyse_agree_with_numpy():
    """analyse() (batch by batch, on device) equals Eq. 2 on the maps collect_maps returns,
    which are the model's return_attention maps; the class-token row is reshaped on the
    patch grid."""
    from flax import nnx

    from deepvit_jax import create_model

    model = create_model("vit_16b", num_classes=10, rngs=nnx.Rngs(0), image_size=16,
                         patch_size=8, embed_dim=16, depth=3, num_heads=2)
    x = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype(np.float32)
    maps = analysis.collect_maps(model, x, batch_size=2)
    _, direct = model(x, return_attention=True)
    assert len(maps) == 3 and maps[0].shape == (4, 2, 5, 5)
    for a, b in zip(maps, direct, strict=True):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-6)
    r = analysis.analyse(model, x, batch_size=2, k=1, threshold=0.5)
    want = _eq2_numpy(maps)
    np.testing.assert_allclose(r["cross_layer"], want, atol=1e-5)
    np.testing.assert_allclose(r["to_next"], np.diag(want, 1), atol=1e-5)
    assert r["similar_blocks"] == int(np.sum(np.diag(want, 1) >= 0.5))
    np.testing.assert_allclose(r["inter_head"], _heads_numpy(maps), atol=1e-5)
    cls = analysis.cls_attention(maps[1])
    assert cls.shape == (4, 2, 2, 2)
    np.testing.assert_array_equal(cls[2, 1].ravel(), maps[1][2, 1, 0, 1:])


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    maps = _softmax_maps(rng, 3, 2, 2, 5)
    m = np.asarray(analysis.cross_layer_similarity(maps))
    h = np.asarray(analysis.inter_head_similarity(maps))
    r = analysis.summarise(m, h, k=1, threshold=0.9, num_images=2)
    json.dumps(r)  # JSON-ready
    analysis.plot_similarity({"a": r, "b": r}, str(tmp_path / "s.png"))
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    analysis.plot_attention(images, maps, [0, 2], str(tmp_path / "a.png"))
    for f in ("s.png", "a.png"):
        with open(tmp_path / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["a.png", "s.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="block 5"):
        analysis.plot_attention(images, maps, [5])
