"""``python -m deepvit_jax.data prepare NAME ...``: prepare a dataset into a TFDS data_dir.

    prepare digits        [--data-dir DIR]                    embedded scikit-learn digits
    prepare imagenet2012  --manual-dir DIR [--data-dir DIR]   from the two ImageNet tars
    prepare folder        --folder ROOT [--data-dir DIR]      ROOT/<split>/<class>/<images>
        [--val-fraction F]   a train-only folder: hold out F of each class as 'validation'
        [--max-pixels N]     skip images above N pixels (default PIL's bomb limit)
    prepare <tfds name>   [--data-dir DIR] [--manual-dir DIR] any TFDS dataset
    prepare ... --array-record   also write ArrayRecord files beside the TFRecord ones (for
                          data.reader='array_record'; in place, resumable; needs the grain
                          extra). On a prepared dataset it only adds them.
    info    NAME          [--data-dir DIR] [--folder ROOT]    classes and split sizes

TFDS shows progress bars (rate / ETA) while it generates and shuffles the splits.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile

from deepvit_jax import cli
from deepvit_jax.cli import run_cli
from deepvit_jax.data.array_record_files import add_array_record, require_grain
from deepvit_jax.data.config import default_data_config
from deepvit_jax.data.dataset import _tf, dataset_info, default_data_dir
from deepvit_jax.errors import PrepareError

IMAGENET_FILES = {
    "ILSVRC2012_img_train.tar": "train split: 1000 per-class tars (n01440764.tar, ...) of "
                                "JPEGs, ~138 GiB",
    "ILSVRC2012_img_val.tar": "validation split: 50,000 JPEGs ILSVRC2012_val_00000001.JPEG "
                              "... (labels ship with TFDS), ~6.3 GiB",
}
IMAGENET_OPTIONAL = {"ILSVRC2012_img_test.tar": "optional test split (no labels)"}


def _imagenet_help(manual_dir: str) -> str:
    lines = [f"ImageNet (ILSVRC2012) must be downloaded by hand from https://image-net.org "
             f"(account needed) and placed into --manual-dir {manual_dir}:"]
    for name, what in {**IMAGENET_FILES, **IMAGENET_OPTIONAL}.items():
        lines.append(f"  {os.path.join(manual_dir, name)}  <- {what}")
    return "\n".join(lines)


def check_imagenet_manual_dir(manual_dir: str | None) -> None:
    """Clear message naming each missing / unreadable file and where it belongs."""
    if not manual_dir:
        raise PrepareError("imagenet2012 needs --manual-dir DIR.\n" + _imagenet_help("DIR"))
    problems = []
    if not os.path.isdir(manual_dir):
        problems.append(f"--manual-dir {manual_dir} is not a folder")
    else:
        for name in IMAGENET_FILES:
            path = os.path.join(manual_dir, name)
            if not os.path.isfile(path):
                problems.append(f"missing {path}")
                continue
            try:
                with tarfile.open(path, "r:") as tar:
                    first = tar.next()
            except (tarfile.TarError, OSError) as e:
                problems.append(f"{path} is not a readable tar file ({e}); re-download it")
                continue
            if first is None:
                problems.append(f"{path} is empty")
            elif name == "ILSVRC2012_img_train.tar" and not first.name.endswith(".tar"):
                problems.append(f"{path} should contain per-class tars (n01440764.tar, ...), "
                                f"found {first.name!r}")
            elif name == "ILSVRC2012_img_val.tar" and not first.name.startswith("ILSVRC2012_val_"):
                problems.append(f"{path} should contain ILSVRC2012_val_XXXXXXXX.JPEG files, "
                                f"found {first.name!r}")
    if problems:
        raise PrepareError("cannot prepare imagenet2012:\n  " + "\n  ".join(problems) + "\n"
                           + _imagenet_help(manual_dir))


def _report_skipped(skipped: dict[str, int]) -> None:
    for split, n in skipped.items():
        if n:
            print(f"{split}: skipped {n} undecodable image(s) (see the warnings above)")


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
            folder: str | None = None, array_record: bool = False, val_fraction: float = 0.0,
            max_pixels: int | None = None) -> str:
    """Prepare ``name`` into ``data_dir`` (and add its ArrayRecord files with
    ``array_record``); returns the prepared dataset's directory."""
    if array_record:
        require_grain()     # before hours of preparation
    if (val_fraction or max_pixels is not None) and name != "folder":
        raise PrepareError("--val-fraction and --max-pixels are for 'prepare folder'")
    path = _prepare(name, data_dir=data_dir, manual_dir=manual_dir, folder=folder,
                    val_fraction=val_fraction, max_pixels=max_pixels)
    if array_record:
        counts = add_array_record(path)
        print("ArrayRecord files: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return path


def _prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
             folder: str | None = None, val_fraction: float = 0.0,
             max_pixels: int | None = None) -> str:
    import tensorflow_datasets as tfds  # heavy: only when preparing

    _tf()
    data_dir = default_data_dir(data_dir)
    if name == "digits":
        from deepvit_jax.data.builders.digits import Digits

        builder = Digits(data_dir=data_dir)
        builder.download_and_prepare()
        return str(builder.data_dir)
    if name == "folder":
        if not folder:
            raise PrepareError("prepare folder needs --folder ROOT (ROOT/<split>/<class>/<images>)")
        from deepvit_jax.data.builders.folder import prepare_folder

        path, skipped = prepare_folder(folder, data_dir, val_fraction=val_fraction,
                                       max_pixels=max_pixels)
        _report_skipped(skipped)
        return str(path)
    if name.split(":")[0].split("/")[0] == "imagenet2012":
        check_imagenet_manual_dir(manual_dir)
    if name in ("imagenet2012", "imagenet2012:5.1.0"):   # every image checked, bad ones skipped
        from deepvit_jax.data.builders.imagenet import ValidatedImagenet2012

        builder = ValidatedImagenet2012(data_dir=data_dir)
    else:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise PrepareError(f"unknown dataset {name!r}: use digits, folder, imagenet2012 or "
                               f"a TFDS name ({str(e).splitlines()[0]})") from None
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)
    _report_skipped(getattr(builder, "skipped", {}))
    return str(builder.data_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepvit_jax.data",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("prepare", "info"):
        p = sub.add_parser(cmd)
        p.add_argument("name", help="digits | imagenet2012 | folder | any TFDS name")
        p.add_argument("--data-dir", default=None,
                       help="TFDS data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
        p.add_argument("--manual-dir", default=None, help="manually downloaded files")
        p.add_argument("--folder", default=None, help="for 'folder': ROOT/<split>/<class>/*")
        p.add_argument("--verbose", action="store_true",
                       help="also show INFO logs and TensorFlow / XLA notices")
        if cmd == "prepare":
            p.add_argument("--array-record", action="store_true",
                           help="also write ArrayRecord files (data.reader='array_record')")
            p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                           help="for 'folder' with only a train split: hold out F (e.g. 0.1) "
                                "of each class as 'validation' (by a hash of each path)")
            p.add_argument("--max-pixels", type=cli.non_negative_int, default=None,
                           metavar="N",
                           help="for 'folder': skip images of more than N pixels (default "
                                "89478485, PIL's decompression-bomb limit; 0: no limit)")
    args = parser.parse_args(argv)
    cli.setup_console(args.verbose)

    def body():
        if args.command == "prepare":
            path = prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                           folder=args.folder, array_record=args.array_record,
                           val_fraction=args.val_fraction, max_pixels=args.max_pixels)
            print(f"prepared {args.name} in {path}")
        cfg = default_data_config()
        cfg.dataset, cfg.data_dir, cfg.folder_path = args.name, args.data_dir, args.folder
        info = dataset_info(cfg)
        print(f"{info.name}: {info.num_classes} classes, {info.train_split}={info.num_train}, "
              f"{info.eval_split}={info.num_eval} (data_dir {info.data_dir})")

    return run_cli(body, input_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
