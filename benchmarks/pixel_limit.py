"""Peak memory of ``python -m deepvit_jax.predict`` against the pixel count of the image it is
given, with the pixel limit (``--max-pixels``, default PIL's decompression-bomb limit of
89,478,485 pixels): accepted images up to the limit are decoded and resized (memory grows
with the pixels, bounded by the limit's), a larger one is refused from its header at the
memory of a tiny image.

Each row is one fresh process (``predict.main`` on a tiny random model directory) that
reports its own peak RSS (``ru_maxrss``); the images are grey PNGs of zeros written row by
row (a 20000 x 20000 one is ~400 KB). The first row (32 x 32) is the floor: Python, JAX,
TensorFlow and the model.

    python benchmarks/pixel_limit.py [--sizes 32,1000,4000,8000,9459,20000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CHILD = """
import resource, sys
from deepvit_jax import predict
rc = predict.main(["--checkpoint", sys.argv[1], sys.argv[2]])
print("RESULT", rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def zero_png(path: str, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    z = zlib.compressobj(9)
    row = bytes(width + 1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                   8, 0, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def tiny_model(path: str) -> str:
    import numpy as np

    from deepvit_jax import model_dir as md
    from deepvit_jax.models.registry import get_config

    cfg = get_config("deepvit_16b", image_size=32, depth=2)
    rng = np.random.RandomState(0)
    arrays = {p: (rng.uniform(0.5, 1.5, s) if p[-1] == "var" else rng.normal(0, 0.2, s))
              .astype(np.float32) for p, (s, _) in md.weight_shapes(cfg).items()}
    return md.save_model(md.model_from_arrays(cfg, arrays), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,1000,4000,8000,9459,20000",
                   help="square image sides (pixels = side^2)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "pixel_limit.json"))
    args = p.parse_args(argv)
    from deepvit_jax.data.preprocess import DEFAULT_MAX_PIXELS

    tmp = tempfile.mkdtemp(prefix="pixel_limit_")
    model = tiny_model(os.path.join(tmp, "model"))
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        img = os.path.join(tmp, f"zeros_{side}.png")
        zero_png(img, side, side)
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", CHILD, model, img], capture_output=True,
                           text=True, timeout=1800)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
        rc, kib = (int(x) for x in line[0].split()[1:]) if line else (r.returncode, -1)
        row = {"side": side, "pixels": side * side, "file_kib": os.path.getsize(img) // 1024,
               "accepted": side * side <= DEFAULT_MAX_PIXELS, "exit_status": rc,
               "peak_rss_mib": round(kib / 1024, 1), "wall_s": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        os.remove(img)
    floor = rows[0]["peak_rss_mib"]
    for row in rows:
        row["above_floor_mib"] = round(row["peak_rss_mib"] - floor, 1)
    result = {
        "benchmark": "pixel_limit", "date": datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="seconds"), "max_pixels": DEFAULT_MAX_PIXELS,
        "host": {"machine": platform.machine(), "processor": platform.processor(),
                 "cpu_count": os.cpu_count(),
                 "note": "shared, loaded 2-core x86-64 AMD EPYC (other jobs running)"},
        "command": "python benchmarks/pixel_limit.py --sizes " + args.sizes,
        "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
