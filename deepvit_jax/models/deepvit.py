"""DeepViT and its plain-ViT baseline in Flax NNX: every module in one file.

DeepViT ("DeepViT: Towards Deeper Vision Transformer", Zhou et al., ICCV 2021) replaces
self-attention by *Re-attention* in some or all blocks: the H per-head softmax maps are mixed
with a learned H x H matrix Theta and normalised before they weigh the values::

    A  = softmax(q k^T / sqrt(d))                        (B, H, N, N)
    A' = Norm( einsum('oh,bhij->boij', Theta, A) + b )   mixing along the head axis
    out = A' v

The official release implements Theta as a 1x1 Conv2d(H, H) with bias and Norm as a
BatchNorm2d(H) over the head channel. The same modules also host vit-pytorch's DeepViT
(LayerNorm over the head axis, Theta without bias, LN->Linear->LN patch embedding, ...)
through fields of :class:`ModelConfig`.

Layout conventions (the converter relies on them): images are NHWC; Dense kernels are
(in, out); conv kernels are (kh, kw, in, out); the mixing matrix ``reattn_weight`` is stored
as W[out_head, in_head], i.e. the official conv weight with its 1x1 spatial dims dropped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepvit_jax.models import attention
from deepvit_jax.models.attention import reference as ref_attn
from deepvit_jax.models.attention import xla as xla_attn

F32 = jnp.float32

# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a DeepViT/ViT network. Serialisable with `to_dict`."""

    name: str = "custom"
    image_size: int = 224
    patch_size: int = 16
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 16
    num_heads: int = 12
    head_dim: int | None = None  # None: embed_dim // num_heads (official); free in vit-pytorch
    mlp_dim: int | None = None  # None: 3 * embed_dim (the official MLP ratio)
    qkv_bias: bool = True
    # Re-attention: 0-based indices of the blocks that use it (the others are plain), or
    # "all" (every block, whatever the depth).
    reattn_blocks: tuple[int, ...] | str = ()
    reattn_bias: bool = True  # bias of Theta (official: yes; vit-pytorch: no)
    reattn_norm: Literal["batchnorm", "layernorm"] = "batchnorm"
    reattn_norm_eps: float = 1e-5
    transform_scale: bool = False  # multiply the re-attention map by head_dim**-0.5
    adjust_ratio: float = 1.0  # x + attn(LN(r x)) / r, applied to every block
    # Patch embedding: 'conv' = Conv 16x16/16; 'cnn_stem' = 3-conv stem with BatchNorm;
    # 'linear' = vit-pytorch's rearrange -> LN -> Linear -> LN.
    patch_embed: Literal["conv", "cnn_stem", "linear"] = "conv"
    stem_channels: int = 64
    pool: Literal["cls", "mean"] = "cls"
    # Final LayerNorm over all tokens before pooling (official) or on the pooled vector
    # (vit-pytorch's mlp_head = LN -> Linear).
    head_norm: Literal["before_pool", "after_pool"] = "before_pool"
    ln_eps: float = 1e-6
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9  # Flax convention: new = m * old + (1 - m) * batch
    drop_rate: float = 0.0  # after the position embedding, in the MLP and after proj
    attn_drop_rate: float = 0.0  # on the softmax map, before the head mixing
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly over the blocks
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = False  # rematerialise each block in the backward pass
    # Run each run of alike blocks (plain or Re-attention) as one jax.lax.scan: XLA compiles
    # one block body instead of `depth`, for the same numbers and the same parameter layout
    # (per-block; stacked at call time). A computation choice, like remat.
    scan_blocks: bool = False
    # Attention implementation (models/attention/): 'reference' (the paper's einsums, the
    # parity oracle), 'xla' (heads-major, folded train-mode Re-attention with a custom VJP),
    # 'pallas' (fused kernels) or 'auto' (the fastest correct one for the backend). A
    # computation choice, not part of the architecture: every value gives the same model.
    attention_impl: str = "auto"
    # Evaluation preprocessing (used by predict and the data pipeline).
    crop_pct: float = 0.9
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"

    def __post_init__(self):
        # Normalise list-like fields so configs compare equal and round-trip through JSON.
        if not isinstance(self.reattn_blocks, str):
            object.__setattr__(self, "reattn_blocks", tuple(int(i) for i in self.reattn_blocks))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        self.validate()

    # -- derived --
    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 3 * self.embed_dim

    @property
    def reattn_indices(self) -> tuple[int, ...]:
        """0-based indices of the Re-attention blocks."""
        if self.reattn_blocks == "all":
            return tuple(range(self.depth))
        return self.reattn_blocks

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + 1

    def validate(self) -> None:
        def bad(field, msg):
            raise ValueError(f"ModelConfig.{field}: {msg}")

        choices = {
            "reattn_norm": ("batchnorm", "layernorm"),
            "patch_embed": ("conv", "cnn_stem", "linear"),
            "pool": ("cls", "mean"),
            "head_norm": ("before_pool", "after_pool"),
            "dtype": ("float32", "bfloat16", "float16"),
            "attention_impl": attention.IMPLS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                bad(field, f"{getattr(self, field)!r} is not one of {allowed}")
        for field in ("image_size", "patch_size", "num_classes", "embed_dim", "depth",
                      "num_heads"):
            if int(getattr(self, field)) <= 0:
                bad(field, f"must be positive, got {getattr(self, field)}")
        if self.image_size % self.patch_size:
            bad("image_size", f"{self.image_size} is not divisible by patch_size "
                f"{self.patch_size}; allowed sizes are multiples of {self.patch_size}")
        if self.patch_embed == "cnn_stem" and self.patch_size != 16:
            bad("patch_size", "the CNN stem (stride 2 x conv 8/8) only makes 16-px patches")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            bad("embed_dim", f"{self.embed_dim} is not divisible by num_heads "
                f"{self.num_heads}; set head_dim explicitly")
        if isinstance(self.reattn_blocks, str) and self.reattn_blocks != "all":
            bad("reattn_blocks", f"{self.reattn_blocks!r}: use 'all' or a list of block indices")
        bad_blocks = [i for i in self.reattn_indices if not 0 <= i < self.depth]
        if bad_blocks:
            bad("reattn_blocks", f"indices {bad_blocks} outside 0..{self.depth - 1}")
        for field in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, field) < 1.0:
                bad(field, f"must be in [0, 1), got {getattr(self, field)}")
        if self.adjust_ratio <= 0:
            bad("adjust_ratio", f"must be positive, got {self.adjust_ratio}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; allowed: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)

    def replace(self, **overrides) -> ModelConfig:
        allowed = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(allowed)}")
        return dataclasses.replace(self, **overrides)


# --------------------------------------------------------------------------------------
# Initialisers (as the official PyTorch code)
# --------------------------------------------------------------------------------------

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute units, i.e. at 100 sigma:
# effectively an untruncated normal.
dense_init = nnx.initializers.normal(0.02)
# PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +1/sqrt(fan_in)).
torch_conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=F32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(din, dout, cfg: ModelConfig, rngs, use_bias=True):
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=dense_init,
                      bias_init=nnx.initializers.zeros, dtype=cfg.dtype, rngs=rngs)


def _conv(din, dout, k, stride, padding, cfg, rngs, use_bias):
    return nnx.Conv(din, dout, (k, k), strides=stride, padding=padding, use_bias=use_bias,
                    kernel_init=torch_conv_kernel_init,
                    bias_init=torch_bias_init(din * k * k), dtype=cfg.dtype, rngs=rngs)


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------


class BatchNorm(nnx.Module):
    """BatchNorm over one feature axis with PyTorch's exact semantics.

    Written by hand rather than using ``nnx.BatchNorm`` because PyTorch moves ``running_var``
    with the *unbiased* batch variance (n / (n - 1)) while Flax uses the biased one; a
    converted official model must keep updating its statistics as the original does.
    Statistics are computed in float32. Under ``jax.jit`` with a batch sharded over a mesh,
    the means are over the global batch.
    """

    def __init__(self, num_features: int, *, axis: int = -1, epsilon: float = 1e-5,
                 momentum: float = 0.9, use_running_average: bool = False):
        self.axis = axis
        self.epsilon = epsilon
        self.momentum = momentum
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), F32))
        self.bias = nnx.Param(jnp.zeros((num_features,), F32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), F32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), F32))

    def __call__(self, x):
        axis = self.axis % x.ndim
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        x32 = x.astype(F32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean = jnp.mean(x32, axis=reduce)
            var = jnp.mean(jnp.square(x32 - mean.reshape(shape)), axis=reduce)
            n = x.size // x.shape[axis]
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * mean
            self.var[...] = m * self.var[...] + (1 - m) * var * (n / max(n - 1, 1))
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        y = (x32 - mean.reshape(shape)) * inv.reshape(shape) + self.bias[...].reshape(shape)
        return y.astype(x.dtype)


# --------------------------------------------------------------------------------------
# Patch embeddings: (B, H, W, 3) -> (B, N, C)
# --------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Conv(3, C, p, stride p) with bias: the plain ViT patch embedding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = _conv(3, cfg.embed_dim, p, p, "VALID", cfg, rngs, use_bias=True)

    def __call__(self, x):
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ConvStem(nnx.Module):
    """DeepViT-S/L stem: conv7x7/2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv8x8/8."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        c = cfg.stem_channels
        self.conv1 = _conv(3, c, 7, 2, ((3, 3), (3, 3)), cfg, rngs, use_bias=False)
        self.bn1 = BatchNorm(c, epsilon=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.conv2 = _conv(c, c, 3, 1, ((1, 1), (1, 1)), cfg, rngs, use_bias=False)
        self.bn2 = BatchNorm(c, epsilon=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.proj = _conv(c, cfg.embed_dim, 8, 8, "VALID", cfg, rngs, use_bias=True)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class LinearPatchEmbed(nnx.Module):
    """vit-pytorch: patches flattened as (p1 p2 c) -> LayerNorm -> Linear -> LayerNorm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.patch_size = cfg.patch_size
        patch_dim = 3 * cfg.patch_size**2
        self.norm_in = nnx.LayerNorm(patch_dim, epsilon=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        self.proj = _linear(patch_dim, cfg.embed_dim, cfg, rngs)
        self.norm_out = nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.ln_eps, dtype=cfg.dtype,
                                      rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        p = self.patch_size
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        return self.norm_out(self.proj(self.norm_in(x)))


# --------------------------------------------------------------------------------------
# Attention, MLP, block
# --------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Multi-head self-attention, with Re-attention when ``reattention`` is True.

    ``out`` comes from the configured implementation (``ModelConfig.attention_impl``).
    ``attn`` is None unless ``return_attention=True``; then it is the (B, H, N, N) map that
    weighs the values (the softmax map for a plain block, the mixed and normalised map for
    Re-attention), computed for this call by the reference formulas.
    """

    def __init__(self, cfg: ModelConfig, *, reattention: bool, rngs: nnx.Rngs):
        self.num_heads = h = cfg.num_heads
        self.head_dim = hd = cfg.dim_head
        self.scale = hd**-0.5
        self.dtype = cfg.dtype
        self.reattention = reattention
        self.attention_impl = cfg.attention_impl
        self.reattn_kind = cfg.reattn_norm
        self.qkv = _linear(cfg.embed_dim, 3 * h * hd, cfg, rngs, use_bias=cfg.qkv_bias)
        self.attn_drop = nnx.Dropout(cfg.attn_drop_rate, rngs=rngs)
        if reattention:
            # Theta: the official 1x1 Conv2d(H, H) with bias, stored as W[out, in].
            self.reattn_weight = nnx.Param(torch_conv_kernel_init(rngs.params(), (h, h)))
            self.reattn_bias = (nnx.Param(torch_bias_init(h)(rngs.params(), (h,)))
                                if cfg.reattn_bias else None)
            if cfg.reattn_norm == "batchnorm":
                self.reattn_norm = BatchNorm(h, axis=1, epsilon=cfg.reattn_norm_eps,
                                             momentum=cfg.bn_momentum)
            else:  # vit-pytorch: LayerNorm across the head axis of every (b, i, j)
                self.reattn_norm = nnx.LayerNorm(h, epsilon=cfg.reattn_norm_eps,
                                                 reduction_axes=1, feature_axes=1,
                                                 dtype=F32, rngs=rngs)
            self.reattn_scale = self.scale if cfg.transform_scale else 1.0
        self.proj = _linear(h * hd, cfg.embed_dim, cfg, rngs)
        self.proj_drop = nnx.Dropout(cfg.drop_rate, rngs=rngs)

    def _impl(self) -> str:
        impl = attention.resolve(self.attention_impl)
        dropout = self.attn_drop.rate > 0 and not self.attn_drop.deterministic
        if dropout or (self.reattention and self.reattn_kind != "batchnorm"):
            return "reference"  # the fast paths need rows summing to 1 (and BatchNorm)
        return impl

    def __call__(self, x, *, return_attention: bool = False):
        impl = self._impl()
        if impl == "reference":
            out, attn = self._reference(x)
            return out, attn if return_attention else None
        qkv = self.qkv(x)
        q, k, v = xla_attn.split_qkv(qkv, self.num_heads, self.head_dim)  # (B, H, N, hd)
        if not self.reattention:
            out = attention.plain(impl, q, k, v, scale=self.scale)
        else:
            bn, w = self.reattn_norm, self.reattn_weight[...]
            bias = self.reattn_bias[...] if self.reattn_bias is not None else None
            gamma, beta = bn.scale[...] * self.reattn_scale, bn.bias[...] * self.reattn_scale
            if bn.use_running_average:
                mix, shift = attention.eval_fold(w, bias, gamma, beta, bn.mean[...],
                                                 bn.var[...], bn.epsilon)
                out = attention.reattention_eval(impl, q, k, v, mix, shift, scale=self.scale)
            else:
                out, var = attention.reattention_train(impl, q, k, v, w, gamma, beta,
                                                       scale=self.scale, eps=bn.epsilon)
                # The batch mean of the mixed maps is exact (softmax rows sum to 1).
                n = q.shape[2]
                mean = jnp.sum(w, axis=1) / n + (bias if bias is not None else 0.0)
                m, count = bn.momentum, q.shape[0] * n * n
                bn.mean[...] = m * bn.mean[...] + (1 - m) * mean
                bn.var[...] = m * bn.var[...] + (1 - m) * var * (count / max(count - 1, 1))
        out = self.proj(xla_attn.merge_heads(out))
        return self.proj_drop(out), self._maps(q, k) if return_attention else None

    def softmax_maps(self, x):
        """(B, H, N, N) float32: softmax(q k^T * scale) of this block's own queries and keys
        for the (normed) input ``x``: the map before Re-attention's mixing (for a plain block,
        the map that weighs the values)."""
        q, k, _ = xla_attn.split_qkv(self.qkv(x), self.num_heads, self.head_dim)
        return jax.nn.softmax(xla_attn.logits(q, k, self.scale).astype(F32), axis=-1)

    def _maps(self, q, k):
        """The map that weighs the values, by the reference formulas (the BatchNorm's, with
        batch or running statistics as the mode says), without touching any state."""
        attn = jax.nn.softmax(xla_attn.logits(q, k, self.scale), axis=-1)
        if not self.reattention:
            return attn
        bn = self.reattn_norm
        attn = ref_attn.mix_heads(self.reattn_weight[...],
                                  None if self.reattn_bias is None else self.reattn_bias[...],
                                  attn)
        if bn.use_running_average:
            mean, var = bn.mean[...], bn.var[...]
        else:
            mean = jnp.mean(attn, axis=(0, 2, 3))
            var = jnp.mean(jnp.square(attn - mean[None, :, None, None]), axis=(0, 2, 3))
        inv = jax.lax.rsqrt(var + bn.epsilon) * bn.scale[...]
        attn = (attn - mean[None, :, None, None]) * inv[None, :, None, None]
        return (attn + bn.bias[...][None, :, None, None]) * self.reattn_scale

    def _reference(self, x):
        """The paper's formulas, tokens-major (models/attention/reference.py)."""
        q, k, v = ref_attn.split_qkv(self.qkv(x), self.num_heads, self.head_dim)
        attn = self.attn_drop(ref_attn.softmax_maps(q, k, self.scale))  # float32
        if self.reattention:
            attn = ref_attn.mix_heads(self.reattn_weight[...],
                                      None if self.reattn_bias is None else self.reattn_bias[...],
                                      attn)
            attn = self.reattn_norm(attn) * self.reattn_scale
        out = self.proj(ref_attn.weigh_values(attn, v))
        return self.proj_drop(out), attn


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg.embed_dim, cfg.hidden_dim, cfg, rngs)
        self.fc2 = _linear(cfg.hidden_dim, cfg.embed_dim, cfg, rngs)
        self.drop = nnx.Dropout(cfg.drop_rate, rngs=rngs)

    def __call__(self, x):
        x = self.drop(jax.nn.gelu(self.fc1(x), approximate=False))
        return self.drop(self.fc2(x))


class Block(nnx.Module):
    """Pre-norm block with the official ``adjust_ratio`` r:
    x += drop_path(attn(LN1(r x)) / r);  x += drop_path(mlp(LN2(r x))) / r."""

    def __init__(self, cfg: ModelConfig, *, reattention: bool, drop_path: float,
                 rngs: nnx.Rngs):
        self.adjust_ratio = cfg.adjust_ratio
        self.norm1 = nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        self.attn = Attention(cfg, reattention=reattention, rngs=rngs)
        self.norm2 = nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        # Drop path = dropout of whole samples: broadcast the mask over tokens and channels.
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, x, *, return_attention: bool = False, keep_prob=None):
        """``keep_prob``: the drop-path keep probability as an array, in place of the
        module's own (static) rate: a scan over blocks (DeepViT._scanned) runs one block
        body for blocks whose rates differ."""
        r = self.adjust_ratio
        y, attn = self.attn(self.norm1(x * r), return_attention=return_attention)
        x = x + self._drop_path(y / r, keep_prob)
        x = x + self._drop_path(self.mlp(self.norm2(x * r)), keep_prob) / r
        return x, attn

    def _drop_path(self, x, keep_prob):
        if keep_prob is None:
            return self.drop_path(x)
        if self.drop_path.deterministic:
            return x
        # nnx.Dropout's own steps (its rng stream, the mask shape, select) with the keep
        # probability as data; a block of rate 0 draws a mask of ones.
        mask = jax.random.bernoulli(self.drop_path.rngs(), p=keep_prob,
                                    shape=(x.shape[0],) + (1,) * (x.ndim - 1))
        return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / keep_prob.astype(x.dtype),
                              jnp.zeros_like(x))


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class DeepViT(nnx.Module):
    """DeepViT / ViT classifier. ``model(images)`` takes NHWC float images of the config's
    size and returns float32 logits; ``return_attention=True`` also returns the list of every
    block's attention map (after Re-attention where a block has it)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        embed = {"conv": PatchEmbed, "cnn_stem": ConvStem, "linear": LinearPatchEmbed}
        self.patch_embed = embed[cfg.patch_embed](cfg, rngs=rngs)
        c = cfg.embed_dim
        self.cls_token = nnx.Param(dense_init(rngs.params(), (1, 1, c)))
        self.pos_embed = nnx.Param(dense_init(rngs.params(), (1, cfg.num_tokens, c)))
        self.pos_drop = nnx.Dropout(cfg.drop_rate, rngs=rngs)
        reattn = set(cfg.reattn_indices)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nnx.List([
            Block(cfg, reattention=i in reattn, drop_path=rates[i], rngs=rngs)
            for i in range(cfg.depth)
        ])
        self.norm = nnx.LayerNorm(c, epsilon=cfg.ln_eps, dtype=cfg.dtype, rngs=rngs)
        self.head = nnx.Linear(c, cfg.num_classes, kernel_init=dense_init,
                               bias_init=nnx.initializers.zeros, dtype=cfg.dtype, rngs=rngs)

    def check_input(self, images) -> None:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, 3)
        if getattr(images, "ndim", None) != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"{cfg.name}: expected NHWC images of shape (batch, {want[0]}, {want[1]}, 3), "
                f"got {tuple(getattr(images, 'shape', ()))}. The model takes 3-channel images "
                f"of size image_size={cfg.image_size} (create it with image_size=... for "
                f"another multiple of patch_size={cfg.patch_size})")

    def embed(self, images):
        """The tokens the first block takes (B, N, C): patch embedding, class token, position
        embedding."""
        self.check_input(images)
        cfg = self.config
        x = self.patch_embed(images.astype(cfg.dtype))
        b = x.shape[0]
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        return self.pos_drop(x)

    def classify(self, x):
        """float32 logits from the last block's tokens (B, N, C): norm, pooling, head."""
        cfg = self.config
        if cfg.head_norm == "before_pool":
            x = self.norm(x)
        x = x[:, 0] if cfg.pool == "cls" else x.mean(axis=1)
        if cfg.head_norm == "after_pool":
            x = self.norm(x)
        return self.head(x).astype(F32)

    def __call__(self, images, *, return_attention: bool = False,
                 attention_blocks: int | None = None):
        """``attention_blocks``: with ``return_attention``, the maps of the first
        ``attention_blocks`` blocks only (None: every block's). Scanned blocks compute no map
        they do not return (DeepViT-32's regulariser reads the first 13 of 32)."""
        cfg = self.config
        x = self.embed(images)
        wanted = cfg.depth if attention_blocks is None else min(attention_blocks, cfg.depth)
        if not return_attention:
            wanted = 0
        if cfg.scan_blocks:
            x, maps = self._scanned(x, wanted)
            logits = self.classify(x)
            return (logits, maps) if return_attention else logits
        maps = []
        for i, blk in enumerate(self.blocks):
            ret = i < wanted
            if cfg.remat:
                x, attn = nnx.remat(_block_call(ret))(blk, x)
            else:
                x, attn = blk(x, return_attention=ret)
            if ret:
                maps.append(attn)
        logits = self.classify(x)
        return (logits, maps) if return_attention else logits

    def _scanned(self, x, wanted: int):
        """The blocks as one ``jax.lax.scan`` per run of alike blocks (same kind: plain or
        Re-attention). The blocks keep their own parameters (checkpoints, the converter and
        the analysis see one module per block); each run's states are stacked here, the body
        is one block merged from its slice, and what the call changed (BatchNorm statistics,
        dropout rng counts) is written back. Hand-written over ``nnx.scan`` because that
        scans modules whose state is stacked where they are built, which would change the
        parameter layout of every checkpoint. The drop-path rates, static per block, enter
        as data (Block.keep_prob)."""
        cfg = self.config
        rates = [blk.drop_path.rate for blk in self.blocks]  # as __init__ set them
        maps = []
        for run, return_attention in _alike_runs(self.blocks, wanted):
            graphdef, _ = nnx.split(self.blocks[run[0]])
            states = [nnx.state(self.blocks[i]) for i in run]
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
            # 1 - rate in float64 then float32, as nnx.Dropout's Python keep probability;
            # None (no drop path at all): each block's own Dropout, which then does nothing
            keep = (jnp.asarray(np.float32([1.0 - rates[i] for i in run]))
                    if cfg.drop_path_rate else None)

            def body(y, xs, graphdef=graphdef, ret=return_attention):
                state, k = xs
                blk = nnx.merge(graphdef, state)
                y, attn = blk(y, return_attention=ret, keep_prob=k)
                # what a block call changes (BatchNorm statistics, rng counts); not the
                # parameters, which would otherwise be copied out of the loop every step
                return y, (nnx.state(blk, nnx.Not(nnx.Param)), attn)

            if cfg.remat:
                body = jax.checkpoint(body)
            x, (new, attn) = jax.lax.scan(body, x, (stacked, keep))
            for j, i in enumerate(run):
                blk = self.blocks[i]
                count = blk.drop_path.rngs.count[...] if rates[i] == 0.0 else None
                nnx.update(blk, jax.tree.map(lambda a, j=j: a[j], new))
                if count is not None:  # its mask of ones used no randomness: as unrolled
                    blk.drop_path.rngs.count[...] = count
                if return_attention:
                    maps.append(attn[j])
        return x, maps


def _block_call(return_attention: bool):
    """``block(x)`` with ``return_attention`` closed over (static for nnx.remat)."""
    return lambda blk, x: blk(x, return_attention=return_attention)


def _alike_runs(blocks, wanted: int) -> list[tuple[list[int], bool]]:
    """Consecutive block indices grouped by kind (plain / Re-attention) and by whether their
    map is returned (the first ``wanted`` blocks'): [(indices, return_attention)]."""
    runs: list[tuple[list[int], bool]] = []
    kind = None
    for i, blk in enumerate(blocks):
        k = (blk.attn.reattention, i < wanted)
        if runs and k == kind:
            runs[-1][0].append(i)
        else:
            runs.append(([i], i < wanted))
            kind = k
    return runs


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves; BatchNorm statistics excluded)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def pos_embed_grid(shape) -> int | None:
    """Side g of the square token grid of a (1, 1 + g*g, C) position embedding; None when
    the shape is not a class token plus a square grid."""
    if len(shape) != 3 or shape[0] != 1:
        return None
    n = int(shape[1]) - 1
    g = math.isqrt(max(n, 0))
    return g if n >= 1 and g * g == n else None


def resample_pos_embed(pos_embed, new_grid: int, *, antialias: bool = True) -> np.ndarray:
    """(1, 1 + g*g, C) -> (1, 1 + new_grid**2, C): bicubic resampling of the token grid with
    the class token kept, as timm's ``resample_abs_pos_embed`` and big_vision do when
    fine-tuning at another resolution (e.g. 224 -> 384 px: 14x14 -> 24x24). Used by the
    converter (``image_size=``) and by the training loop's ``init_from``.
    ``jax.image.resize`` uses the Keys cubic (a = -0.5) kernel, so values differ slightly
    from PyTorch's bicubic (a = -0.75)."""
    pos_embed = np.asarray(pos_embed, np.float32)
    c = pos_embed.shape[-1]
    g = pos_embed_grid(pos_embed.shape)
    if g is None:
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} is not a class token + square "
                         "grid of tokens; cannot resample it")
    if g == new_grid:
        return pos_embed
    grid = jax.image.resize(pos_embed[0, 1:].reshape(g, g, c), (new_grid, new_grid, c),
                            method="bicubic", antialias=antialias)
    grid = np.asarray(grid, np.float32).reshape(1, new_grid * new_grid, c)
    return np.concatenate([pos_embed[:, :1], grid], axis=1)
