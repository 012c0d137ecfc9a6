"""The key-rule machinery shared by every PyTorch layout: tensor transforms, rule templates
compiled for both directions, and small helpers over state-dict keys.

A rule is ``(torch key template, our state path template, transform)``; ``{i}`` matches a
block index and the other ``{name}`` fields one of a few alternatives (``FIELDS``). A
``{bnw}`` torch field (BatchNorm / LayerNorm parameter) maps through ``NORM_NAMES``. The same
table maps both ways (:class:`RuleTable`), so ``to_pytorch`` is the exact inverse of
``from_pytorch``. The tables themselves live with their layouts (``official``,
``vit_pytorch``, ``timm_vit``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from deepvit_jax.model_dir import Path

Rule = tuple[str, str, str]  # (torch key template, our state path template, transform)

# --------------------------------------------------------------------------------------
# Tensor transforms: (torch -> ours, ours -> torch)
# --------------------------------------------------------------------------------------

TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray],
                            Callable[[np.ndarray], np.ndarray]]] = {
    "id": (lambda a: a, lambda a: a),
    # nn.Linear weight (out, in) <-> Dense kernel (in, out)
    "linear": (lambda a: a.T, lambda a: a.T),
    # nn.Conv2d weight (out, in, kh, kw) <-> NHWC conv kernel (kh, kw, in, out)
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    # official Theta: Conv2d(H, H, 1) weight (out, in, 1, 1) <-> W[out, in]
    "conv1x1": (lambda a: a[:, :, 0, 0], lambda a: a[:, :, None, None]),
    # vit-pytorch Theta: einsum('bhij,hg->bgij', A, W) uses W[in, out] <-> W[out, in]
    "transpose": (lambda a: a.T, lambda a: a.T),
}

FIELDS = {
    "i": r"\d+",
    "conv": r"conv1|conv2|proj",
    "bn": r"bn1|bn2",
    "ln": r"norm1|norm2",
    "lin": r"qkv|proj",
    "fc": r"fc1|fc2",
    "bnw": r"weight|bias|running_mean|running_var",
}
# BatchNorm / LayerNorm parameter names: torch -> ours
NORM_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _compile(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{FIELDS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


class RuleTable:
    """A rule table compiled for both directions."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = [(_compile(t), _compile(j), t, j, tf) for t, j, tf in rules]

    def to_ours(self, key: str) -> tuple[str, str] | None:
        for rt, _, _, j, tf in self.rules:
            m = rt.match(key)
            if m:
                g = m.groupdict()
                if "bnw" in g:
                    g["bnw"] = NORM_NAMES[g["bnw"]]
                return j.format(**g), tf
        return None

    def to_torch(self, path: str) -> tuple[str, str] | None:
        inv = {v: k for k, v in NORM_NAMES.items()}
        for _, rj, t, _, tf in self.rules:
            if "{bnw}" in t:
                rj = re.compile(rj.pattern.replace(FIELDS["bnw"], "scale|bias|mean|var"))
            m = rj.match(path)
            if m:
                g = m.groupdict()
                if "bnw" in g:
                    g["bnw"] = inv[g["bnw"]]
                return t.format(**g), tf
        return None


def state_path(s: str) -> Path:
    """``'blocks.3.attn.qkv.kernel'`` -> ``('blocks', 3, 'attn', 'qkv', 'kernel')``."""
    return tuple(int(p) if p.isdigit() else p for p in s.split("."))


def torch_shape(shape, transform: str) -> tuple[int, ...]:
    """The PyTorch shape of a weight of our ``shape`` under ``transform``."""
    return tuple(TRANSFORMS[transform][1](np.broadcast_to(np.float32(0), shape)).shape)


def block_indices(sd, pattern: str) -> list[int]:
    """The sorted block indices that ``pattern`` (one group) captures from the keys of ``sd``."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})
