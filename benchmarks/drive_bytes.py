"""Bytes written to the Google Drive workdir per epoch: Orbax straight into the Drive
workdir ("before") against training on local disk with ``drive_mirror.DriveMirror`` ("after",
what ``colab/train_tpu.ipynb`` does), both measured on one run of the Colab CPU recipe, and the
checkpoint size of every Colab recipe (from its training state's shapes) for the rest.

    python benchmarks/drive_bytes.py [--epochs 6] [--out benchmarks/results/drive_bytes.json]

Measured: ``configs/colab.py:cpu_small,digits`` (a checkpoint every epoch, as every Colab
recipe) for ``--epochs`` epochs, twice from scratch, with a folder standing in for Drive:

* before: the workdir is the Drive folder. Orbax writes each checkpoint there in full once
  (in a temporary directory renamed into place), so the bytes written are the sum of the
  checkpoint directories saved (``checkpoint.keep`` is raised so that none is deleted before
  it is counted: keeping more changes what stays on Drive, not what is written) plus the run
  files (metrics, TensorBoard, log) at the end;
* after: the mirror's own count of the bytes it copied to Drive (``DriveMirror.bytes_written``)
  with the notebook's default interval (a checkpoint at most every 10 minutes, and at the end).

Per epoch = total / epochs. A checkpoint holds the parameters, the AdamW moments, the EMA copy
and the BatchNorm statistics; the recipe table gives those bytes per recipe, so "before"
costs one such checkpoint per epoch on any runtime, "after" at most one per 10 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "benchmarks", "results", "drive_bytes.json")
RECIPES = ["tpu_v5e1,imagenette", "tpu_v2_8,imagenette", "gpu,imagenette",
           "cpu_small,imagenette", "cpu_small,digits"]


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _run_files_bytes(workdir: str) -> int:
    """Bytes of everything in a workdir outside ``checkpoints/`` (metrics, TensorBoard, log)."""
    return sum(_tree_bytes(os.path.join(workdir, e)) if os.path.isdir(os.path.join(workdir, e))
               else os.path.getsize(os.path.join(workdir, e))
               for e in os.listdir(workdir) if e not in ("checkpoints", "lock"))


def measured(epochs: int, data_dir: str | None) -> dict:
    from deepvit_jax.colab import load_config
    from deepvit_jax.drive_mirror import DriveMirror
    from deepvit_jax.train.loop import train_and_evaluate

    overrides = {"num_epochs": epochs, "checkpoint.keep": epochs + 1}
    if data_dir:
        overrides["data.data_dir"] = data_dir
    config = load_config("colab.py:cpu_small,digits", overrides)
    tmp = tempfile.mkdtemp(prefix="drive_bytes_")
    direct = os.path.join(tmp, "drive", "direct")
    t = time.perf_counter()
    train_and_evaluate(config, direct)
    direct_s = time.perf_counter() - t
    ckpt_root = os.path.join(direct, "checkpoints")
    saved = sorted(int(p) for p in os.listdir(ckpt_root) if p.isdigit())
    ckpt_bytes = sum(_tree_bytes(os.path.join(ckpt_root, str(s))) for s in saved)
    before = ckpt_bytes + _run_files_bytes(direct)

    mirror = DriveMirror(os.path.join(tmp, "drive", "mirrored"), os.path.join(tmp, "local"))
    t = time.perf_counter()
    with mirror as local:
        train_and_evaluate(config, local)
    mirrored_s = time.perf_counter() - t
    return {
        "recipe": "colab.py:cpu_small,digits", "epochs": epochs,
        "checkpoints_saved": len(saved),
        "checkpoint_bytes": ckpt_bytes // max(len(saved), 1),
        "before_bytes": before, "before_bytes_per_epoch": before // epochs,
        "after_bytes": mirror.bytes_written,
        "after_checkpoint_bytes": mirror.checkpoint_bytes_written,
        "after_bytes_per_epoch": mirror.bytes_written // epochs,
        "after_min_interval_s": mirror.min_interval_s,
        "ratio_before_over_after": round(before / max(mirror.bytes_written, 1), 2),
        "train_s": {"direct": round(direct_s, 1), "mirrored": round(mirrored_s, 1)},
    }


def recipe_state_bytes(recipe: str) -> dict:
    """A recipe's checkpointed arrays (params, optimizer state, EMA, BatchNorm) in bytes, from
    the training program's abstract state (``aot.programs.build``, nothing allocated)."""
    import jax

    from deepvit_jax.aot.programs import KNOWN_DATASETS, build
    from deepvit_jax.colab import load_config

    config = load_config(f"colab.py:{recipe}", {})
    name = str(config.data.dataset).split("/")[0]
    classes, n_train, _ = KNOWN_DATASETS.get(name, (10, 1437, 360))
    s = build(config, jax.devices()[:1], num_classes=classes, num_train=n_train)
    leaves = jax.tree.leaves((s.prog.abstract_state, s.prog.abstract_rest))
    n = sum(x.size * x.dtype.itemsize for x in leaves)
    steps = max(n_train // config.batch_size, 1)
    return {"state_bytes": int(n), "steps_per_epoch": steps,
            "checkpoint_every_steps": int(config.checkpoint.every_steps),
            "params": int(sum(x.size for x in jax.tree.leaves(s.prog.abstract_state.params)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--data-dir", default=None, help="TFDS data dir of the digits")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    import jax

    run = measured(args.epochs, args.data_dir)
    print(json.dumps(run, indent=1), flush=True)
    recipes = {r: recipe_state_bytes(r) for r in RECIPES}
    for r, row in recipes.items():
        print(f"{r:24s} checkpoint {row['state_bytes'] / 1e6:8.1f} MB, every "
              f"{row['checkpoint_every_steps']} steps (1 epoch)")
    record = {
        "benchmark": "drive_bytes",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "jax": jax.__version__},
        "measured": run,
        "recipes": recipes,
        "note": "before = Orbax writes straight into the Drive workdir (one checkpoint per "
                "epoch); after = local workdir + DriveMirror (one checkpoint per "
                "min_interval_s at most, and at the end). recipes: bytes of the arrays a "
                "checkpoint holds (Orbax adds a few KB of metadata).",
    }
    with open(args.out + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
