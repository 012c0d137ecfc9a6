"""Logit parity with the official PyTorch model on an accelerator, at the backend's default
matmul precision and at 'highest', plus the error of bf16 compute against fp32.

The reference is the official layout (deepvit_jax/reference/official.py) run by PyTorch in float64
on the CPU; our model gets the same random weights through the converter.

    python benchmarks/gpu_parity.py [--models deepvit_16b deepvit_s] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import jax
import numpy as np
import torch

from deepvit_jax import get_config
from deepvit_jax.convert import from_pytorch
from deepvit_jax.models.registry import official_name
from deepvit_jax.reference import official


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deepvit_16b", "deepvit_s"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/gpu_parity.json")
    args = p.parse_args()
    rows = []
    for name in args.models:
        ref = official.randomize_(official.create(official_name(name)), seed=1).eval()
        x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = ref.double()(x.double()).numpy()
        sd = {k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
        x_nhwc = jax.numpy.asarray(x.permute(0, 2, 3, 1).numpy())
        row = {"model": name, "device": str(jax.devices()[0]),
               "logit_scale": float(np.abs(want).max())}
        for dtype in ("float32", "bfloat16"):
            model = from_pytorch(sd, model=get_config(name, dtype=dtype))
            fwd = jax.jit(lambda m, x: m(x))
            for precision in ("default", "highest"):
                with jax.default_matmul_precision(precision):
                    got = np.asarray(fwd(model, x_nhwc), np.float64)
                row[f"{dtype}_{precision}_max_abs_dlogit"] = float(np.abs(got - want).max())
                row[f"{dtype}_{precision}_top1_agree"] = float(
                    (got.argmax(-1) == want.argmax(-1)).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
