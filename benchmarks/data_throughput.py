"""Input-pipeline throughput per CPU core: decode + augment vs a plain PIL decode + resize loop.

Writes benchmarks/results/data_throughput.json.  Everything runs single-threaded (tf.data with a
one-thread private pool, TF intra/inter-op threads = 1; PIL in one Python thread), so the
numbers are images/s **per core**; a TPU host with ~100 cores scales roughly linearly.

    python benchmarks/data_throughput.py [--num-images 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def make_jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs (quality 90) cut from scikit-image's natural photographs."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
               skimage.data.rocket(), skimage.data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    out = []
    w, h = size
    for i in range(n):
        src = Image.fromarray(sources[i % len(sources)])
        sw, sh = src.size
        cw, ch = int(sw * rng.uniform(0.6, 1.0)), int(sh * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, sw - cw + 1), rng.integers(0, sh - ch + 1)
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_pil(jpegs: list[bytes], size: int, repeats: int) -> float:
    from PIL import Image

    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for data in jpegs:
            img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
            np.asarray(img)
        best = max(best, len(jpegs) / (time.perf_counter() - t))
    return best


def bench_tf(jpegs: list[bytes], fn, repeats: int, threads: int | None) -> float:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(jpegs).enumerate()
    ds = ds.map(lambda i, e: fn(e, tf.stack([tf.constant(7, tf.int64), i])),
                num_parallel_calls=1 if threads == 1 else tf.data.AUTOTUNE)
    opts = tf.data.Options()
    if threads:
        opts.threading.private_threadpool_size = threads
        opts.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(opts)
    for _ in ds.take(8):      # warm up (graph tracing)
        pass
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = 0
        for _ in ds:
            n += 1
        best = max(best, n / (time.perf_counter() - t))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "data_throughput.json"))
    args = p.parse_args(argv)

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.set_visible_devices([], "GPU")
    from deepvit_jax.data import augment, preprocess
    from deepvit_jax.data.config import default_data_config

    size = args.image_size
    cfg = default_data_config()
    mean = std = (0.5, 0.5, 0.5)
    train_fn = augment.make_train_augment(cfg, image_size=size, mean=mean, std=std)
    light = default_data_config()
    light.randaugment, light.random_erasing = "", 0.0
    light_fn = augment.make_train_augment(light, image_size=size, mean=mean, std=std)

    def eval_fn(e, seed):
        del seed
        return preprocess.eval_preprocess(preprocess.decode_image(e), image_size=size,
                                          crop_pct=0.9, mean=mean, std=std)

    results = {}
    for label, src in (("imagenet_like_500x375", (500, 375)), ("224x224", (224, 224))):
        jpegs = make_jpegs(args.num_images, src)
        r = {
            "source_jpeg": f"{src[0]}x{src[1]}, quality 90, "
                           f"{np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB mean",
            "pil_decode_resize_img_per_s_per_core": bench_pil(jpegs, size, args.repeats),
            "train_full_recipe_img_per_s_per_core": bench_tf(jpegs, train_fn, args.repeats, 1),
            "train_crop_flip_only_img_per_s_per_core": bench_tf(jpegs, light_fn, args.repeats, 1),
            "eval_img_per_s_per_core": bench_tf(jpegs, eval_fn, args.repeats, 1),
        }
        r["train_full_recipe_vs_pil"] = (r["train_full_recipe_img_per_s_per_core"]
                                         / r["pil_decode_resize_img_per_s_per_core"])
        results[label] = r
        print(label, json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                 for k, v in r.items()}, indent=1))
    record = {
        "benchmark": "data_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "output_size": size,
        "num_images": args.num_images,
        "repeats": args.repeats,
        "recipe": {"randaugment": cfg.randaugment, "random_erasing": cfg.random_erasing,
                   "rrc_scale": list(cfg.rrc_scale), "hflip": cfg.hflip},
        "threads": 1,
        "host": {"machine": platform.machine(), "processor": platform.processor(),
                 "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "tensorflow": tf.__version__},
        "results": results,
        "note": "best of `repeats` single-threaded passes; PIL loop = decode + RGB + bilinear "
                "resize to size x size (the floor); train = our tf.data decode (+crop-only "
                "JPEG decode) + RRC + flip + RandAugment + normalise + random erasing",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
