"""Op-by-op cost of the input pipeline, per CPU core, on ImageNet-like 500x375 JPEGs.

Each op runs as a ``tf.data`` map over in-memory inputs with one thread (TF intra/inter-op
threads = 1, a one-thread private pool), ``REPEAT`` passes in one stream (building an
iterator costs tens of ms, paid once per epoch in training), consumed by ``Dataset.reduce``
(no Python per element).  Times are process CPU time (``time.process_time``), not wall time:
on a machine shared with other jobs the wall time counts their work too.  The numbers are
microseconds per image **per core**; the "identity map" row is the per-example tf.data
overhead included in every other row.  A PIL decode + resize loop (the floor of
``data_throughput.py``) runs in the same process, for scale.

    python benchmarks/data_profile.py [--num-images 200] [--repeats 3]

Writes benchmarks/results/data_profile.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def _sibling(name: str):
    """A module of this folder (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REPEAT = 8      # passes over the inputs per stream: amortises the iterator set-up


def time_map(elements, fn, repeats: int) -> float:
    """Best-of-``repeats`` microseconds per element of ``ds.map(fn)`` on one thread."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(elements).repeat(REPEAT).map(fn, num_parallel_calls=1)
    ds = ds.map(lambda *x: 0)
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = 1
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.enabled = False
    ds = ds.with_options(opts)
    n = int(ds.reduce(0, lambda s, _: s + 1))        # warm-up (tracing)
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        ds.reduce(0, lambda s, _: s + 1)
        best = min(best, (time.process_time() - t) / n)
    return best * 1e6


def step_cost(model_name: str, batch: int, steps: int, out: str):
    """Train-step time of ``model_name`` on this machine's JAX device with and without
    on-device augmentation (RandAugment + normalise + erasing before the model), and of the
    augmentation alone, side by side in one process; writes ``out``."""
    import functools
    import statistics

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import deepvit_jax as dj
    from deepvit_jax.data.config import default_data_config
    from deepvit_jax.data.device_augment import make_device_augment

    cfg = default_data_config()
    cfg.device_augment = True
    mc = dj.get_config(model_name)
    size = mc.image_size
    augment = make_device_augment(cfg, image_size=size, mean=mc.mean, std=mc.std)
    model = dj.create_model(model_name)
    opt = nnx.Optimizer(model, optax.adamw(5e-4, weight_decay=0.05), wrt=nnx.Param)
    model.train()
    graph, state0 = nnx.split((model, opt))
    u8 = jax.random.randint(jax.random.key(0), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
    f32 = (u8.astype(jnp.float32) / 255.0 - 0.5) / 0.5
    y = jax.random.randint(jax.random.key(1), (batch,), 0, mc.num_classes)

    def make_step(with_augment: bool):
        @functools.partial(jax.jit, donate_argnums=0)
        def step(state, key, x, y):
            model, opt = nnx.merge(graph, state)
            if with_augment:
                x = augment(key, x)

            def loss_fn(m):
                return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return nnx.state((model, opt)), loss
        return step

    aug_jit = jax.jit(augment)
    results = {}
    for name, step, x in (("train_step_host_augmented_f32", make_step(False), f32),
                          ("train_step_with_device_augment_u8", make_step(True), u8)):
        state = jax.tree.map(jnp.copy, state0)
        t = time.perf_counter()
        state, loss = step(state, jax.random.key(2), x, y)
        jax.block_until_ready(loss)
        results[f"{name}_first_call_s"] = round(time.perf_counter() - t, 2)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            state, loss = step(state, jax.random.key(3 + i), x, y)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t)
        results[f"{name}_median_s"] = round(statistics.median(times), 4)
        del state
    t = time.perf_counter()
    jax.block_until_ready(aug_jit(jax.random.key(0), u8))
    results["device_augment_alone_compile_s"] = round(time.perf_counter() - t, 2)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(aug_jit(jax.random.key(i), u8))
        times.append(time.perf_counter() - t)
    results["device_augment_alone_median_s"] = round(statistics.median(times), 4)
    base = results["train_step_host_augmented_f32_median_s"]
    results["step_time_ratio_with_device_augment"] = round(
        results["train_step_with_device_augment_u8_median_s"] / base, 3)
    record = {"benchmark": "data_device_augment_step", "model": model_name, "batch": batch,
              "image_size": size, "steps": steps, "device": str(jax.devices()[0]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "note": "wall-clock medians on a shared, loaded 2-core CPU machine: compare the "
                      "rows of this run, not absolute times",
              "results": results}
    print(json.dumps(record, indent=1))
    _write(out, record)


def grain_vs_tfdata(num_images: int, size: int, repeats: int, out: str):
    """Per-core CPU time per image of the same work through grain (in-process MapDataset, as
    ``grain.MapDataset.source(...).map(...)``) and through tf.data, plus grain's own
    per-element cost on the PIL floor work.  Needs ``pip install grain`` (not a dependency of
    the package)."""
    try:
        import grain.python as grain
    except ImportError:
        raise SystemExit("--grain needs the grain package: pip install grain") from None
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from deepvit_jax.data import augment as A
    from deepvit_jax.data.config import default_data_config

    throughput = _sibling("data_throughput")
    jpegs = throughput.make_jpegs(num_images, (500, 375))
    stream = 4
    n = len(jpegs)
    results = {}

    def pil_work(data):
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
            (size, size), Image.BILINEAR))

    for label, dev in (("full_recipe", False), ("host_part_device_augment", True)):
        cfg = default_data_config()
        cfg.device_augment = dev
        fn = A.make_train_augment(cfg, image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
        graph_fn = tf.function(fn, autograph=False, input_signature=[
            tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)])

        def grain_map(i_data, graph_fn=graph_fn):
            i, data = i_data
            return graph_fn(tf.constant(data), tf.constant([7, i], tf.int64)).numpy()

        gds = grain.MapDataset.source(list(enumerate(jpegs)) * stream).map(grain_map)
        tf_ds = throughput.tf_stream(jpegs, fn, stream)
        best_g = best_t = 0.0
        for _ in range(repeats):
            t = time.process_time()
            for _ in gds:
                pass
            best_g = max(best_g, n * stream / (time.process_time() - t))
            best_t = max(best_t, throughput.bench_tf(tf_ds, n * stream))
        results[f"{label}_grain_img_per_cpu_s"] = round(best_g, 1)
        results[f"{label}_tfdata_img_per_cpu_s"] = round(best_t, 1)
    gpil = grain.MapDataset.source(jpegs).map(pil_work)
    best_g = best_p = 0.0
    for _ in range(repeats):
        t = time.process_time()
        for _ in gpil:
            pass
        best_g = max(best_g, n / (time.process_time() - t))
        t = time.process_time()
        for data in jpegs:
            pil_work(data)
        best_p = max(best_p, n / (time.process_time() - t))
    results["pil_floor_grain_img_per_cpu_s"] = round(best_g, 1)
    results["pil_floor_plain_loop_img_per_cpu_s"] = round(best_p, 1)
    record = {"benchmark": "data_grain_vs_tfdata", "num_images": n, "repeats": repeats,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "grain": getattr(grain, "__version__", "?"),
              "note": "one thread (TF intra/inter-op 1), CPU time, 500x375 JPEGs, 4 passes per "
                      "stream; the tf.data rows are one stream consumed in C++; the grain "
                      "rows call the same TF graph once per example from Python (grain "
                      "transforms are Python callables); a loaded 2-core "
                      "machine: compare rows of one run",
              "results": results}
    print(json.dumps(record, indent=1))
    _write(out, record)


def _write(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "data_profile.json"))
    p.add_argument("--step-cost", metavar="MODEL", default=None,
                   help="instead: the train step of MODEL (e.g. deepvit_16b) with and without "
                        "on-device augmentation -> results/data_device_augment_step.json")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--grain", action="store_true",
                   help="instead: grain vs tf.data on the same work -> results/data_grain.json")
    args = p.parse_args(argv)
    if args.grain:
        return grain_vs_tfdata(args.num_images, args.image_size, args.repeats, os.path.join(
            os.path.dirname(args.out), "data_grain.json"))
    if args.step_cost:
        return step_cost(args.step_cost, args.batch, args.steps, os.path.join(
            os.path.dirname(args.out), "data_device_augment_step.json"))

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.set_visible_devices([], "GPU")
    from deepvit_jax.data import augment as A
    from deepvit_jax.data import preprocess as P
    from deepvit_jax.data.config import default_data_config

    throughput = _sibling("data_throughput")
    bench_pil, make_jpegs = throughput.bench_pil, throughput.make_jpegs
    size = args.image_size
    rep = args.repeats
    jpegs = make_jpegs(args.num_images, (500, 375))
    enc = tf.constant(jpegs)
    seeds = tf.stack([tf.fill([len(jpegs)], tf.constant(7, tf.int64)),
                      tf.range(len(jpegs), dtype=tf.int64)], axis=1)
    # RRC windows as the recipe draws them (for the crop-decode rows)
    windows = tf.stack([tf.stack(A.rrc_window(seeds[i], 375, 500)) for i in range(len(jpegs))])
    full = tf.stack([tf.io.decode_jpeg(j) for j in jpegs])                   # (N, 375, 500, 3)
    crops = [tf.image.crop_to_bounding_box(full[i], *[int(v) for v in windows[i]])
             for i in range(len(jpegs))]

    def crop(x, w):
        return tf.image.crop_to_bounding_box(x, w[0], w[1], w[2], w[3])
    small = tf.stack([P.resize_uint8(c, (size, size), "bilinear") for c in crops])  # (N,S,S,3)
    norm = P.normalize(small, (0.5,) * 3, (0.5,) * 3)
    ra = A.parse_randaugment(default_data_config().randaugment)
    fill = tf.constant([128.0] * 3)

    rows: dict[str, float] = {}

    def row(name, elements, fn):
        rows[name] = round(time_map(elements, fn, rep), 1)
        print(f"{name:58s} {rows[name]:9.1f} us/img", flush=True)

    pil = bench_pil(jpegs, size, rep)            # images per CPU-second
    rows["PIL floor: decode + RGB + bilinear resize (the floor)"] = round(1e6 / pil, 1)
    print(f"PIL floor {1e6 / pil:.1f} us/img")
    row("tf.data per-example overhead (identity map, uint8 SxS)", small, lambda x: x)
    row("extract_jpeg_shape", enc, lambda e: tf.io.extract_jpeg_shape(e))
    for dct in ("INTEGER_FAST", "INTEGER_ACCURATE"):
        row(f"decode_jpeg full 500x375, dct_method={dct}", enc,
            lambda e, d=dct: tf.io.decode_jpeg(e, channels=3, dct_method=d))
    row("decode_image (generic) full 500x375", enc,
        lambda e: tf.io.decode_image(e, channels=3, expand_animations=False))
    row("decode_jpeg full, ratio=2 (DCT scaling 1/2)", enc,
        lambda e: tf.io.decode_jpeg(e, channels=3, ratio=2))
    for dct in ("INTEGER_FAST", "INTEGER_ACCURATE"):
        row(f"decode_and_crop_jpeg RRC window, dct_method={dct}", (enc, windows),
            lambda e, w, d=dct: tf.image.decode_and_crop_jpeg(e, w, channels=3, dct_method=d))
    row("RRC window sampling (rrc_window, header shape)", (enc, seeds),
        lambda e, s: tf.stack(A.rrc_window(s, *tf.unstack(tf.io.extract_jpeg_shape(e)[:2]))))
    for interp in ("bilinear", "bicubic"):
        row(f"crop + resize RRC crop -> {size} {interp} antialias (current)", (full, windows),
            lambda x, w, i=interp: P.resize_uint8(crop(x, w), (size, size), i))
        row(f"crop + resize RRC crop -> {size} {interp} no antialias", (full, windows),
            lambda x, w, i=interp: tf.cast(tf.image.resize(crop(x, w), (size, size), i),
                                           tf.uint8))
    row("crop only (slice of the decoded image)", (full, windows), crop)
    row(f"eval resize 500x375 -> shorter {int(size / 0.9)} bicubic antialias", full,
        lambda x: P.resize_shorter_side(x, int(size / 0.9), "bicubic"))
    row("flip (tf.where on coin: both computed)", (small, seeds),
        lambda x, s: tf.where(A._uniform(s) < 0.5, tf.image.flip_left_right(x), x))
    row("flip (tf.cond on coin, as augment.py)", (small, seeds),
        lambda x, s: tf.cond(A._uniform(s) < 0.5, lambda: tf.image.flip_left_right(x),
                             lambda: x))
    row("eval: decode + resize to shorter 248 + centre crop 224 + normalise", enc,
        lambda e: P.eval_preprocess(tf.io.decode_jpeg(e, channels=3), image_size=size,
                                    crop_pct=0.9, mean=(0.5,) * 3, std=(0.5,) * 3))
    for name in ra["transforms"]:
        row(f"RandAugment op {name} (m=9)", small,
            lambda x, n=name: A.apply_op(n, x, A.level_to_arg(n, 9.0, False), fill))
    row("RandAugment full (2 layers, p=0.5, switch_case)", (small, seeds),
        lambda x, s: A.randaugment(x, s, ra, (128, 128, 128)))
    row("normalise uint8 -> float32", small, lambda x: P.normalize(x, (0.5,) * 3, (0.5,) * 3))
    row("random erasing, always applied (p=1)", (norm, seeds),
        lambda x, s: A.random_erasing(x, s, probability=1.0))
    row("random erasing, recipe (p=0.25)", (norm, seeds),
        lambda x, s: A.random_erasing(x, s, probability=0.25))
    cfg = default_data_config()
    fn = A.make_train_augment(cfg, image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
    row("full training recipe (make_train_augment)", (enc, seeds), fn)
    if "device_augment" in cfg:
        cfg.device_augment = True
        fn = A.make_train_augment(cfg, image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
        row("host part with device_augment=True", (enc, seeds), fn)

    record = {
        "benchmark": "data_profile",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": "500x375 JPEG quality 90 cut from scikit-image photographs",
        "output_size": size, "num_images": args.num_images, "repeats": rep,
        "unit": "CPU microseconds per image, one thread (best of repeats)",
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                 "tensorflow": tf.__version__,
                 "note": "2-core machine shared with other jobs: absolute numbers are noisy, "
                         "compare rows of one run"},
        "rows_us_per_image": rows,
    }
    _write(args.out, record)


if __name__ == "__main__":
    main()
