"""Cost of the attention-collapse monitor (``config.collapse_every_steps``) relative to training.

Builds the run of a training config (``train.loop.setup``: the compiled train step and the
probe exactly as the loop uses them), then times, side by side and interleaved, compiled
train steps on real batches and probe calls on the fixed probe batch. The overhead at the
config's cadence is ``probe time / (collapse_every_steps x step time)``.

    python benchmarks/collapse_overhead.py [--config configs/default.py] [--steps 40]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _config(path: str):
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.py"))
    p.add_argument("--steps", type=int, default=40, help="timed train steps")
    p.add_argument("--every", type=int, default=0,
                   help="cadence to report (default: the config's collapse_every_steps)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        "collapse_overhead.json"))
    args = p.parse_args()

    from deepvit_jax.analysis.monitor import make_probe
    from deepvit_jax.train.loop import setup

    config = _config(args.config)
    every = args.every or config.collapse_every_steps or 20
    with tempfile.TemporaryDirectory() as workdir:
        run = setup(config, workdir)
        probe = make_probe(run.model_def, run.rest, run.evaluator.eval_batches)
        batches = [next(run.train_iter) for _ in range(4)]
        state = run.state
        # compile both, then warm up
        for _ in range(2):
            state, m = run.train_step(state, run.rest, batches[0])
            jax.block_until_ready(m)
            probe(state)
        step_t, probe_t = [], []
        for i in range(args.steps):
            t = time.perf_counter()
            state, m = run.train_step(state, run.rest, batches[i % len(batches)])
            jax.block_until_ready(m)
            step_t.append(time.perf_counter() - t)
            if i % 4 == 0:  # interleaved: both see the same machine load
                t = time.perf_counter()
                probe(state)  # returns floats: synchronous
                probe_t.append(time.perf_counter() - t)
        run.checkpointer.close()
    step_s, probe_s = float(np.median(step_t)), float(np.median(probe_t))
    result = {
        "config": os.path.relpath(args.config, ROOT), "model": run.model_cfg.to_dict(),
        "batch_size": config.batch_size, "probe_images": 32, "collapse_every_steps": every,
        "train_step_s_median": step_s, "probe_s_median": probe_s,
        "probe_over_step": probe_s / step_s,
        "overhead_fraction": probe_s / (every * step_s),
        "train_steps_timed": len(step_t), "probes_timed": len(probe_t),
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "note": "medians of interleaved timings in one process; the machine may be shared",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"train step {step_s * 1e3:.1f} ms, probe {probe_s * 1e3:.1f} ms "
          f"({probe_s / step_s:.3f} of a step); every {every} steps: "
          f"{100 * result['overhead_fraction']:.2f}% of training time -> {args.out}")


if __name__ == "__main__":
    main()
