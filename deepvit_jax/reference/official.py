"""The official DeepViT (zhoudaquan/dvit_repo, timm 0.3.2 based) in PyTorch, written from
``shared/reference/deepvit.md`` sections 2-4 with the official module and key names.

It exists to prove parity: the converter maps *these* state-dict keys, and the JAX model must
compute the same logits, attention maps and BatchNorm updates. Structure:

    patch_embed (PatchEmbed: proj | PatchEmbed_CNN: conv1, bn1, conv2, bn2, proj)
    cls_token, pos_embed, pos_drop
    blocks[i] = Block(norm1, attn, drop_path, norm2, mlp)
        attn = ReAttention(qkv, attn_drop, [reatten_matrix (1x1 Conv2d H->H, bias),
                            var_norm (BatchNorm2d H)], proj, proj_drop)
        (apply_transform=False gives plain multi-head attention, same keys minus the two)
    norm, head
"""

from __future__ import annotations

import torch
from torch import nn

# official entrypoint -> constructor kwargs (table of spec section 3)
VARIANTS = {
    "deepvit_patch16_224_re_attn_16b": dict(embed_dim=384, depth=16, reattn=range(16)),
    "deepvit_patch16_224_re_attn_24b": dict(embed_dim=384, depth=24, reattn=range(24)),
    "deepvit_patch16_224_re_attn_32b": dict(embed_dim=384, depth=32, reattn=range(32)),
    "deepvit_S": dict(embed_dim=396, depth=16, reattn=range(11, 16), cnn_stem=True,
                      transform_scale=True, adjust_ratio=0.5),
    "deepvit_L": dict(embed_dim=420, depth=32, reattn=range(20, 32), cnn_stem=True,
                      adjust_ratio=0.5),
    "deepvit_L_384": dict(img_size=384, embed_dim=420, depth=32, reattn=range(20, 32),
                          cnn_stem=True, adjust_ratio=0.5),
}
# the paper's plain ViT baselines: the same networks with every block plain
for _d in (16, 24, 32):
    VARIANTS[f"vit_{_d}b"] = dict(embed_dim=384, depth=_d, reattn=())


class DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ReAttention(nn.Module):
    """Re-attention (apply_transform=True) or plain MHSA (False); returns (x, attn)."""

    def __init__(self, dim, num_heads=12, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 expansion_ratio=3, apply_transform=True, transform_scale=False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.apply_transform = apply_transform
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * expansion_ratio, bias=qkv_bias)
        if apply_transform:
            self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1, 1)
            self.var_norm = nn.BatchNorm2d(num_heads)
            self.reatten_scale = self.scale if transform_scale else 1.0
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        attn = self.attn_drop(attn)
        if self.apply_transform:
            attn = self.var_norm(self.reatten_matrix(attn)) * self.reatten_scale
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=3.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, apply_transform=False, scale_adjustment=1.0,
                 transform_scale=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.adjust_ratio = scale_adjustment
        self.attn = ReAttention(dim, num_heads, qkv_bias, attn_drop, drop,
                                apply_transform=apply_transform,
                                transform_scale=transform_scale)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        r = self.adjust_ratio
        x_new, attn = self.attn(self.norm1(x * r))
        x = x + self.drop_path(x_new / r)
        x = x + self.drop_path(self.mlp(self.norm2(x * r))) / r
        return x, attn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size=16, in_chans=3, embed_dim=384):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchEmbed_CNN(nn.Module):
    def __init__(self, patch_size=16, in_chans=3, embed_dim=384):
        super().__init__()
        p = patch_size // 2
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.proj = nn.Conv2d(64, embed_dim, p, p)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class DeepVisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=384, depth=16,
                 num_heads=12, mlp_ratio=3.0, qkv_bias=True, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, reattn=(), cnn_stem=False,
                 transform_scale=False, adjust_ratio=1.0):
        super().__init__()
        embed = PatchEmbed_CNN if cnn_stem else PatchEmbed
        self.patch_embed = embed(patch_size, 3, embed_dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        reattn = set(reattn)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                  apply_transform=i in reattn, scale_adjustment=adjust_ratio,
                  transform_scale=transform_scale)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x, return_attention=False):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        maps = []
        for blk in self.blocks:
            x, attn = blk(x)
            maps.append(attn)
        logits = self.head(self.norm(x)[:, 0])
        return (logits, maps) if return_attention else logits


def create(name: str, **overrides) -> DeepVisionTransformer:
    """Official entrypoint name (or 'vit_16b' ...) -> reference model; overrides e.g.
    img_size=32, num_classes=10."""
    return DeepVisionTransformer(**{**VARIANTS[name], **overrides})


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for what default init leaves trivial: LayerNorm/BatchNorm affine
    parameters, BatchNorm running statistics, biases, tokens; so parity tests can fail."""
    g = torch.Generator().manual_seed(seed)

    def rn(t, scale):
        return torch.randn(t.shape, generator=g) * scale

    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            m.weight.copy_(1 + rn(m.weight, 0.2))
            m.bias.copy_(rn(m.bias, 0.2))
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(rn(m.running_mean, 0.2))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            m.bias.copy_(rn(m.bias, 0.05))
    for name, p in model.named_parameters():
        if name in ("cls_token", "pos_embed"):
            p.copy_(rn(p, 0.5))
    return model
