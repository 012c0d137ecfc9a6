"""Compile time of deep models with their blocks unrolled (a Python loop over blocks, what
XLA sees as `depth` copies) against `model.scan_blocks=True` (each run of alike blocks one
`jax.lax.scan`: one block body compiled).

On this machine's backend: one training step (forward + backward) of the bare model, two
images. With `--topology`: the whole ImageNet train step of the recipe (optimizer, EMA,
mixup, BatchNorm) compiled for that TPU slice by libtpu on this CPU, through
`python -m deepvit_jax.aot` (its `compile_s`), at `--tpu-batch` images and
`--tpu-image-size` pixels (small, so the compile, not the size, is measured).

    python benchmarks/compile_time.py [--models deepvit_32b vit_32b] [--image-size 224]
    python benchmarks/compile_time.py --topology v5e-1 --models deepvit_16b deepvit_32b \\
        --out benchmarks/results/compile_time_tpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_seconds(name: str, image_size: int, scan: bool) -> float:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import deepvit_jax as dj

    model = dj.create_model(name, image_size=image_size, scan_blocks=scan)
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


def tpu_compile_seconds(name: str, topology: str, batch: int, image_size: int,
                        scan: bool) -> dict:
    """The aot command's train and eval compile seconds for the i1k recipe of ``name``."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cmd = [sys.executable, "-m", "deepvit_jax.aot", "--config", f"configs/i1k.py:{name}",
               "--topology", topology, f"--config.batch_size={batch}",
               f"--config.model.image_size={image_size}",
               f"--config.model.scan_blocks={scan}", "--json", out]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        r = json.loads(Path(out).read_text())
    return {"train_s": r["train"]["compile_s"], "eval_s": r["eval"]["compile_s"],
            "command_s": round(time.perf_counter() - t, 1), "libtpu": r["libtpu"],
            "device_kind": r["device_kind"],
            "train_hbm_gib": round(r["train"]["memory"]["total"] / 2**30, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deepvit_32b", "vit_32b"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--topology", help="compile the i1k train step for this TPU slice instead")
    p.add_argument("--tpu-batch", type=int, default=8)
    p.add_argument("--tpu-image-size", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax

    rows = []
    for name in args.models:
        if args.topology:
            runs = {scan: tpu_compile_seconds(name, args.topology, args.tpu_batch,
                                              args.tpu_image_size, scan)
                    for scan in (False, True)}
            row = {"model": name, "unrolled": runs[False], "scanned": runs[True],
                   "train_ratio": round(runs[False]["train_s"] / runs[True]["train_s"], 2)}
        else:
            unrolled = compile_seconds(name, args.image_size, False)
            scanned = compile_seconds(name, args.image_size, True)
            row = {"model": name, "unrolled_s": round(unrolled, 2),
                   "scanned_s": round(scanned, 2), "ratio": round(unrolled / scanned, 2)}
        rows.append(row)
        print(row, flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores", "jax": jax.__version__, "rows": rows}
    if args.topology:
        result.update(topology=args.topology, batch=args.tpu_batch,
                      image_size=args.tpu_image_size, step="i1k recipe train / eval step")
        default = "benchmarks/results/compile_time_tpu.json"
    else:
        result.update(backend=jax.default_backend(), device=str(jax.devices()[0]),
                      image_size=args.image_size, step="bare model forward + backward")
        default = "benchmarks/results/compile_time.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
