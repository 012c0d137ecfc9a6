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


def test_analyse_collapse_on_a_model_matches_numpy():
    """block_outputs gives the model's own logits and maps; the softmax maps before mixing
    are stochastic rows; analyse_collapse's numbers are NumPy's on those maps / tokens."""
    from flax import nnx

    from deepvit_jax import create_model

    model = create_model("deepvit_16b", num_classes=10, rngs=nnx.Rngs(0), image_size=16,
                         patch_size=8, embed_dim=16, depth=3, num_heads=2)
    model.eval()
    x = np.random.default_rng(4).normal(size=(5, 16, 16, 3)).astype(np.float32)
    logits, weights, softmax, tokens = analysis.block_outputs(model, x)
    want_logits, want_maps = model(x, return_attention=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5)
    weights = [np.asarray(w, np.float64) for w in weights]
    softmax = [np.asarray(s, np.float64) for s in softmax]
    tokens = np.stack([np.asarray(t, np.float64) for t in tokens])
    for a, b in zip(weights, want_maps, strict=True):
        np.testing.assert_allclose(a, np.asarray(b), atol=1e-6)
    for s in softmax:
        assert s.min() >= 0
        np.testing.assert_allclose(s.sum(-1), 1, atol=1e-5)
    r = analysis.analyse_collapse(model, x, batch_size=2, threshold=0.5)
    json.dumps(r)
    for kind, maps in (("weights", weights), ("softmax", softmax)):
        eq2, ab, al = _measures_numpy(maps)
        for name, m in (("eq2", eq2), ("abs", ab), ("aligned", al)):
            np.testing.assert_allclose(r[f"{kind}/{name}"]["matrix"], m, atol=1e-5)
            np.testing.assert_allclose(r[f"{kind}/{name}"]["adjacent"], np.diag(m, 1),
                                       atol=1e-5)
            assert r[f"{kind}/{name}"]["similar_blocks"] == int(np.sum(np.diag(m, 1) >= 0.5))
        cos = np.stack([_element_cosines(maps[p], maps[p + 1]) for p in range(2)])
        np.testing.assert_allclose(r[f"{kind}/quantiles"]["q50"],
                                   [np.median(c) for c in cos], atol=1e-5)
        assert sum(r[f"{kind}/histogram"]) == cos[1:].size  # pairs of the second half
    ent = [np.mean([-np.sum(row[row > 0] * np.log(row[row > 0]))
                    for row in s.reshape(-1, s.shape[-1])]) / np.log(5) for s in softmax]
    np.testing.assert_allclose(r["softmax/uniformity"], ent, atol=1e-5)
    feats = tokens.reshape(3, -1, 16)
    np.testing.assert_allclose(r["cka"]["adjacent"],
                               [_cka_numpy(feats[p], feats[p + 1]) for p in range(2)],
                               atol=1e-6)


TINY = ["--depths", "2,3", "--seeds", "0", "--widths", "", "--width", "8", "--heads", "2",
        "--steps", "2", "--batch-size", "16", "--image-size", "8", "--patch-size", "4",
        "--num-images", "8"]


def test_sweep_writes_its_report_and_resumes_without_redoing_finished_runs(
        tmp_path, data_dir, monkeypatch, capsys):
    trained = []
    real = sweep._train
    monkeypatch.setattr(sweep, "_train", lambda c, w: (trained.append(os.path.basename(w)),
                                                       real(c, w)))
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--data-dir", data_dir, *TINY]
    assert analysis_main.main(argv) == 0
    names = ["vit_d2_w8_s0", "deepvit_d2_w8_s0", "vit_d3_w8_s0", "deepvit_d3_w8_s0"]
    assert trained == names
    report = json.loads((out / "report.json").read_text())
    assert report["num_runs"] == 4 and sorted(report["runs"]) == sorted(names)
    d3 = report["depth_sweep"]["deepvit"]["3"]
    assert d3["seeds"] == [0] and len(d3["weights/eq2"]["adjacent_mean_over_seeds"]) == 2
    assert 0 <= d3["top1"]["mean"] <= 100
    for f in ("adjacent.png", "depth.png", "histogram.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # report.md: one table row per (model, depth), its cells the JSON's values
    rows = [line for line in (out / "report.md").read_text().splitlines()
            if line.startswith(("| vit |", "| deepvit |"))]
    assert len(rows) == 4
    cells = next(r for r in rows if r.startswith("| deepvit | 3 |")).strip("| ").split(" | ")
    t = d3["top1"]
    assert cells[2:4] == ["0", f"{t['mean']:.1f} ({t['min']:.1f}-{t['max']:.1f})"]
    similar = [f"{d3[k]['similar_blocks']['mean']:.1f} " for k in
               ("weights/eq2", "softmax/eq2", "weights/abs", "weights/aligned", "cka")]
    assert [c[:len(s)] for c, s in zip(cells[4:9], similar, strict=True)] == similar
    assert all(c.endswith(" of 2") for c in cells[4:9])
    assert cells[9].startswith(f"{d3['weights/eq2']['mean_adjacent']['mean']:.2f} (")
    assert "[4/4] deepvit_d3_w8_s0: top-1" in capsys.readouterr().out
    # Interrupted: one run's directory lost, another trained but not analysed yet.
    import shutil

    shutil.rmtree(out / "runs" / "vit_d3_w8_s0")
    (out / "runs" / "deepvit_d2_w8_s0" / "result.json").unlink()
    kept = out / "runs" / "vit_d2_w8_s0" / "result.json"
    mtime = kept.stat().st_mtime_ns
    trained.clear()
    assert analysis_main.main(argv) == 0
    assert trained == ["vit_d3_w8_s0"]  # only the missing run is trained again
    assert kept.stat().st_mtime_ns == mtime  # a finished run is read back, not redone
    assert (out / "runs" / "deepvit_d2_w8_s0" / "result.json").exists()  # re-analysed
    assert json.loads((out / "report.json").read_text())["num_runs"] == 4
    # another sweep's settings in the same --out: refused in one line, nothing trained
    trained.clear()
    capsys.readouterr()
    assert analysis_main.main([*argv, "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was made with other settings" in err and len(err.splitlines()) == 1
    assert trained == []


@pytest.mark.parametrize("flags, message", [
    (["--depths", "1"], "need at least 2 blocks"),
    (["--width", "6", "--heads", "4"], "width 6: must be a positive multiple of --heads 4"),
    (["--image-size", "10", "--patch-size", "4"], "--image-size 10 is not a multiple"),
    (["--seeds", ""], "--seeds: give at least one"),
])
def test_sweep_bad_settings_are_one_line(tmp_path, capsys, flags, message):
    assert analysis_main.main(["sweep", "--out", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "s" / "runs")
