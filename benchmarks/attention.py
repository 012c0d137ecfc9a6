"""One transformer block, plain vs Re-attention, for each attention implementation.

For every (tokens N, block kind, implementation, mode) it compiles the block under jit and
records the median wall time, the compiled executable's ``cost_analysis()`` (flops, bytes
accessed) and ``memory_analysis()`` (arguments + outputs + temporaries: the peak the
executable needs), plus the output's relative error against the reference implementation
on the same input (the fast paths must be correct before they are fast). Modes:

* ``infer``: eval-mode forward (BatchNorm with running statistics);
* ``fwd``: train-mode forward (BatchNorm with batch statistics);
* ``fwd_bwd``: train-mode forward + backward (gradients of every parameter and the input).

The ``xla-fma`` rows are the XLA path with the head mixing written as H fused multiply-adds
instead of an einsum (``xla.MIXING``), the measurement behind that choice.

    python benchmarks/attention.py                       # CPU: N = 197 and 577
    python benchmarks/attention.py --impls reference xla pallas --batch 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

# Run as `python benchmarks/attention.py`: the sibling script is importable.
from vs_pytorch import _median_time

REPO = Path(__file__).resolve().parents[1]


def _block(kind, impl, n_tokens, args):
    from flax import nnx

    from deepvit_jax.models.deepvit import Block, ModelConfig

    grid = round((n_tokens - 1) ** 0.5)
    cfg = ModelConfig(embed_dim=args.dim, num_heads=args.heads, image_size=16 * grid,
                      dtype=args.dtype, attention_impl=impl)
    block = Block(cfg, reattention=kind == "reattn", drop_path=0.0, rngs=nnx.Rngs(0))
    return block


def _compiled_stats(compiled):
    out = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["gflops"] = round(float(cost.get("flops", 0.0)) / 1e9, 3)
        out["gbytes_accessed"] = round(float(cost.get("bytes accessed", 0.0)) / 1e9, 3)
    except Exception as e:  # some backends do not implement it
        out["cost_analysis_error"] = str(e)[:200]
    try:
        mem = compiled.memory_analysis()
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        out["peak_mib"] = round(peak / 2**20, 1)
        out["temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 1)
    except Exception as e:
        out["memory_analysis_error"] = str(e)[:200]
    return out


def bench_one(kind, impl, n_tokens, mode, args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deepvit_jax.models.attention import xla

    default_mixing = xla.MIXING
    xla.MIXING = "fma" if impl == "xla-fma" else default_mixing
    block = _block(kind, "xla" if impl == "xla-fma" else impl, n_tokens, args)
    if mode == "infer":
        block.eval()
    else:
        block.train()
    graph, params, rest = nnx.split(block, nnx.Param, ...)
    state = (params, rest)
    x = jax.random.normal(jax.random.key(0), (args.batch, n_tokens, args.dim), args.dtype)

    if mode == "fwd_bwd":
        def fn(state, x):
            def loss(m, x):
                y, _ = m(x)
                return jnp.sum(y.astype(jnp.float32) ** 2)
            return nnx.grad(loss, argnums=(0, 1))(nnx.merge(graph, *state), x)
    else:
        def fn(state, x):
            y, _ = nnx.merge(graph, *state)(x)
            return y

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(state, x).compile()
    row = {"compile_s": round(time.perf_counter() - t0, 2), **_compiled_stats(compiled)}
    out = compiled(state, x)
    xla.MIXING = default_mixing
    return row, out, lambda: jax.block_until_ready(compiled(state, x))


def _rel_err(ref, got):
    import jax
    import numpy as np

    # Per array, relative to its norm. Theta's bias is left out: its gradient is exactly 0
    # in the fold (it cancels in train-mode BatchNorm) and rounding noise in the reference.
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                                     jax.tree.leaves(got), strict=True)
             if "reattn_bias" not in jax.tree_util.keystr(path)]
    return float(max(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30) for a, b in pairs))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[197, 577],
                   help="sequence lengths (1 + a square grid): 197 = 224 px, 577 = 384 px")
    p.add_argument("--impls", nargs="+", default=None,
                   help="default: reference xla xla-fma, plus pallas on GPU/TPU")
    p.add_argument("--modes", nargs="+", default=["infer", "fwd", "fwd_bwd"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=3, help="timed calls per round (median)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import jax

    backend = jax.default_backend()
    impls = args.impls or (["reference", "xla", "xla-fma"]
                           + ([] if backend == "cpu" else ["pallas"]))
    rows = []
    for n in args.tokens:
        for kind in ("plain", "reattn"):
            for mode in args.modes:
                ref_out, group, runs = None, [], {}
                for impl in impls:
                    row = {"tokens": n, "block": kind, "mode": mode, "impl": impl}
                    try:
                        stats, out, runs[impl] = bench_one(kind, impl, n, mode, args)
                        row.update(stats)
                        if impl == "reference":
                            ref_out = out
                        elif ref_out is not None:
                            row["rel_err_vs_reference"] = float(f"{_rel_err(ref_out, out):.2e}")
                    except Exception as e:  # record and go on (e.g. a kernel that fails)
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    group.append(row)
                # Interleaved rounds: a load spike on a shared machine hits every impl.
                rounds = [{impl: _median_time(fn, args.steps) for impl, fn in runs.items()}
                          for _ in range(args.repeats)]
                for row in group:
                    if row["impl"] in runs:
                        row["time_ms"] = round(1e3 * statistics.median(
                            r[row["impl"]] for r in rounds), 2)
                        if "reference" in runs:
                            row["speedup_vs_reference"] = round(statistics.median(
                                r["reference"] / r[row["impl"]] for r in rounds), 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    result = {"args": vars(args), "backend": backend, "device": str(jax.devices()[0]),
              "jax": jax.__version__, "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "rows": rows}
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"attention_{backend}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'N':>4} {'block':<7}{'mode':<8}{'impl':<11}{'ms':>9}{'x ref':>7}{'GFLOP':>9}"
          f"{'GB':>8}{'peak MiB':>10}{'rel err':>10}")
    for r in rows:
        print(f"{r['tokens']:>4} {r['block']:<7}{r['mode']:<8}{r['impl']:<11}"
              f"{r.get('time_ms', float('nan')):>9}{r.get('speedup_vs_reference', ''):>7}"
              f"{r.get('gflops', ''):>9}"
              f"{r.get('gbytes_accessed', ''):>8}{r.get('peak_mib', ''):>10}"
              f"{r.get('rel_err_vs_reference', ''):>10}  {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
