"""deepvit-jax against the official PyTorch model, side by side in one run, on one machine.

For each model it times one full AdamW training step (forward, backward, update) and one
inference forward pass, in JAX (our Flax NNX model under jit) and in PyTorch (the official
model as laid out in deepvit_jax/reference/official.py, which follows the released code module
for module), on the same batch size, image size and precision. It prints img/s for both and
the JAX / PyTorch ratio, and writes everything to a JSON file.

    python benchmarks/vs_pytorch.py                       # CPU, DeepViT-16 vs ViT-16, batch 16
    python benchmarks/vs_pytorch.py --device cuda --batch 128 --dtype bfloat16

On CUDA, PyTorch runs in eager mode (as the official training script does) with
torch.autocast for bf16; JAX runs its model with compute dtype bf16 (parameters fp32).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _median_time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_jax(name, args):
    import jax
    import optax
    from flax import nnx

    import deepvit_jax as dj

    model = dj.create_model(name, image_size=args.image_size, dtype=args.dtype)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3))
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 1000)
    opt = nnx.Optimizer(model, optax.adamw(5e-4, weight_decay=0.05), wrt=nnx.Param)

    # The functional form, as the training loop uses it: split the module graph once and jit
    # pure functions of its arrays. (nnx.jit re-traverses the graph on every call, which costs
    # tens of ms per step for a 16-block model: measured and reported in the README.)
    model.train()
    train_graph, train_state = nnx.split((model, opt))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        model, opt = nnx.merge(train_graph, state)

        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    model.eval()
    eval_graph, eval_state = nnx.split(model)

    @jax.jit
    def infer(state, x):
        return nnx.merge(eval_graph, state)(x)

    out = {}
    # Inference first: the training step donates (and so deletes) the shared arrays.
    if args.mode in ("infer", "both"):
        out["infer_s"] = _median_time(lambda: jax.block_until_ready(infer(eval_state, x)),
                                      args.steps, args.warmup)
    if args.mode in ("train", "both"):
        box = [train_state]

        def run_train():
            box[0], loss = train_step(box[0], x, y)
            jax.block_until_ready(loss)

        out["train_s"] = _median_time(run_train, args.steps, args.warmup)
    out["device"] = str(jax.devices()[0])
    return out


def bench_torch(name, args):
    import torch

    from deepvit_jax.models.registry import official_name
    from deepvit_jax.reference import official

    dev = torch.device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = official.create(official_name(name), img_size=args.image_size).to(dev)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bfloat16")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync()

    @torch.no_grad()
    def infer():
        with autocast:
            model(x)
        sync()

    out = {}
    if args.mode in ("train", "both"):
        model.train()
        out["train_s"] = _median_time(train_step, args.steps, args.warmup)
    if args.mode in ("infer", "both"):
        model.eval()
        out["infer_s"] = _median_time(infer, args.steps, args.warmup)
    out["device"] = (torch.cuda.get_device_name() if dev.type == "cuda"
                     else f"cpu x{torch.get_num_threads()} threads")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deepvit_16b", "vit_16b"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu", help="PyTorch device: cpu or cuda")
    p.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/"
                   "vs_pytorch_<device>_<dtype>.json)")
    args = p.parse_args()

    rows = []
    for name in args.models:
        j, t = bench_jax(name, args), bench_torch(name, args)
        row = {"model": name, "jax_device": j["device"], "torch_device": t["device"]}
        for key in ("train_s", "infer_s"):
            if key in j:
                kind = key[:-2]
                row[f"jax_{kind}_img_s"] = round(args.batch / j[key], 2)
                row[f"torch_{kind}_img_s"] = round(args.batch / t[key], 2)
                row[f"{kind}_speedup"] = round(t[key] / j[key], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {"args": vars(args), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "rows": rows}
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"vs_pytorch_{args.device}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<14}{'mode':<7}{'JAX img/s':>11}{'PyTorch img/s':>15}{'speed-up':>10}")
    for r in rows:
        for kind in ("train", "infer"):
            if f"jax_{kind}_img_s" in r:
                print(f"{r['model']:<14}{kind:<7}{r[f'jax_{kind}_img_s']:>11}"
                      f"{r[f'torch_{kind}_img_s']:>15}{r[f'{kind}_speedup']:>9}x")


if __name__ == "__main__":
    main()
