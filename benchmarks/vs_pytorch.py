"""deepvit-jax against the official PyTorch model, side by side in one run, on one machine.

For each model it times one full AdamW training step (forward, backward, update) and one
inference forward pass, in JAX (our Flax NNX model under jit, for each ``--jax-impls``
attention implementation) and in PyTorch (the official model as laid out in
deepvit_jax/reference/official.py, which follows the released code module for module),
eager and ``torch.compile``d (a fair peer is compiled), on the same batch size, image size
and precision. All runners are built and warmed up first, then timed in ``--repeats``
interleaved rounds (each the median of ``--steps`` steps); the JSON keeps every round and
reports the median time of each runner and the median of the per-round ratios, so a load
spike on a shared machine hits both sides of a ratio. Each row also has every runner's
achieved GFLOP/s (XLA's flop count of the step) and the machine's matmul GFLOP/s for the
model's MLP shape, measured in the same run: ``ceiling_vs_<peer>`` is the speed-up over that
peer of a step that ran every FLOP at matmul speed, the most any implementation can reach.

    python benchmarks/vs_pytorch.py --image-size 224          # CPU, batch 16, four models
    python benchmarks/vs_pytorch.py --device cuda --batch 128 --dtype bfloat16

On CUDA, PyTorch uses torch.autocast for bf16; JAX runs its model with compute dtype bf16
(parameters fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["deepvit_16b", "vit_16b", "deepvit_s", "deepvit_l_384"]


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _image_size(name, args):
    import deepvit_jax as dj

    return args.image_size or dj.get_config(name).image_size


def jax_runners(name, impl, args):
    """{'train': fn, 'infer': fn}, compiled and warmed up."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import deepvit_jax as dj

    size = _image_size(name, args)
    model = dj.create_model(name, image_size=size, dtype=args.dtype, attention_impl=impl)
    x = jax.random.normal(jax.random.key(0), (args.batch, size, size, 3))
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 1000)
    opt = nnx.Optimizer(model, optax.adamw(5e-4, weight_decay=0.05), wrt=nnx.Param)

    # The functional form, as the training loop uses it: split the module graph once and jit
    # pure functions of its arrays (nnx.jit re-traverses the graph on every call).
    model.eval()
    eval_graph, eval_state = nnx.split(model)
    eval_state = jax.tree.map(jnp.copy, eval_state)  # the train step donates the originals
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

    @jax.jit
    def infer(state, x):
        return nnx.merge(eval_graph, state)(x)

    box = [train_state]

    def run_train():
        box[0], loss = train_step(box[0], x, y)
        jax.block_until_ready(loss)

    def run_infer():
        jax.block_until_ready(infer(eval_state, x))

    # XLA's count of the floating-point work of one step (the same maths as PyTorch's):
    # with the matmul probe below it gives the roofline of every runner.
    run_train.flops = _flops(train_step.lower(train_state, x, y))
    run_infer.flops = _flops(infer.lower(eval_state, x))
    runners = {"train": run_train, "infer": run_infer}
    return {k: v for k, v in runners.items() if args.mode in (k, "both")}


def _flops(lowered) -> float | None:
    # The lowered (unoptimised) module's count: no second compile, which on an accelerator
    # would cost as much device time as the first.
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_gflops(name, args) -> dict[str, float]:
    """GFLOP/s of the model's largest matmul (tokens x embed_dim @ embed_dim x mlp_dim, the
    MLP's first layer) in JAX and in PyTorch, on this machine, in the benchmark's dtype: the
    ceiling for a step made of matmuls."""
    import jax
    import jax.numpy as jnp
    import torch

    import deepvit_jax as dj

    c = dj.get_config(name)
    size = _image_size(name, args)
    m = args.batch * ((size // c.patch_size) ** 2 + 1)
    k, n = c.embed_dim, c.mlp_dim or 4 * c.embed_dim
    flops = 2.0 * m * k * n
    jdt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (m, k), jdt)
    b = jax.random.normal(jax.random.key(1), (k, n), jdt)
    mm = jax.jit(jnp.dot)
    tdt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    ta = torch.randn(m, k, device=args.device, dtype=tdt)
    tb = torch.randn(k, n, device=args.device, dtype=tdt)

    def torch_mm():
        ta @ tb
        if args.device == "cuda":
            torch.cuda.synchronize()

    out = {}
    for key, fn in (("jax", lambda: mm(a, b).block_until_ready()), ("torch", torch_mm)):
        for _ in range(3):
            fn()
        out[f"{key}_matmul_gflop_s"] = round(flops / _median_time(fn, 10) / 1e9, 1)
    return out


def torch_runners(name, compiled, args):
    import torch

    from deepvit_jax.models.registry import official_name
    from deepvit_jax.reference import official

    dev = torch.device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    size = _image_size(name, args)
    model = official.create(official_name(name), img_size=size).to(dev)
    x = torch.randn(args.batch, 3, size, size, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bfloat16")
    fwd = torch.compile(model) if compiled else model

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        sync()

    @torch.no_grad()
    def infer():
        model.eval()
        with autocast:
            fwd(x)
        sync()

    runners = {"train": train_step, "infer": infer}
    return {k: v for k, v in runners.items() if args.mode in (k, "both")}


def bench_model(name, args):
    runners, errors, compile_s = {}, {}, {}
    builders = [(f"jax_{impl}", lambda impl=impl: jax_runners(name, impl, args))
                for impl in args.jax_impls]
    if args.torch_compile in ("no", "also"):
        builders.append(("torch_eager", lambda: torch_runners(name, False, args)))
    if args.torch_compile in ("only", "also"):
        builders.append(("torch_compiled", lambda: torch_runners(name, True, args)))
    for key, build in builders:
        try:
            for kind, fn in build().items():
                t = time.perf_counter()
                for _ in range(args.warmup):
                    fn()  # compiles on the first call
                compile_s[f"{key}_{kind}"] = round(time.perf_counter() - t, 1)
                runners[f"{key}_{kind}"] = fn
        except Exception as e:  # e.g. torch.compile without a working C++ toolchain
            errors[key] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{name}: {key} failed: {errors[key]}", flush=True)

    rounds = []
    for _ in range(args.repeats):
        rounds.append({k: _median_time(fn, args.steps) for k, fn in runners.items()})
    row = {"model": name, "image_size": _image_size(name, args), "warmup_s": compile_s,
           "rounds_s": rounds, "errors": errors}
    for key in runners:
        row[f"{key}_img_s"] = round(args.batch / statistics.median(r[key] for r in rounds), 3)
    # Roofline: GFLOP/s achieved by each runner (XLA's flop count of the step; PyTorch does
    # the same maths), against the machine's matmul speed measured in the same run. The
    # ceiling is the largest speed-up over a peer that a step running every FLOP at matmul
    # speed could reach.
    flops = {key.rsplit("_", 1)[1]: fn.flops for key, fn in runners.items()   # the JAX ones
             if hasattr(fn, "flops")}
    if any(flops.values()):
        peak = matmul_gflops(name, args)
        row.update(peak)
        best = max(peak.values())
        for key in runners:
            kind = key.rsplit("_", 1)[1]
            if flops.get(kind):
                gf = flops[kind] / (args.batch / row[f"{key}_img_s"]) / 1e9
                row[f"{key}_gflop_s"] = round(gf, 1)
                if not key.startswith("jax_"):
                    row[f"ceiling_vs_{key}"] = round(best / gf, 3)
    # Speed-ups: PyTorch time / JAX time, the median over rounds (side by side).
    for key in runners:
        if not key.startswith("jax_"):
            continue
        impl, kind = key[4:].rsplit("_", 1)
        for peer in ("torch_eager", "torch_compiled"):
            if f"{peer}_{kind}" in runners:
                row[f"{impl}_vs_{peer}_{kind}"] = round(statistics.median(
                    r[f"{peer}_{kind}"] / r[key] for r in rounds), 3)
    return row, rounds


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=None,
                   help="default: each model's own (224, or 384 for deepvit_l_384)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu", help="PyTorch device: cpu or cuda")
    p.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    p.add_argument("--jax-impls", nargs="+", default=["auto"],
                   help="ModelConfig.attention_impl values to time (e.g. reference auto)")
    p.add_argument("--torch-compile", choices=["no", "also", "only"], default="also",
                   help="time torch.compile'd PyTorch as well as eager (compiling is slow "
                   "on a small CPU: 'no' skips it)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (median)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/"
                   "vs_pytorch_<device>_<dtype>.json)")
    args = p.parse_args()

    import jax
    import torch

    rows, per_model_rounds = [], {}
    for name in args.models:
        row, per_model_rounds[name] = bench_model(name, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds_s"}), flush=True)

    summary = {}
    # Re-attention's cost: DeepViT-16 / ViT-16 step time, per round, when both ran.
    if {"deepvit_16b", "vit_16b"} <= set(per_model_rounds):
        d, v = per_model_rounds["deepvit_16b"], per_model_rounds["vit_16b"]
        for key in d[0]:
            if key in v[0]:
                summary[f"deepvit16_over_vit16_time_{key}"] = round(statistics.median(
                    a[key] / b[key] for a, b in zip(d, v, strict=True)), 3)
    result = {"args": vars(args), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
              "jax_device": str(jax.devices()[0]), "rows": rows, "summary": summary}
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"vs_pytorch_{args.device}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'model':<15}{'runner':<32}{'img/s':>9}")
    for r in rows:
        for key, val in r.items():
            if key.endswith("_img_s"):
                print(f"{r['model']:<15}{key[:-6]:<32}{val:>9}")
        for key, val in r.items():
            if "_vs_" in key:
                print(f"{r['model']:<15}{key:<32}{val:>8}x")
    for key, val in summary.items():
        print(f"{key}: {val}")


if __name__ == "__main__":
    main()
