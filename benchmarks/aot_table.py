"""Compile the ImageNet recipes for TPU topologies without a TPU (``deepvit_jax.aot``) and
collect the reports in ``benchmarks/results/aot_tpu.json`` (the README's TPU table).

    python benchmarks/aot_table.py                 # every row not yet in the JSON
    python benchmarks/aot_table.py --rows 4        # the first 4 missing rows
    python benchmarks/aot_table.py --markdown      # the README table from the JSON

Each row is one ``python -m deepvit_jax.aot --config ... --topology ... --json`` in its own
process (a recipe that does not fit exits 2 and still writes its report). The JSON is
rewritten after every row, so a cut-short run keeps what it compiled; it names the libtpu and
jax versions and the machine that compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "aot_tpu.json")

I1K = ["deepvit_16b", "deepvit_24b", "deepvit_32b", "vit_16b", "vit_24b", "vit_32b",
       "deepvit_s", "deepvit_l"]
TOPOLOGIES = ["v5e-8", "v4-8", "v5p-8", "v6e-8"]


def recipe(name: str) -> str:
    return f"i1k_ft384:{name}" if name == "deepvit_l_384" else f"i1k:{name}"


def rows() -> list[tuple[str, str, str]]:
    """(recipe, topology, variant or ''), most informative first: one row per model
    size on v5e (the smallest HBM) and multi-host rows, then the rest."""
    out = [("deepvit_16b", "v5e-8", ""), ("deepvit_16b", "v4-32", ""),
           ("deepvit_l_384", "v5e-8", ""), ("deepvit_s", "v5e-8", ""), ("deepvit_l", "v4-32", ""),
           ("deepvit_16b", "v4-8", ""), ("deepvit_32b", "v5e-8", "")]
    for (name, topo), variants in FIT_VARIANTS.items():
        out += [(name, topo, v) for v in variants]
    for name in ["deepvit_16b", "deepvit_l_384"]:
        for impl in ["reference", "xla", "pallas"]:
            out.append((name, "v5e-8", impl))
    for topo in TOPOLOGIES:
        for name in [*I1K, "deepvit_l_384"]:
            if (name, topo, "") not in out:
                out.append((name, topo, ""))
    return out + [(name, topo, NEWER_LIBTPU) for name, topo in NEWER_LIBTPU_ROWS]


# A row's variant: the flags it adds to the recipe's own settings. An attention
# implementation, or a setting that makes a recipe fit where it does not at its own batch.
ATTENTION = ("reference", "xla", "pallas")
VARIANTS = {impl: [f"--config.model.attention_impl={impl}"] for impl in ATTENTION}
VARIANTS["remat"] = ["--config.model.remat=True"]
VARIANTS["accum2"] = ["--config.batch_size=256", "--config.optim.grad_accum_steps=2"]
# (recipe, topology) that do not fit at the recipe's batch: the variants tried there
FIT_VARIANTS = {(name, topo): ["remat", "accum2"]
                for name, topo in [("deepvit_32b", "v5e-8"), ("deepvit_32b", "v4-8"),
                                   ("vit_32b", "v5e-8"), ("deepvit_l", "v5e-8"),
                                   ("vit_32b", "v4-8"), ("deepvit_l", "v4-8")]}


# Where libtpu 0.0.42.1 (the one jax 0.10.2's ``tpu`` extra pins) fails inside its own
# compiler: the same recipe compiled by a newer libtpu, which ``--libtpu-dir DIR`` puts first
# on the path (``pip install --no-deps --target DIR libtpu==0.0.52``; the variant names it).
NEWER_LIBTPU_VERSION = "0.0.52"
NEWER_LIBTPU = f"libtpu-{NEWER_LIBTPU_VERSION}"
NEWER_LIBTPU_ROWS = [("deepvit_32b", "v6e-8"), ("deepvit_l_384", "v6e-8")]


def key(name, topo, impl) -> str:
    return f"{name}@{topo}" + (f"/{impl}" if impl else "")


def compile_row(name: str, topo: str, impl: str, search: bool = False,
                libtpu_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.json")
        cmd = [sys.executable, "-m", "deepvit_jax.aot", "--config", recipe(name),
               "--topology", topo, "--json", path]
        cmd += VARIANTS.get(impl, [])
        if search:
            cmd.append("--search-batch")
        env, prefix = dict(os.environ), []
        if impl == NEWER_LIBTPU:  # main() compiles these rows only with --libtpu-dir
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [libtpu_dir,
                                                              env.get("PYTHONPATH")]))
            prefix = [f"PYTHONPATH={libtpu_dir}"]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if os.path.exists(path):
            with open(path) as f:
                rep = json.load(f)
        else:
            rep = {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        rep.update(exit_status=r.returncode, wall_s=round(wall, 1), command=" ".join(
            [*prefix, "python -m deepvit_jax.aot", *cmd[3:]]))
        return rep


def load() -> dict:
    if os.path.exists(OUT):
        with open(OUT) as f:
            return json.load(f)
    return {"rows": {}}


def save(doc: dict, row_key: str | None = None, row: dict | None = None) -> dict:
    """Write ``doc`` with ``row`` added, merged with the rows another instance of this script
    wrote meanwhile (``--reverse``: two compiles at once on two cores); the merged doc."""
    import fcntl

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # the file's rows win: another instance may have recompiled a row this one read
        on_file = load()
        merged = {**on_file, **doc, "rows": {**doc["rows"], **on_file["rows"]}}
        if row_key is not None:
            merged["rows"][row_key] = row
        # the table's order, whoever compiled a row first
        order = {key(*r): i for i, r in enumerate(rows())}
        merged["rows"] = dict(sorted(merged["rows"].items(),
                                     key=lambda kv: order.get(kv[0], len(order))))
        tmp = OUT + ".tmp"
        with open(tmp, "w") as f:
            json.dump(merged, f, indent=1)
            f.write("\n")
        os.replace(tmp, OUT)
    return merged


def _gib(x) -> str:
    return "?" if x is None else f"{x / 2**30:.1f}"


def _settings(r: dict, doc_libtpu: str | None = None) -> str:
    """The attention implementation, and any setting the row adds to the recipe's."""
    extra = [f.split("=")[0].removeprefix("--config.") + "=" + f.split("=")[1]
             for f in r.get("command", "").split()
             if f.startswith("--config.") and "attention_impl" not in f]
    if r.get("libtpu") and r["libtpu"] != doc_libtpu:
        extra.append(f"libtpu {r['libtpu']}")
    return ", ".join([r["attention_impl"], *extra])


def recommended(doc: dict, k: str) -> str:
    """The per-chip batch we recommend, on a recipe's own row (no variant): the recipe's where
    it fits (its global batch of 512 and its hyperparameters unchanged); where it does not,
    that of the fitting variant row with the fewest FLOPs per image (gradient accumulation
    before rematerialisation, which computes the forward twice), with its settings."""
    r = doc["rows"][k]
    if "/" in k:
        return ""
    if r.get("fits"):
        return f"{r['per_chip_batch']:g}"
    fitting = [v for kv, v in doc["rows"].items()
               if kv.partition("/")[0] == k and kv.partition("/")[2] not in ATTENTION
               and v.get("fits") and "flops_per_image" in v.get("train", {})]
    if not fitting:
        return "none fits (no variant compiled)" if "train" in r else ""
    best = min(fitting, key=lambda v: v["train"]["flops_per_image"])
    extra = _settings(best, doc.get("libtpu")).partition(", ")[2]
    return f"{best['per_chip_batch']:g} with {extra}"


def markdown(doc: dict) -> str:
    lines = ["| recipe | topology | attention, settings | global batch (per chip) | fits | "
             "train HBM/chip GiB (args / temp) | eval HBM/chip GiB | largest per-chip batch | "
             "recommended per-chip batch | GFLOP/image (train) | compile s (train / eval) | "
             "collectives (train) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in doc["rows"].items():
        if "train" not in r:
            err = r.get("error", "?").replace("|", "/")
            lines.append(f"| {k} | | | | error (exit {r.get('exit_status')}): "
                         f"{err[:160]}{'...' if len(err) > 160 else ''} | | | | "
                         f"{recommended(doc, k)} | | | |")
            continue
        t, e = r["train"], r["eval"]
        tm = t["memory"]
        mem = (f"{_gib(tm['total'])} ({_gib(tm.get('arguments'))} / "
               f"{_gib(tm.get('temporaries'))})")
        coll = ", ".join(f"{c} x{v['count']}" for c, v in sorted(t.get("collectives",
                                                                       {}).items()))
        flops = f"{t['flops_per_image'] / 1e9:.1f}" if "flops_per_image" in t else "?"
        most = ("not searched" if "max_per_chip_batch" not in r else
                f"{'>= ' if r.get('max_batch_limit_reached') else ''}{r['max_per_chip_batch']}")
        hosts = f"{r['hosts']} host{'s' if r['hosts'] > 1 else ''}"
        lines.append(
            f"| {r['config']} | {r['topology']} ({hosts}) | {_settings(r, doc.get('libtpu'))} | "
            f"{r['global_batch']} ({r['per_chip_batch']:g}) | "
            f"{'yes' if r['fits'] else '**no**'} | {mem} | {_gib(e['memory']['total'])} | "
            f"{most} | {recommended(doc, k)} | {flops} | "
            f"{t['compile_s']:.0f} / {e['compile_s']:.0f} | {coll} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=0, help="compile at most this many rows")
    ap.add_argument("--markdown", action="store_true", help="print the README table")
    ap.add_argument("--reverse", action="store_true",
                    help="missing rows from the last (a second instance beside a first)")
    ap.add_argument("--libtpu-dir", help=f"where libtpu {NEWER_LIBTPU_VERSION} is installed, "
                    f"for the {NEWER_LIBTPU} rows")
    ap.add_argument("--search", nargs="+", default=[], metavar="ROW",
                    help="(re)compile these rows (e.g. deepvit_16b@v5e-8) with --search-batch "
                         "(the largest per-chip batch that fits; several compiles each)")
    args = ap.parse_args()
    doc = load()
    if args.markdown:
        print(markdown(doc))
        return
    from importlib import metadata

    import jax

    doc.update(libtpu=metadata.version("libtpu"), jax=jax.__version__,
               machine=f"{platform.machine()} {platform.processor() or ''} "
                       f"({os.cpu_count()} CPUs), compiling only: no TPU")
    searched = {k for k, r in doc["rows"].items() if "max_per_chip_batch" in r}
    todo = [(*r, False) for r in rows() if key(*r) not in doc["rows"]]
    known = {key(*r): r for r in rows()}
    for k in args.search:
        if k not in known:
            raise SystemExit(f"--search {k}: not a row; rows: {', '.join(known)}")
        if k not in searched:
            todo = [t for t in todo if key(*t[:3]) != k] + [(*known[k], True)]
    if args.reverse:
        todo = todo[::-1]
    if args.rows:
        todo = todo[:args.rows]
    for name, topo, impl, search in todo:
        k = key(name, topo, impl)
        if not search and k in load()["rows"]:  # the other instance has compiled it
            continue
        if impl == NEWER_LIBTPU and not args.libtpu_dir:
            print(f"{k}: skipped (needs --libtpu-dir)", flush=True)
            continue
        print(f"{k} ...", flush=True)
        rep = compile_row(name, topo, impl, search, args.libtpu_dir)
        print(f"  exit {rep['exit_status']}, {rep['wall_s']} s, fits {rep.get('fits')}",
              flush=True)
        doc = save(doc, k, rep)


if __name__ == "__main__":
    main()
