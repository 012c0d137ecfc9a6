"""Official DeepViT checkpoints -> JAX: logit / attention / BatchNorm parity against our
PyTorch reference (deepvit_jax/reference/official.py), checkpoint file formats, bad input, and
the bit-exact round trip back to PyTorch."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepvit_jax.convert import ConversionError, from_pytorch, save_pytorch, to_pytorch  # noqa: E402
from deepvit_jax.convert.official import guess_official_variant  # noqa: E402
from deepvit_jax.convert.pytorch import convert_state_dict  # noqa: E402
from deepvit_jax.convert.torch_files import load_state_dict  # noqa: E402
from deepvit_jax.models.registry import get_config  # noqa: E402
from deepvit_jax.reference import official as R  # noqa: E402

VARIANTS_REF = R.VARIANTS

NUM_CLASSES = 10
# (official entrypoint, our name, test image size, width override). Each variant keeps its
# structure (depth, 12 heads, stem, re-attention blocks, adjust_ratio, transform_scale) at
# small images; the 32-block ones run at width 12 x 8 to stay fast (DeepViT-S keeps its
# head dim 33: transform_scale multiplies by 33**-0.5).
CASES = [
    ("deepvit_patch16_224_re_attn_16b", "deepvit_16b", 32, None),
    ("deepvit_patch16_224_re_attn_24b", "deepvit_24b", 32, None),
    ("deepvit_patch16_224_re_attn_32b", "deepvit_32b", 32, 96),
    ("deepvit_S", "deepvit_s", 32, None),
    ("deepvit_L", "deepvit_l", 32, 96),
    ("deepvit_L_384", "deepvit_l_384", 48, 96),
    ("vit_16b", "vit_16b", 32, None),
    ("vit_24b", "vit_24b", 32, 96),
    ("vit_32b", "vit_32b", 32, 96),
]


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def _ref(official, image_size, seed=0, **kw):
    torch.manual_seed(seed)
    return R.randomize_(R.create(official, img_size=image_size, num_classes=NUM_CLASSES, **kw),
                        seed=seed)


def _small_pair(seed=0):
    """A 2-block DeepViT-16 structure at 32 px: reference + the kwargs to convert it."""
    ref = _ref("deepvit_patch16_224_re_attn_16b", 32, seed=seed, depth=2, reattn=range(2))
    kw = dict(model="deepvit_16b", image_size=32, num_classes=NUM_CLASSES, depth=2,
              reattn_blocks=(0, 1))
    return ref, kw


@pytest.mark.parametrize("official,ours,size,width", CASES, ids=[c[1] for c in CASES])
def test_official_parity(official, ours, size, width):
    over = {"embed_dim": width} if width else {}
    ref = _ref(official, size, **over)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    model = from_pytorch(sd, model=ours, image_size=size, num_classes=NUM_CLASSES, **over)
    assert model.config.reattn_indices == tuple(VARIANTS_REF[official]["reattn"])
    cfg = model.config
    assert cfg.depth == len(ref.blocks) and cfg.image_size == size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))

    # eval mode: logits and every block's (re-)attention map
    ref.eval()
    with torch.no_grad():
        want, want_maps = ref(x, return_attention=True)
    got, got_maps = model(_nhwc(x), return_attention=True)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=1e-5)
    assert float(want.abs().max()) > 0.1  # the comparison is not between two near-zeros
    if ours == "deepvit_s":  # the default attention (maps not returned): folded eval BN
        np.testing.assert_allclose(np.asarray(model(_nhwc(x))), want.numpy(), rtol=0,
                                   atol=1e-5)
    assert len(got_maps) == len(want_maps) == cfg.depth
    for i, (g, w) in enumerate(zip(got_maps, want_maps, strict=True)):
        np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=0, atol=1e-5,
                                   err_msg=f"attention map of block {i}")

    # back to PyTorch: same keys, bit-exact values
    back = to_pytorch(model)
    assert list(back) == list(sd) or set(back) == set(sd)
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k

    # train mode (batch statistics; no dropout / drop path in these configs): logits and
    # the updated running statistics (PyTorch's unbiased running_var update)
    ref.train()
    with torch.no_grad():
        want_train = ref(x)
    model.train()
    got_train = model(_nhwc(x))
    # Batch statistics over 3 images amplify float32 rounding: measured up to 2.3e-5 for the
    # 32-block stem models (DeepViT-L), <= 1e-6 in eval mode.
    np.testing.assert_allclose(np.asarray(got_train), want_train.numpy(), rtol=0, atol=5e-5)
    updated, ref_sd = to_pytorch(model), ref.state_dict()
    bn_keys = [k for k in ref_sd if k.endswith(("running_mean", "running_var"))]
    assert len(bn_keys) == 2 * (len(cfg.reattn_indices) + 2 * (cfg.patch_embed == "cnn_stem"))
    for k in bn_keys:
        assert not torch.equal(ref_sd[k], sd[k]), f"{k} did not move"
        np.testing.assert_allclose(updated[k].numpy(), ref_sd[k].numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=k)


# Spec section 3-4: parameters and state-dict keys of the full-size official models.
FULL = {
    "deepvit_patch16_224_re_attn_16b": ("deepvit_16b", 312, 24_426_664),
    "deepvit_patch16_224_re_attn_24b": ("deepvit_24b", 464, 36_261_448),
    "deepvit_patch16_224_re_attn_32b": ("deepvit_32b", 616, 48_096_232),
    "deepvit_S": ("deepvit_s", 247, 27_312_632),
    "deepvit_L": ("deepvit_l", 488, 58_883_708),
    "deepvit_L_384": ("deepvit_l_384", 488, 59_043_308),
}


@pytest.mark.parametrize("official", list(FULL))
def test_reference_full_size_counts(official):
    """Our PyTorch reference has the official key set and parameter count (meta device: no
    memory, no compute)."""
    with torch.device("meta"):
        ref = R.create(official)
    _, keys, params = FULL[official]
    assert len(ref.state_dict()) == keys
    assert sum(p.numel() for p in ref.parameters()) == params


@pytest.mark.slow
@pytest.mark.parametrize("official", ["deepvit_patch16_224_re_attn_16b", "deepvit_S",
                                      "deepvit_L_384"])
def test_full_size_key_mapping(official):
    """Every key of the full-size official state dict maps onto the full-size JAX variant
    with the right shape (shapes only: zero-stride arrays, abstract JAX model)."""
    ours, keys, _ = FULL[official]
    with torch.device("meta"):
        ref = R.create(official)
    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    cfg = get_config(ours)
    arrays = convert_state_dict(sd, cfg, "official")
    num_bn = len(cfg.reattn_indices) + 2 * (cfg.patch_embed == "cnn_stem")
    assert len(arrays) == len(sd) == keys - num_bn  # num_batches_tracked dropped
    n_params = sum(a.size for p, a in arrays.items() if p[-1] not in ("mean", "var"))
    assert n_params == FULL[official][2]
    assert guess_official_variant(sd) == ours


# ---------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------


def _logits(model, x):
    return np.asarray(model(_nhwc(x)))


def test_checkpoint_file_formats(tmp_path):
    ref, kw = _small_pair()
    ref.eval()
    ema, _ = _small_pair(seed=1)
    sd, sd_ema = ref.state_dict(), ema.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, want_ema = ref(x).numpy(), ema.eval()(x).numpy()

    # a timm training file: state_dict + state_dict_ema + args (argparse.Namespace)
    timm_file = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 299, "arch": "deepvit_patch16_224_re_attn_16b",
                "state_dict": sd, "state_dict_ema": sd_ema, "optimizer": {"state": {}},
                "version": 2, "args": argparse.Namespace(lr=5e-4, model_ema=True)}, timm_file)
    np.testing.assert_allclose(_logits(from_pytorch(timm_file, **kw), x), want, atol=1e-5)
    np.testing.assert_allclose(_logits(from_pytorch(str(timm_file), ema=True, **kw), x),
                               want_ema, atol=1e-5)

    # bare, {'model': ...}, DataParallel 'module.' prefix, safetensors
    variants = {
        "bare.pth": sd,
        "model.pth": {"model": sd},
        "ddp.pth": {"state_dict": {"module." + k: v for k, v in sd.items()}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        got = _logits(from_pytorch(tmp_path / name, **kw), x)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    save_pytorch(to_pytorch(from_pytorch(sd, **kw)), tmp_path / "w.safetensors")
    np.testing.assert_allclose(_logits(from_pytorch(tmp_path / "w.safetensors", **kw), x),
                               want, atol=1e-5)

    # num_batches_tracked is dropped, not an unexpected key; the variant is recognised
    loaded = load_state_dict(timm_file)
    assert not any(k.endswith("num_batches_tracked") for k in loaded)
    assert len(loaded) == len(sd) - 2


def test_written_pytorch_files_load_strictly(tmp_path):
    """to_pytorch -> .pth / .safetensors -> the reference loads it with strict=True and
    computes the same logits."""
    ref, kw = _small_pair()
    model = from_pytorch(ref.state_dict(), **kw)
    x = torch.randn(2, 3, 32, 32)
    want = _logits(model, x)
    for name in ("out.pth", "out.safetensors"):
        path = save_pytorch(to_pytorch(model), tmp_path / name)
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, weights_only=True)
        fresh, _ = _small_pair(seed=5)
        fresh.load_state_dict(sd, strict=True)  # official key set incl. num_batches_tracked
        with torch.no_grad():
            np.testing.assert_allclose(fresh.eval()(x).numpy(), want, atol=1e-5)
    assert not list(tmp_path.glob("*deepvit-partial*"))


# ---------------------------------------------------------------------------------------
# Bad input: every error names the offending keys and shapes
# ---------------------------------------------------------------------------------------


def test_missing_unexpected_and_shape_errors():
    ref, kw = _small_pair()
    sd = dict(ref.state_dict())
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(ConversionError, match=r"1 missing keys:\n\s+blocks\.1\.attn\.qkv\.weight "
                                              r"\(1152, 384\)"):
        from_pytorch(missing, **kw)
    extra = {**sd, "blocks.1.attn.extra.weight": torch.zeros(3, 4)}
    with pytest.raises(ConversionError, match=r"unexpected keys:\n\s+blocks\.1\.attn\.extra"
                                              r"\.weight \(3, 4\)"):
        from_pytorch(extra, **kw)
    with pytest.raises(ConversionError, match=r"head\.weight: checkpoint \(10, 384\), model "
                                              r"expects \(7, 384\)"):
        from_pytorch(sd, **{**kw, "num_classes": 7})
    with pytest.raises(ConversionError, match="no EMA weights"):
        from_pytorch({"state_dict": sd}, ema=True, **kw)


def test_wrong_variant_is_named():
    with torch.device("meta"):
        ref = R.create("deepvit_S")
    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, get_config("deepvit_16b"), "official")
    msg = str(e.value)
    assert "patch_embed.conv1.weight (64, 3, 7, 7)" in msg  # unexpected, with its shape
    assert "blocks.0.attn.reatten_matrix.weight (12, 12, 1, 1)" in msg  # missing
    assert "looks like 'deepvit_s'" in msg


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", "truncated"])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.pth.tar"
    if content == "truncated":
        ref, _ = _small_pair()
        torch.save({"state_dict": ref.state_dict()}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        from_pytorch(path, model="deepvit_16b")
    with pytest.raises(ConversionError, match="no such file"):
        from_pytorch(tmp_path / "nope.pth", model="deepvit_16b")


def test_position_embedding_resampling():
    """A 32-px checkpoint loaded at 64 px: class token kept, grid resampled bicubically,
    the model runs; a constant grid stays constant and a smooth field stays close."""
    from deepvit_jax.convert import resample_pos_embed

    ref, kw = _small_pair()
    sd = ref.state_dict()
    model = from_pytorch(sd, **{**kw, "image_size": 64})
    pe = np.asarray(model.pos_embed.get_value())
    assert pe.shape == (1, 1 + 16, 384)
    np.testing.assert_array_equal(pe[0, 0], sd["pos_embed"][0, 0].numpy())
    assert np.isfinite(np.asarray(model(np.zeros((1, 64, 64, 3), np.float32)))).all()

    const = np.full((1, 1 + 4, 2), 0.7, np.float32)
    np.testing.assert_allclose(resample_pos_embed(const, 6), np.full((1, 37, 2), 0.7),
                               atol=1e-6)

    def field(g):  # smooth function sampled at the centres of a g x g grid on [0, 1]^2
        c = (np.arange(g) + 0.5) / g
        yy, xx = np.meshgrid(c, c, indexing="ij")
        return np.sin(2 * xx + yy).reshape(1, g * g, 1).astype(np.float32)

    src = np.concatenate([np.full((1, 1, 1), 5.0, np.float32), field(14)], axis=1)
    out = resample_pos_embed(src, 24)
    assert out[0, 0, 0] == 5.0
    inner = field(24).reshape(24, 24)[2:-2, 2:-2]
    np.testing.assert_allclose(out[0, 1:, 0].reshape(24, 24)[2:-2, 2:-2], inner, atol=2e-3)


# ---------------------------------------------------------------------------------------
# The eps of every norm, pinned by parity where it matters
# ---------------------------------------------------------------------------------------


def _eps_sensitive_ref():
    """A 2-block DeepViT-S structure (CNN stem BatchNorms, one Re-attention block) whose
    norms see small variances, so that each eps moves the logits: a tiny stem conv and patch
    projection (LayerNorm inputs ~1e-3, stem BatchNorm batch variance ~1e-6) and tiny
    running variances (eval). The Re-attention maps' batch variance is ~1e-7 by itself."""
    ref = _ref("deepvit_S", 32, depth=2, reattn=(1,))
    with torch.no_grad():
        ref.patch_embed.conv1.weight.mul_(1e-3)
        ref.patch_embed.bn1.running_var.mul_(1e-6)
        ref.blocks[1].attn.var_norm.running_var.mul_(1e-6)
        for t in (ref.patch_embed.proj.weight, ref.patch_embed.proj.bias, ref.cls_token,
                  ref.pos_embed):
            t.mul_(1e-3)
    return ref


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_norm_eps_pinned_by_parity(impl):
    """LayerNorm eps 1e-6 and BatchNorm eps 1e-5 (stem and Re-attention) as the official
    code: with small-variance inputs, the logits match at 1e-5 in eval and train mode, and
    each eps changed by a factor of 10 moves them by far more."""
    ref = _eps_sensitive_ref()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(model="deepvit_s", image_size=32, num_classes=NUM_CLASSES, depth=2,
              reattn_blocks=(1,), attention_impl=impl)
    with torch.no_grad():
        want_eval = ref.eval()(x).numpy()
        want_train = ref.train()(x).numpy()

    def logits(**over):
        model = from_pytorch(sd, **kw, **over)
        cfg = model.config
        assert (cfg.ln_eps, cfg.bn_eps, cfg.reattn_norm_eps) == (
            over.get("ln_eps", 1e-6), over.get("bn_eps", 1e-5), over.get("reattn_norm_eps", 1e-5))
        ev = np.asarray(model(_nhwc(x)))
        model.train()
        return ev, np.asarray(model(_nhwc(x)))

    got_eval, got_train = logits()
    np.testing.assert_allclose(got_eval, want_eval, rtol=0, atol=1e-5)  # measured 7e-7
    np.testing.assert_allclose(got_train, want_train, rtol=0, atol=3e-5)  # measured 1e-5
    # Measured moves (eval, train): ln_eps 0.19, 0.70; bn_eps 0.037, 0.093;
    # reattn_norm_eps 0.029, 0.0033.
    for over in ({"ln_eps": 1e-5}, {"bn_eps": 1e-6}, {"reattn_norm_eps": 1e-6}):
        ev, tr = logits(**over)
        assert np.abs(ev - want_eval).max() > 1e-3, over
        assert np.abs(tr - want_train).max() > 1e-3, over
