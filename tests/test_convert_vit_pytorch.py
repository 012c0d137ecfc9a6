"""vit-pytorch's DeepViT (PyPI vit-pytorch, loaded by file path) -> JAX: sizes inferred from
the shapes, logit parity for several shapes with cls and mean pooling, round trip back to
the vit-pytorch key layout."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("einops")

from deepvit_jax.convert import ConversionError, from_pytorch, to_pytorch  # noqa: E402
from deepvit_jax.reference.vit_pytorch import load_deepvit_class  # noqa: E402

# (image, patch, dim, depth, heads, dim_head, mlp_dim, pool, classes)
SHAPES = [
    (32, 8, 64, 2, 4, 16, 128, "cls", 10),
    (32, 16, 48, 3, 3, 24, 96, "mean", 7),
    (24, 4, 40, 2, 8, 8, 80, "cls", 5),  # dim_head * heads != dim
    (16, 8, 32, 4, 2, 32, 64, "mean", 3),
]


@torch.no_grad()
def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("reattn_weights"):
            continue  # already N(0, 1)
        if p.ndim == 1:  # LayerNorm affine, biases: away from the 1 / 0 defaults
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}px-p{s[1]}-d{s[2]}-{s[7]}"
                                               for s in SHAPES])
def test_vit_pytorch_parity(shape):
    image, patch, dim, depth, heads, dim_head, mlp_dim, pool, classes = shape
    torch.manual_seed(sum(shape[:7]))
    DeepViT = load_deepvit_class()
    ref = _randomize(DeepViT(image_size=image, patch_size=patch, num_classes=classes, dim=dim,
                             depth=depth, heads=heads, mlp_dim=mlp_dim, pool=pool,
                             dim_head=dim_head), seed=depth).eval()
    sd = ref.state_dict()
    model = from_pytorch(sd, pool=pool)  # everything else from the shapes (source detected)
    cfg = model.config
    assert (cfg.image_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
            cfg.dim_head, cfg.hidden_dim, cfg.num_classes, cfg.pool) == (
        image, patch, dim, depth, heads, dim_head, mlp_dim, classes, pool)

    x = torch.randn(3, 3, image, image, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).numpy()
    got = np.asarray(model(x.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.1

    # vit-pytorch's eps, 1e-5 for every LayerNorm (tokens and the head axis); the head-axis
    # variance is small, so eps 1e-6 there would move the logits
    assert (cfg.ln_eps, cfg.reattn_norm_eps) == (1e-5, 1e-5)
    lns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.LayerNorm)]
    assert len(lns) == 2 * depth + 3 + depth and all(m.epsilon == 1e-5 for m in lns)
    if shape == SHAPES[0]:
        other = from_pytorch(sd, pool=pool, reattn_norm_eps=1e-6)
        assert np.abs(np.asarray(other(x.permute(0, 2, 3, 1).numpy())) - want).max() > 1e-3

    # the other pooling gives different logits: the flag matters
    other = from_pytorch(sd, pool="mean" if pool == "cls" else "cls")
    assert np.abs(np.asarray(other(x.permute(0, 2, 3, 1).numpy())) - want).max() > 1e-3

    # back to the vit-pytorch layout, bit-exact, and loadable with strict=True
    back = to_pytorch(model)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    ref.load_state_dict(back, strict=True)


def test_vit_pytorch_model_not_writable_as_official():
    DeepViT = load_deepvit_class()
    ref = DeepViT(image_size=16, patch_size=8, num_classes=3, dim=32, depth=1, heads=2,
                  mlp_dim=64)
    model = from_pytorch(ref.state_dict())
    with pytest.raises(ConversionError, match="official layout"):
        to_pytorch(model, layout="official")
    sd = dict(ref.state_dict())
    del sd["transformer.layers.0.0.reattn_weights"]
    with pytest.raises(ConversionError, match="reattn_weights"):
        from_pytorch(sd)
