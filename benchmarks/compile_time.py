"""Compile time of one training step (forward + backward) for deep models: the model as built
(a Python loop over blocks, unrolled by XLA) against the same blocks scanned with `nnx.scan`.

This is the measurement behind the decision recorded in docs/architecture.md (the model does
not scan its blocks). The scanned variant is built here only to measure it.

    python benchmarks/compile_time.py [--models deepvit_32b vit_32b] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import deepvit_jax as dj
from deepvit_jax.models.deepvit import Block


class ScannedBlocks(nnx.Module):
    """`depth` identical blocks with stacked parameters, applied with nnx.scan."""

    def __init__(self, cfg, reattention: bool, depth: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(cfg, reattention=reattention, drop_path=0.0, rngs=rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, blk):
            x, _ = blk(x)
            return x

        return body(x, self.blocks)


class ScannedModel(nnx.Module):
    """The model of `dj.create_model(name)` with its (identical) blocks scanned."""

    def __init__(self, name: str, image_size: int, rngs: nnx.Rngs):
        ref = dj.create_model(name, image_size=image_size, depth=1, rngs=rngs)
        cfg = dj.get_config(name, image_size=image_size)
        kinds = {len(cfg.reattn_indices) == cfg.depth, len(cfg.reattn_indices) == 0}
        assert True in kinds, "this benchmark scans models whose blocks are all alike"
        self.embed, self.cls_token, self.pos_embed = ref.patch_embed, ref.cls_token, ref.pos_embed
        self.norm, self.head = ref.norm, ref.head
        self.blocks = ScannedBlocks(cfg, bool(cfg.reattn_indices), cfg.depth, rngs)

    def __call__(self, images):
        x = self.embed(images)
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        return self.head(self.norm(self.blocks(x))[:, 0])


def compile_seconds(model, image_size: int) -> float:
    x = jnp.zeros((2, image_size, image_size, 3))
    y = jnp.zeros((2,), jnp.int32)

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(m):
        return nnx.grad(loss)(m)

    # First call = trace + compile + run; the second call runs only. Their difference is the
    # compile (and trace) time.
    t = time.perf_counter()
    jax.block_until_ready(step(model))
    first = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(step(model))
    return first - (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deepvit_32b", "vit_32b"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = p.parse_args()
    rows = []
    for name in args.models:
        unrolled = compile_seconds(dj.create_model(name, image_size=args.image_size),
                                   args.image_size)
        scanned = compile_seconds(ScannedModel(name, args.image_size, nnx.Rngs(0)),
                                  args.image_size)
        rows.append({"model": name, "unrolled_s": round(unrolled, 2),
                     "scanned_s": round(scanned, 2), "ratio": round(unrolled / scanned, 2)})
        print(rows[-1], flush=True)
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "machine": platform.processor() or platform.machine(),
              "jax": jax.__version__, "image_size": args.image_size, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
