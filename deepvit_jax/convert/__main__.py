"""Convert PyTorch DeepViT / ViT weights to a deepvit-jax model directory, and back.

Examples:
  # official DeepViT-S release -> JAX model directory
  python -m deepvit_jax.convert DViT_82_16b.pth.tar --model deepvit_s --out ckpt/deepvit_s
  # the EMA weights of a timm training checkpoint
  python -m deepvit_jax.convert last.pth.tar --model deepvit_16b --ema --out ckpt/dvit16_ema
  # DeepViT-L weights fine-tuned at 384 px (pos_embed resampled 14x14 -> 24x24)
  python -m deepvit_jax.convert DViT_83_32b.pth.tar --model deepvit_l_384 --out ckpt/l384
  # a vit-pytorch DeepViT (sizes read from the file; pooling cannot be)
  python -m deepvit_jax.convert deepvit.pt --source vit-pytorch --pool mean --out ckpt/vp
  # a timm DeiT-S into a DeepViT with identity Re-attention on blocks 6-11
  python -m deepvit_jax.convert deit_small.pth --source timm --num-heads 6 \\
      --reattn-blocks 6-11 --out ckpt/deit_s_reattn
  # a JAX model directory -> PyTorch (official key layout), .pth or .safetensors
  python -m deepvit_jax.convert ckpt/deepvit_s --to-pytorch deepvit_s.safetensors

What is written is checked: integer / boolean tensors where weights belong and NaN / inf
weights are refused (--allow-nonfinite keeps the latter), and a table of dtypes and value
ranges per group of tensors is printed. Each output is claimed first (a second command
writing the same --out / --to-pytorch exits 3 at once) and written under a temporary name
(NAME.deepvit-partial-<token>) renamed at the end. Exit status: 0 done, 2 bad input,
3 output in use, 4 disk full / I/O error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from deepvit_jax import cli
from deepvit_jax.convert.checks import check_finite, weight_summary
from deepvit_jax.convert.pytorch import from_pytorch, to_pytorch
from deepvit_jax.convert.torch_files import save_pytorch
from deepvit_jax.errors import InputError
from deepvit_jax.model_dir import check_replaceable, load_model, model_arrays, save_model
from deepvit_jax.models.registry import VARIANTS
from deepvit_jax.utils import claim_output


def _blocks(spec: str) -> tuple[int, ...]:
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return ()
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        else:
            out.append(int(part))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deepvit_jax.convert",
        description="Convert PyTorch DeepViT/ViT weights (official dvit_repo / timm training "
                    "files, vit-pytorch, timm ViT/DeiT) into a deepvit-jax model directory "
                    "(Orbax weights + config.json, read by deepvit_jax.model_dir.load_model "
                    "and predict), or a deepvit-jax model directory back into a PyTorch "
                    "state dict.",
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="PyTorch checkpoint (.pth, .pth.tar, .pt, .safetensors) or a "
                               "deepvit-jax model directory (with --to-pytorch)")
    p.add_argument("--out", help="write the converted model to this directory")
    p.add_argument("--to-pytorch", metavar="FILE",
                   help="also/instead write a PyTorch state dict (.pth, or .safetensors by "
                        "extension) in the official key layout (see --layout)")
    p.add_argument("--model", help=f"target variant: {', '.join(VARIANTS)} (or an official "
                                   "entrypoint name). Default: recognised from the file")
    p.add_argument("--source", default="auto",
                   choices=("auto", "official", "vit-pytorch", "timm"),
                   help="key layout of SRC (default: detected)")
    p.add_argument("--ema", action="store_true",
                   help="use the EMA weights (state_dict_ema) of a timm training checkpoint")
    p.add_argument("--image-size", type=int,
                   help="target image size; the position embedding is resampled (bicubic, "
                        "class token kept) when its token grid differs")
    p.add_argument("--num-classes", type=int, help="override the number of classes")
    p.add_argument("--num-heads", type=int, help="timm: heads per block (not in the file)")
    p.add_argument("--reattn-blocks", type=_blocks, metavar="SPEC",
                   help="timm: 0-based blocks that get identity Re-attention, e.g. 6-11 or "
                        "0,2,4 (default none: a plain ViT)")
    p.add_argument("--pool", choices=("cls", "mean"),
                   help="vit-pytorch: the model's pooling (not in the file; default cls)")
    p.add_argument("--layout", choices=("official", "vit-pytorch"),
                   help="key layout for --to-pytorch (default: official, or vit-pytorch for "
                        "a model converted from vit-pytorch)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN / inf (refused by default)")
    p.add_argument("--verbose", action="store_true",
                   help="also show INFO logs and TensorFlow / XLA notices")
    return p


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _check_outputs(args) -> None:
    """Refuse, before any work, outputs that exist (without --overwrite) or that are not
    replaceable: only a model directory may be replaced by --out, only a file by
    --to-pytorch, and never the source."""
    src = os.path.realpath(args.src)
    for target in (args.out, args.to_pytorch):
        if target and os.path.realpath(target) in (src, os.path.dirname(src)):
            raise InputError(f"{target} is the source {args.src} (or its folder): write the "
                             "output somewhere else")
    if args.out:
        check_replaceable(args.out, overwrite=args.overwrite)
    if args.to_pytorch and os.path.lexists(args.to_pytorch):
        if not args.overwrite:
            raise FileExistsError(f"{args.to_pytorch} already exists (use --overwrite to "
                                  "replace it)")
        if os.path.isdir(args.to_pytorch):
            raise InputError(f"--to-pytorch {args.to_pytorch} is a directory: give a file "
                             "name (.pth or .safetensors)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_console(args.verbose)
    if not args.out and not args.to_pytorch:
        return _err("nothing to write: give --out DIR and/or --to-pytorch FILE")

    def body():
        with contextlib.ExitStack() as claims:  # a concurrent writer of an output: exit 3
            for target in (args.out, args.to_pytorch):
                if target:
                    claims.enter_context(claim_output(target))
            _check_outputs(args)  # under the claims: nobody else writes them meanwhile
            _convert(args)

    return cli.run_cli(body, input_errors=(ValueError,))


def _convert(args) -> None:
    is_jax_dir = os.path.isdir(args.src)
    t0 = time.time()

    def step(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if is_jax_dir:
        if args.out:
            raise InputError(f"{args.src} is a deepvit-jax model directory: convert it with "
                             "--to-pytorch FILE (--out is for PyTorch sources)")
        step(f"loading {args.src}")
        model = load_model(args.src)
    else:
        overrides = {k: v for k, v in (("num_classes", args.num_classes),
                                       ("num_heads", args.num_heads),
                                       ("reattn_blocks", args.reattn_blocks),
                                       ("pool", args.pool)) if v is not None}
        step(f"reading {args.src} ({os.path.getsize(args.src) / 2**20:.1f} MiB)"
             if os.path.isfile(args.src) else f"reading {args.src}")
        model = from_pytorch(args.src, model=args.model, source=args.source,
                             ema=args.ema, image_size=args.image_size,
                             allow_nonfinite=args.allow_nonfinite, **overrides)
        cfg = model.config
        step(f"converted to {cfg.name}: depth {cfg.depth}, dim {cfg.embed_dim}, "
             f"{cfg.num_heads} heads, image {cfg.image_size}, {cfg.num_classes} classes, "
             f"re-attention blocks {list(cfg.reattn_indices)}")
    arrays = model_arrays(model)
    check_finite(arrays, f"the weights of {args.src}", allow_nonfinite=args.allow_nonfinite)
    step("the weights to write, per group:\n  " + "\n  ".join(weight_summary(arrays)))
    state_dict = to_pytorch(model, layout=args.layout) if args.to_pytorch else None
    if args.out:
        step(f"writing {args.out}")
        save_model(model, args.out, overwrite=args.overwrite)
    if state_dict is not None:
        step(f"writing {args.to_pytorch} ({len(state_dict)} tensors)")
        save_pytorch(state_dict, args.to_pytorch)
    step("done")


if __name__ == "__main__":
    sys.exit(main())
