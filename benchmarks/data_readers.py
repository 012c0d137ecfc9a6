"""The two training readers side by side: tf.data (TFRecord) vs data.reader='array_record'
(grain workers), images per second per host core, for the full host recipe and the
``device_augment`` host part, with 1, cores/2 and all cores as workers; memory per worker.

A TFDS folder dataset of ImageNet-like JPEGs (500x375, from benchmarks/data_throughput.py) is
prepared with ArrayRecord files; each row consumes ``--steps`` batches of the real
training iterator (``make_train_iterator``, sharding=None) after a warm-up (workers started,
graphs traced, shuffle buffer filled), all within one epoch, and divides the images by the
CPU time the reader used meanwhile: this process's (every thread: tf.data's pool, grain's
reader) plus that of its grain worker processes. Images per CPU-second is images per second
per host core for a reader that keeps its cores busy, and it does not depend on what else
runs on the machine, unlike wall time (also recorded). tf.data gets ``workers`` threads
(``private_threadpool_size``), grain ``workers`` processes. Rows are interleaved and
repeated (best kept).

    python benchmarks/data_readers.py [--images 640] [--steps 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's live child processes (grain workers)."""
    import multiprocessing

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for k in multiprocessing.active_children():
        try:
            with open(f"/proc/{k.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "data_readers.json"))
    args = p.parse_args(argv)
    import multiprocessing


    from data_throughput import make_jpegs
    from deepvit_jax.data.__main__ import prepare
    from deepvit_jax.data.config import default_data_config
    from deepvit_jax.data.dataset import ImageSpec, dataset_info
    from deepvit_jax.data.train_stream import make_train_iterator

    tmp = tempfile.mkdtemp(prefix="readers_")
    root = os.path.join(tmp, "images")
    for split, n in (("train", args.images), ("test", 8)):
        for i, data in enumerate(make_jpegs(n, (500, 375), seed=len(split))):
            d = os.path.join(root, split, f"c{i % 4}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{i}.jpg"), "wb") as f:
                f.write(data)
    data_dir = os.path.join(tmp, "tfds")
    prepare("folder", data_dir=data_dir, folder=root, array_record=True)
    cores = os.cpu_count() or 1
    worker_counts = sorted({1, max(1, cores // 2), cores})

    def cfg_for(reader, recipe, workers):
        c = default_data_config()
        c.dataset, c.folder_path, c.data_dir = "folder", root, data_dir
        c.reader, c.device_augment = reader, recipe == "device_augment_host_part"
        c.shuffle_buffer = 256
        if reader == "array_record":
            c.num_workers = workers
        else:
            c.private_threadpool_size, c.num_parallel_calls = workers, workers
        return c

    info = dataset_info(cfg_for("tfrecord", "full", 1))
    if (args.steps + 2) * args.batch > args.images:
        p.error(f"--images {args.images}: the warm-up and timed steps must fit in one epoch "
                f"(at least {(args.steps + 2) * args.batch})")
    rows, wall = {}, {}
    memory = {}
    for _ in range(args.repeats):
        for recipe in ("full_recipe", "device_augment_host_part"):
            for workers in worker_counts:
                for reader in ("tfrecord", "array_record"):
                    it = make_train_iterator(cfg_for(reader, recipe, workers),
                                             global_batch_size=args.batch, spec=ImageSpec(224),
                                             sharding=None, seed=0, dataset=info)
                    next(it)                     # warm-up: workers started, graphs traced
                    next(it)
                    t, cpu = time.perf_counter(), time.process_time() + _children_cpu_s()
                    for _ in range(args.steps):
                        next(it)
                    cpu = time.process_time() + _children_cpu_s() - cpu
                    n = args.steps * args.batch
                    rate = n / cpu
                    key = f"{recipe}/{reader}/workers={workers}"
                    rows[key] = max(rows.get(key, 0.0), rate)
                    wall[key] = max(wall.get(key, 0.0), n / (time.perf_counter() - t))
                    if reader == "array_record":
                        kids = multiprocessing.active_children()
                        if kids:
                            memory[f"workers={workers}"] = round(
                                sum(_rss_mib(k.pid) for k in kids) / len(kids), 1)
                    it.close()
                    print(key, round(rate, 1), "img per CPU-s", flush=True)
    ratios = {}
    for recipe in ("full_recipe", "device_augment_host_part"):
        for w in worker_counts:
            ratios[f"{recipe}/workers={w}"] = round(
                rows[f"{recipe}/array_record/workers={w}"]
                / rows[f"{recipe}/tfrecord/workers={w}"], 3)
    import tensorflow as tf

    record = {
        "benchmark": "data_readers",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "processor": platform.processor(),
                 "cpu_count": cores, "python": platform.python_version(),
                 "tensorflow": tf.__version__},
        "images": args.images, "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "output_size": 224,
        "img_per_cpu_s": {k: round(v, 1) for k, v in rows.items()},
        "img_per_s_wall": {k: round(v, 1) for k, v in wall.items()},
        "array_record_vs_tfrecord": ratios,
        "worker_rss_mib": memory,
        "note": "img_per_cpu_s: images consumed per CPU-second used meanwhile by this "
                "process (all threads) and its grain worker processes, within one epoch after "
                "a 2-batch warm-up; = images/s per host core when the reader's cores are "
                "busy. img_per_s_wall depends on the machine's load. Worker RSS: mean "
                "resident memory of one grain worker process (TensorFlow + JAX imported).",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(ratios, indent=1), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
