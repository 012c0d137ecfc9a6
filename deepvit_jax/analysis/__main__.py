"""Attention-collapse analysis of one or more checkpoints (the paper's Eq. 2).

  python -m deepvit_jax.analysis --checkpoint runs/collapse_vit \\
      --checkpoint runs/collapse_deepvit --out analysis/
  python -m deepvit_jax.analysis --checkpoint runs/collapse_vit --steps 110,330,550 \\
      --out analysis/vit
  python -m deepvit_jax.analysis --checkpoint models/deepvit_s --dataset imagenet2012 \\
      --num-images 64 --blocks 0,7,15 --out analysis/deepvit_s
  python -m deepvit_jax.analysis sweep --out runs/collapse_sweep   # the study (sweep.py)

Each ``--checkpoint PATH`` (repeat it for several) is a model directory, a training workdir
(its latest checkpoint, or each of ``--steps``) or one training checkpoint. Over the first
``--num-images`` images of the split (the run's eval split by default) it writes to
``--out``:

* ``similarity.json``: per checkpoint, the depth x depth cross-layer similarity, each
  block's mean similarity to its next ``--k`` blocks, the number of blocks at or above
  ``--threshold`` ("similar blocks"), the inter-head similarity per block;
* ``similarity.png``: every checkpoint on one figure;
* ``attention-<label>.png``: the class token's attention of ``--blocks`` over image
  ``--image`` (head-averaged and per head).

``--out`` is claimed for the whole run (a second command writing it exits 3); each file is
written under a temporary name and renamed. Exit status: 0 done, 2 bad input, 3 ``--out``
in use, 4 disk full / I/O error.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from deepvit_jax import cli, saved_run
from deepvit_jax.analysis import similarity as sim
from deepvit_jax.analysis import sweep
from deepvit_jax.analysis.checkpoint_analysis import analyse_checkpoint
from deepvit_jax.analysis.collect import collect_maps
from deepvit_jax.analysis.plots import plot_attention, plot_similarity
from deepvit_jax.errors import ConfigError
from deepvit_jax.utils import claim_output


def _label(path: str, step: int | None, kind: str) -> str:
    path = os.path.abspath(path).rstrip(os.sep)
    if kind == "training":
        parts = path.split(os.sep)
        if parts[-1].isdigit() and len(parts) > 2 and parts[-2] == "checkpoints":
            path = os.sep.join(parts[:-2])
        return f"{os.path.basename(path)}@{step}"
    return os.path.basename(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # the depth / seed / width study (analysis/sweep.py)
        return sweep.main(argv[1:])
    p = cli.parser("deepvit_jax.analysis", "Cross-layer and inter-head attention similarity "
                   "(DeepViT Eq. 2) and attention maps of checkpoints.", __doc__)
    cli.add_checkpoint_flag(p, many=True)
    p.add_argument("--out", required=True, help="output directory (JSON + PNG)")
    p.add_argument("--steps", type=cli.int_list, help="checkpoint steps of each workdir, e.g. "
                                               "110,330,550 (default: the latest)")
    p.add_argument("--labels", help="comma-separated names for the checkpoints in the "
                                    "figures")
    p.add_argument("--ema", action="store_true", help="the EMA weights of training runs")
    p.add_argument("--num-images", type=cli.positive_int, default=64)
    p.add_argument("--dataset", help="dataset (default: the run's; required for model "
                                     "directories)")
    p.add_argument("--split")
    p.add_argument("--data-dir")
    p.add_argument("--k", type=cli.positive_int, default=1, help="similarity to the next K blocks")
    p.add_argument("--threshold", type=float, default=sim.DEFAULT_THRESHOLD,
                   help="similar-block threshold")
    p.add_argument("--blocks", type=cli.int_list, help="blocks whose maps to draw (default: first, "
                                                "middle, last)")
    p.add_argument("--image", type=int, default=0, help="which image to draw the maps over")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--center", action="store_true",
                   help="centre each column before the cosine (correlation; a control for "
                        "comparing softmax maps with Re-attention's normalised maps)")
    args = p.parse_args(argv)
    cli.setup_console(args.verbose, library_warnings=False)
    return cli.run_cli(lambda: _claimed(args), input_errors=(ValueError,))


def _claimed(args) -> None:
    """``--out`` is claimed for the whole run: a second analysis writing it exits 3."""
    with claim_output(cli.check_output(args.out, args.checkpoint, flag="--out")):
        _run(args)


def _run(args) -> None:
    paths = args.checkpoint
    labels = args.labels.split(",") if args.labels else None
    if args.k < 1:
        raise ConfigError(f"--k {args.k}: must be >= 1")
    if labels and len(labels) != len(paths):
        raise ConfigError(f"--labels has {len(labels)} names for {len(paths)} checkpoints")
    if not 0 <= args.image < args.num_images:
        raise ConfigError(f"--image {args.image}: must be below --num-images {args.num_images}")
    out = cli.check_output(args.out, paths, flag="--out")
    jobs = []  # (label, source)
    for i, path in enumerate(paths):
        steps = args.steps or [None]
        for step in steps:
            src = saved_run.resolve(path, step)
            name = _label(path, src.step, src.kind)
            if labels:
                name = labels[i] + (f"@{src.step}" if src.step is not None else "")
            jobs.append((name, src))
    results, figures = {}, {}
    for name, src in jobs:
        r, model, images = analyse_checkpoint(
            src, ema=args.ema, num_images=args.num_images, dataset=args.dataset,
            split=args.split, data_dir=args.data_dir, k=args.k, threshold=args.threshold,
            batch_size=args.batch_size, center=args.center, return_model=True)
        results[name] = r
        d = r["depth"]
        blocks = args.blocks or sorted({0, d // 2, d - 1})
        if any(not 0 <= b < d for b in blocks):
            raise ConfigError(f"--blocks {blocks}: {name} has blocks 0..{d - 1}")
        one = images[args.image:args.image + 1]
        if len(one):
            cfg = model.config
            figures[name] = (one, collect_maps(model, one), blocks, cfg.mean, cfg.std)
    os.makedirs(out, exist_ok=True)
    cli.write_json(os.path.join(out, "similarity.json"),
                        {"k": args.k, "threshold": args.threshold, "centered": args.center,
                         "num_images": args.num_images, "results": results})
    plot_similarity(results, os.path.join(out, "similarity.png"))
    for name, (one, maps, blocks, mean, std) in figures.items():
        safe = "".join(c if c.isalnum() or c in "-_@." else "_" for c in name)
        plot_attention(one, maps, blocks, os.path.join(out, f"attention-{safe}.png"),
                       mean=mean, std=std, title=f"{name}: class-token attention")
    print(f"{'checkpoint':<28}{'similar':>8}  {'mean M(p,p+1)':>13}  to next (per block)")
    for name, r in results.items():
        row = " ".join(f"{v:.2f}" for v in r["to_next"])
        print(f"{name:<28}{r['similar_blocks']:>8}  {np.mean(r['to_next']):>13.3f}  {row}")
    print(f"wrote {out}/similarity.json, similarity.png, attention-*.png")


if __name__ == "__main__":
    sys.exit(main())
