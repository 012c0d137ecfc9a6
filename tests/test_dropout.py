"""Dropout, attention dropout and drop path against the official code's semantics, with the
same masks on both sides.

The masks are injected: every dropout site of the JAX model (``nnx.Dropout``: its Bernoulli
draw) and of the PyTorch reference of the official model (``nn.Dropout`` and ``DropPath``)
asks one generator for its mask by (module name, call number, shape, keep probability). Equal
train-mode logits then show that each mask sits where the official code puts it (attention
dropout on the softmax map *before* the head mixing; dropout after the position embedding,
inside the MLP and after proj; drop path on each residual branch), that drop path draws one
value per sample (shape (B, 1, 1), not per token) and that the rates (the stochastic-depth
schedule) are the official ones: the mask is a function of the keep probability.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import stochastic

torch = pytest.importorskip("torch")

from deepvit_jax.convert import from_pytorch  # noqa: E402
from deepvit_jax.reference import official as R  # noqa: E402

DEPTH = 4
REATTN = (1, 3)
RATES = dict(drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.3)


class Masks:
    """Bernoulli(keep) masks keyed by (site, call number); records what each side asked."""

    def __init__(self):
        self.asked = []
        self.calls = {}

    def __call__(self, name, shape, keep):
        idx = self.calls.get(name, 0)
        self.calls[name] = idx + 1
        self.asked.append((name, idx, tuple(int(s) for s in shape), round(float(keep), 6)))
        rng = np.random.default_rng(zlib.crc32(f"{name}#{idx}".encode()))
        return rng.random(tuple(shape)) < keep


def _torch_forward(ref, x, masks, per_token_drop_path=False):
    """Train-mode reference forward with the injected masks (``per_token_drop_path``: a
    wrong drop path, for showing that the comparison can fail)."""

    def dropout(self, t):
        if not self.training or self.p == 0:
            return t
        keep = 1.0 - self.p
        m = torch.from_numpy(masks(names[id(self)], t.shape, keep))
        return t * m / keep

    def drop_path(self, t):
        if not self.training or self.p == 0:
            return t
        keep = 1.0 - self.p
        shape = (t.shape[0],) + (1,) * (t.ndim - 1)  # the official per-sample draw
        if per_token_drop_path:
            shape = (t.shape[0], t.shape[1]) + (1,) * (t.ndim - 2)
        m = torch.from_numpy(masks(names[id(self)], shape, keep))
        return t * m / keep

    names = {id(m): n for n, m in ref.named_modules()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Dropout, "forward", dropout)
        mp.setattr(R.DropPath, "forward", drop_path)
        ref.train()
        with torch.no_grad():
            return ref(x).numpy()


def _jax_forward(model, x, masks):
    """Train-mode JAX forward: every nnx.Dropout's Bernoulli draw returns the injected mask
    for the shape the model asks for (its own broadcast_dims decide per-sample vs per-token)."""
    names = {id(m): ".".join(map(str, p)) for p, m in nnx.iter_modules(model)}
    current = []
    call = nnx.Dropout.__call__

    def dropout_call(self, inputs, **kw):
        current.append(names[id(self)])
        try:
            return call(self, inputs, **kw)
        finally:
            current.pop()

    class _Random:  # jax.random as the Dropout module sees it, with bernoulli injected
        def __getattr__(self, name):
            return getattr(jax.random, name)

        @staticmethod
        def bernoulli(key, p, shape, **_):
            return jnp.asarray(masks(current[-1], shape, p))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nnx.Dropout, "__call__", dropout_call)
        mp.setattr(stochastic, "random", _Random())
        model.train()
        return np.asarray(model(x))


def _pair(rates, attention_impl):
    torch.manual_seed(0)
    ref = R.randomize_(R.DeepVisionTransformer(
        img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=DEPTH, num_heads=4,
        reattn=REATTN, adjust_ratio=0.5, **rates))
    model = from_pytorch(ref.state_dict(), model="deepvit_16b", image_size=32, patch_size=8,
                         num_classes=10, embed_dim=48, depth=DEPTH, num_heads=4,
                         reattn_blocks=REATTN, adjust_ratio=0.5,
                         attention_impl=attention_impl, **rates)
    return ref, model


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("which", ["all", "no_attn_drop"])
def test_dropout_sites_masks_and_rates_match_official(which, impl):
    """'auto' takes the fast attention path where it applies: with attention dropout it
    falls back to the reference maps; without, train-mode Re-attention runs folded."""
    rates = dict(RATES, attn_drop_rate=0.0) if which == "no_attn_drop" else dict(RATES)
    ref, model = _pair(rates, impl)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want_masks, got_masks = Masks(), Masks()
    want = _torch_forward(ref, x, want_masks)
    got = _jax_forward(model, x.permute(0, 2, 3, 1).numpy(), got_masks)

    # The same sites, in the same order, with the same shapes and keep probabilities.
    assert got_masks.asked == want_masks.asked
    sites = {name for name, *_ in want_masks.asked}
    expected = {"pos_drop"} | {f"blocks.{i}.{s}" for i in range(DEPTH)
                               for s in ("attn.proj_drop", "mlp.drop")}
    expected |= {f"blocks.{i}.drop_path" for i in range(1, DEPTH)}  # rate 0 in block 0
    if rates["attn_drop_rate"]:
        expected |= {f"blocks.{i}.attn.attn_drop" for i in range(DEPTH)}
    assert sites == expected
    for name, _, shape, keep in want_masks.asked:
        if name.endswith("drop_path"):
            assert shape == (3, 1, 1)  # one draw per sample
            i = int(name.split(".")[1])
            np.testing.assert_allclose(keep, 1 - RATES["drop_path_rate"] * i / (DEPTH - 1))
        elif name.endswith("attn_drop"):
            assert shape == (3, 4, 17, 17)  # the (B, H, N, N) softmax map
    # Equal logits: every mask is applied where the official code applies it.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.1

    # The comparison can fail: moving one mask (attention dropout after the head mixing,
    # drop path per token) changes the logits far beyond the tolerance.
    if rates["attn_drop_rate"]:
        assert np.abs(_torch_forward(_after_mixing(ref), x, Masks()) - want).max() > 1e-3
    assert np.abs(_torch_forward(ref, x, Masks(), per_token_drop_path=True) - want).max() > 1e-3


def _after_mixing(ref):
    """A copy of the reference with attention dropout moved after the head mixing (a wrong
    model)."""
    import copy
    import types

    ref = copy.deepcopy(ref)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.apply_transform:
            attn = self.var_norm(self.reatten_matrix(attn)) * self.reatten_scale
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn

    for blk in ref.blocks:
        blk.attn.forward = types.MethodType(forward, blk.attn)
    return ref


def test_stochastic_depth_schedule_is_linear_over_blocks():
    """timm's dpr = linspace(0, drop_path_rate, depth), one rate per block, both residual
    branches of a block sharing it."""
    import deepvit_jax as dj

    model = nnx.eval_shape(lambda: dj.create_model(
        "deepvit_16b", depth=7, embed_dim=24, num_heads=2, image_size=32, drop_path_rate=0.2))
    rates = [blk.drop_path.rate for blk in model.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.2, 7), rtol=0, atol=1e-12)
    assert all(blk.drop_path.broadcast_dims == (1, 2) for blk in model.blocks)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_drop_path_statistics_per_sample(impl):
    """Real draws (no injection): a residual branch is dropped for a whole sample or not at
    all (never for some tokens only), with probability ``rate`` (binomial bound)."""
    import deepvit_jax as dj

    model = dj.create_model("deepvit_16b", image_size=16, patch_size=8, embed_dim=16, depth=2,
                            num_heads=2, num_classes=3, drop_path_rate=0.3,
                            attention_impl=impl, rngs=nnx.Rngs(0))
    blk = model.blocks[1]  # rate 0.3 (block 0 has rate 0)
    assert blk.drop_path.rate == pytest.approx(0.3)
    x = jax.random.normal(jax.random.key(0), (1000, 5, 16))

    @nnx.jit
    def forward(blk, x):
        blk.train()
        return blk(x)[0]

    d = np.asarray(forward(blk, x)) - np.asarray(x)
    token_changed = np.abs(d).max(axis=2) > 0  # (B, N): a kept branch changes every token
    assert np.all(token_changed.all(axis=1) | ~token_changed.any(axis=1))
    both_dropped = ~token_changed.any(axis=1)  # attention and MLP branch dropped
    p, n = 0.3**2, len(both_dropped)
    assert abs(both_dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
