"""timm ViT/DeiT layout -> our ViT, and -> a DeepViT with identity Re-attention on chosen
blocks that computes exactly the ViT's function (reference: deepvit_jax/reference/timm_vit.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepvit_jax.convert import (ConversionError, from_pytorch, identity_reattention,  # noqa: E402
                                 to_pytorch)
from deepvit_jax.models.registry import get_config  # noqa: E402
from deepvit_jax.reference import official as R  # noqa: E402
from deepvit_jax.reference.timm_vit import VisionTransformer  # noqa: E402


@torch.no_grad()
def _timm_vit(seed=0):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=4,
                            num_heads=3, mlp_ratio=4.0)
    for m in vit.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.add_(torch.randn(m.weight.shape) * 0.2)
            m.bias.add_(torch.randn(m.bias.shape) * 0.2)
    return vit.eval()


def test_timm_vit_to_vit_and_deepvit():
    vit = _timm_vit()
    sd = vit.state_dict()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = vit(x).numpy()
    xj = x.permute(0, 2, 3, 1).numpy()

    plain = from_pytorch(sd, source="timm", num_heads=3)
    cfg = plain.config
    assert (cfg.depth, cfg.embed_dim, cfg.hidden_dim, cfg.patch_size, cfg.image_size,
            cfg.reattn_indices) == (4, 48, 192, 8, 32, ())
    got_plain = np.asarray(plain(xj))
    np.testing.assert_allclose(got_plain, want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.1

    deep = from_pytorch(sd, source="timm", num_heads=3, reattn_blocks=(1, 3))
    assert deep.config.reattn_indices == (1, 3)
    got_deep, maps = deep(xj, return_attention=True)
    np.testing.assert_allclose(np.asarray(got_deep), want, rtol=0, atol=1e-5)
    # identity Re-attention is exact in float32, not just close: with the reference
    # attention (the formulas), the same numbers as the ViT, maps and logits
    plain_ref = from_pytorch(sd, source="timm", num_heads=3, attention_impl="reference")
    deep_ref = from_pytorch(sd, source="timm", num_heads=3, reattn_blocks=(1, 3),
                            attention_impl="reference")
    np.testing.assert_array_equal(np.asarray(deep_ref(xj)), np.asarray(plain_ref(xj)))
    _, plain_maps = plain(xj, return_attention=True)
    np.testing.assert_array_equal(np.asarray(maps[1]), np.asarray(plain_maps[1]))
    # the default (folded) attention computes in another order: equal to rounding
    np.testing.assert_allclose(np.asarray(deep(xj)), got_plain, rtol=0, atol=2e-6)

    # the DeepViT goes out in the official layout and the official reference computes the
    # ViT's logits too (Theta = I, BN with var = 1 - eps)
    back = to_pytorch(deep)
    assert "blocks.1.attn.reatten_matrix.weight" in back and "blocks.0.attn.var_norm.weight" \
        not in back
    ref = R.DeepVisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=48,
                                  depth=4, num_heads=3, mlp_ratio=4.0, reattn=(1, 3))
    ref.load_state_dict(back, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(ref.eval()(x).numpy(), want, rtol=0, atol=1e-5)

    # train mode: the added BatchNorms normalise with batch statistics, as the official
    # model does with the same weights (logits and the moved running statistics); the
    # network then differs from the ViT, as any freshly added BatchNorm makes it
    for impl in ("reference", "auto"):
        ref.load_state_dict(back, strict=True)
        with torch.no_grad():
            want_train = ref.train()(x).numpy()
        model = from_pytorch(sd, source="timm", num_heads=3, reattn_blocks=(1, 3),
                             attention_impl=impl)
        model.train()
        got_train = np.asarray(model(xj))
        np.testing.assert_allclose(got_train, want_train, rtol=0, atol=1e-5, err_msg=impl)
        assert np.abs(want_train - want).max() > 1e-2
        moved = to_pytorch(model)
        for k in ("blocks.1.attn.var_norm.running_mean", "blocks.3.attn.var_norm.running_var"):
            assert not torch.equal(moved[k], back[k])
            np.testing.assert_allclose(moved[k].numpy(), ref.state_dict()[k].numpy(),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{impl}: {k}")


def test_identity_reattention_is_exact():
    cfg = get_config("deepvit_16b")
    w = identity_reattention(cfg, 0)
    var = w[("blocks", 0, "attn", "reattn_norm", "var")]
    assert np.all(np.float32(var + np.float32(cfg.reattn_norm_eps)) == np.float32(1.0))
    np.testing.assert_array_equal(w[("blocks", 0, "attn", "reattn_weight")], np.eye(12))
    with pytest.raises(ConversionError, match="transform_scale"):
        identity_reattention(get_config("deepvit_s"), 11)


def test_timm_needs_num_heads_and_rejects_distilled():
    sd = _timm_vit().state_dict()
    with pytest.raises(ConversionError, match="num_heads"):
        from_pytorch(sd, source="timm")
    distilled = {**sd, "dist_token": torch.zeros(1, 1, 48), "head_dist.weight": torch.zeros(10, 48)}
    with pytest.raises(ConversionError, match="dist_token"):
        from_pytorch(distilled, source="timm", num_heads=3)
