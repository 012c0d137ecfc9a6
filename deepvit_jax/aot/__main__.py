"""Compile a training config for a TPU topology ahead of time, on a machine without a TPU:
does the recipe compile, does it fit in the chips' HBM, what does a step cost.

    python -m deepvit_jax.aot --config configs/i1k.py:deepvit_s --topology v5e-8
    deepvit-aot --config i1k:deepvit_l --topology v4-32 --config.optim.grad_accum_steps=2 \\
        --search-batch --json report.json

libtpu (``pip install 'deepvit-jax[tpu]'``, Linux x86-64) compiles for a named topology
through ``jax.experimental.topologies`` (as MaxText's ``train_compile.py`` does): the result
is the real TPU executable, with XLA's ``memory_analysis()`` and ``cost_analysis()``.

What is compiled is what ``python -m deepvit_jax.main`` runs: the mesh comes from
``parallel.make_mesh(config.mesh)`` over the topology's devices (all hosts' devices of a
multi-host slice, all slices with ``--num-slices``), the train step and its shardings from
``train.loop.make_program`` (optimizer, EMA, mixup, BatchNorm, on-device augmentation,
``model.attention_impl``) and the eval step from ``train.evaluator.jit_eval_step``, at the
config's global batch, split over the topology's hosts as a run would split it.

The report (console, and ``--json FILE``): per-chip HBM (arguments, outputs, temporaries,
generated code, minus the donated buffers XLA aliases; total against the chip's capacity),
FLOPs per step and per image (XLA's cost analysis: it does not see inside Pallas kernels,
so ``attention_impl='pallas'`` under-counts), compile time, the collectives of the compiled
HLO (count and result bytes per kind), and with ``--search-batch`` the largest per-chip batch
whose train step fits (bisection over compiles).

Exit status (``deepvit_jax/errors.py``): 0 compiled and fits; 2 the step does not fit in HBM
(one line with the numbers; the JSON report is still written), an unknown topology (one line
listing the known ones), no libtpu (the install command), or any bad config field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from jax.experimental import topologies

from deepvit_jax import cli, configs, parallel
from deepvit_jax.data import pipeline
from deepvit_jax.models import attention
from deepvit_jax.train import config as config_lib
from deepvit_jax.train import loop
from deepvit_jax.train.evaluator import jit_eval_step
from deepvit_jax.errors import ConfigError, DoesNotFitError, InputError, one_line

log = logging.getLogger(__name__)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as users name it, and how libtpu names it (MaxText's table)."""

    name: str  # libtpu's topology name, 'v5e:2x4'
    chip_config: str  # 'megacore' (v4, v5p: one device per chip) or 'default'
    chips_per_host: tuple[int, int, int]
    hbm_gib: float  # per chip (Google Cloud's TPU pages)


# Users' names -> libtpu's. v5e-8 and v6e-8 are one host of 8 chips (ct5lp-hightpu-8t,
# ct6e-standard-8t); v4 and v5p hosts hold 4 chips (v4-32 = 4 hosts).
TOPOLOGIES: dict[str, Topology] = {
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1), 32),
    "v4-16": Topology("v4:2x2x2", "megacore", (2, 2, 1), 32),
    "v4-32": Topology("v4:2x2x4", "megacore", (2, 2, 1), 32),
    "v5e-1": Topology("v5e:1x1", "default", (1, 1, 1), 16),
    "v5e-4": Topology("v5e:2x2", "default", (2, 2, 1), 16),
    "v5e-8": Topology("v5e:2x4", "default", (2, 4, 1), 16),
    "v5e-16": Topology("v5e:4x4", "default", (2, 4, 1), 16),
    "v5p-8": Topology("v5:2x2x1", "megacore", (2, 2, 1), 95),
    "v5p-16": Topology("v5:2x2x2", "megacore", (2, 2, 1), 95),
    "v6e-1": Topology("v6e:1x1", "default", (1, 1, 1), 32),
    "v6e-4": Topology("v6e:2x2", "default", (2, 2, 1), 32),
    "v6e-8": Topology("v6e:2x4", "default", (2, 4, 1), 32),
}
ALIASES = {"v5litepod-1": "v5e-1", "v5litepod-4": "v5e-4", "v5litepod-8": "v5e-8",
           "v5litepod-16": "v5e-16"}

# Datasets a recipe may name that need not be prepared on the compiling machine:
# (classes, train images, eval images).
KNOWN_DATASETS = {
    "imagenet2012": (1000, 1281167, 50000),
    "imagenet2012_real": (1000, 1281167, 50000),
    "imagenette": (10, 9469, 3925),
    "cifar10": (10, 50000, 10000),
    "cifar100": (100, 50000, 10000),
}

INSTALL = "pip install 'deepvit-jax[tpu]' (or pip install 'jax[tpu]'; Linux x86-64)"

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def topology(name: str) -> Topology:
    key = ALIASES.get(name, name)
    if key not in TOPOLOGIES:
        raise ConfigError(f"--topology {name!r} is unknown; known: {', '.join(TOPOLOGIES)} "
                          f"(and {', '.join(ALIASES)})")
    return TOPOLOGIES[key]


def libtpu_version() -> str:
    """The installed libtpu's version; InputError with the install command without it."""
    from importlib import metadata

    for dist in ("libtpu", "libtpu-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    raise InputError(f"compiling for a TPU needs libtpu, which is not installed: {INSTALL}")


def prepare_host() -> None:
    """Settings for a TPU compile on a CPU host, before JAX's backend starts: the host's own
    backend is the CPU (libtpu must not claim a TPU; several compiling processes may load
    libtpu at once), and libtpu does not query the GCE metadata server."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        jax.config.update("jax_platforms", "cpu")
    except Exception:  # the backend already started (a test process): it is what it is
        pass


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """The compile-only devices of ``topo`` (``num_slices`` slices)."""
    libtpu_version()
    kw = {"chip_config_name": topo.chip_config, "chips_per_host_bounds": topo.chips_per_host,
          "num_slices": num_slices}
    try:
        return list(topologies.get_topology_desc(topology_name=topo.name, platform="tpu",
                                                 **kw).devices)
    except Exception as e:  # libtpu refused the topology: name it
        raise ConfigError(f"libtpu cannot describe topology {topo.name!r} x{num_slices}: "
                          f"{one_line(e)}") from None


# --------------------------------------------------------------------------------------
# The programs
# --------------------------------------------------------------------------------------


def _dataset(config, num_classes: int | None, num_train: int | None):
    """(num_classes, num_train, name): the prepared dataset's, else the known table's."""
    name = str(config.data.dataset)
    try:
        info = pipeline.dataset_info(config.data)
        known = (info.num_classes, info.num_train)
    except Exception as e:  # not prepared here: the table, or the flags
        row = KNOWN_DATASETS.get(name.split(":")[0].split("/")[0])
        if row is None and not (num_classes and num_train):
            raise ConfigError(f"config.data.dataset={name!r} is not readable here "
                              f"({one_line(e)}) and not one of {sorted(KNOWN_DATASETS)}: "
                              "pass --num-classes and --num-train") from None
        known = row[:2] if row else (num_classes, num_train)
    return (num_classes or known[0]), (num_train or known[1]), name


@dataclasses.dataclass
class Setup:
    config: Any
    mesh: Any
    mcfg: Any
    prog: Any  # train.loop.Program
    hosts: int
    num_train: int


def build(config, devices, *, num_classes=None, num_train=None) -> Setup:
    """The run's programs on ``devices``, by the training loop's own functions."""
    config = config.copy_and_resolve_references()
    if config.init_from is None:  # weights are loaded at run time; the program is the same
        with config.unlocked():
            config.init_from = ""
    config_lib.validate(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    classes, n_train, _ = _dataset(config, num_classes, num_train)
    mcfg = loop.model_config(config, classes)
    hosts = len({d.process_index for d in devices})
    loop._batch_size(config, "batch_size", config.batch_size, mesh, n_train, processes=hosts)
    loop._batch_size(config, "eval.batch_size", config.eval.batch_size or config.batch_size,
                     mesh, n_train, processes=hosts)
    length = config_lib.run_length(config, n_train)
    return Setup(config, mesh, mcfg, loop.make_program(config, mcfg, mesh, length), hosts,
                 n_train)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def lower_train(s: Setup, global_batch: int):
    """The jitted train step of :func:`build` lowered at ``global_batch`` (abstract arrays)."""
    p, size = s.prog, s.mcfg.image_size
    image_dtype = jnp.uint8 if p.augment_fn is not None else jnp.float32
    batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), image_dtype,
                                           sharding=p.batch_sh["image"]),
             "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32,
                                           sharding=p.batch_sh["label"])}
    with jax.set_mesh(s.mesh):
        return p.train_step.trace(_abstract(p.abstract_state, p.state_sh),
                                  _abstract(p.abstract_rest, p.rest_sh), batch).lower()


def lower_eval(s: Setup, global_batch: int):
    """The evaluator's jitted step (``jit_eval_step``) lowered at ``global_batch``."""
    p, size = s.prog, s.mcfg.image_size
    data_sh = parallel.batch_sharding(s.mesh)
    step = jit_eval_step(p.model_def, s.mesh, p.state_sh, p.rest_sh)
    batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32,
                                           sharding=data_sh),
             "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=data_sh),
             "mask": jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=data_sh)}
    st = p.abstract_state
    with jax.set_mesh(s.mesh):
        return step.trace(_abstract(st.params, p.state_sh.params),
                          _abstract(st.batch_stats, p.state_sh.batch_stats),
                          _abstract(p.abstract_rest, p.rest_sh), batch).lower()


# --------------------------------------------------------------------------------------
# What a compiled program holds
# --------------------------------------------------------------------------------------


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'count', 'bytes'}} of the collectives in a compiled HLO module: bytes are the
    per-device sizes of each op's result shapes (an async ``-start`` op counted once; its
    result tuple holds the operand as well, so all-gather / reduce-scatter bytes of async ops
    include the operand)."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _OP.match(_COMMENT.sub("", line))
        if m is None:
            continue
        shapes, kind = m.group(1), m.group(2)
        nbytes = 0
        for dtype, dims in _SHAPE.findall(shapes):
            if dtype in _DTYPE_BYTES:
                nbytes += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        row = out.setdefault(kind, {"count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += nbytes
    return out


# libtpu's refusal: "... the total memory required for HLO temporaries (158.20G) exceeds
# available HBM (15.75G)" (older: "Used 20.5G of 15.48G hbm").
_OOM = (re.compile(r"required for ([\w ]+?) \(([0-9.]+)([KMGT]?)\) exceeds available HBM "
                   r"\(([0-9.]+)([KMGT]?)\)"),
        re.compile(r"Used ([0-9.]+)([KMGT]?)B? of ([0-9.]+)([KMGT]?)B? hbm"))
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_numbers(message: str) -> dict:
    """What libtpu's out-of-memory message says: bytes required (at least) and usable."""
    m = _OOM[0].search(message)
    if m is not None:
        what, need, nu, avail, au = m.groups()
        out = {"total": int(float(need) * _UNIT[nu]), "usable": int(float(avail) * _UNIT[au])}
        if "temporar" in what:
            out["temporaries"] = out["total"]
        return out
    m = _OOM[1].search(message)
    if m is not None:
        return {"total": int(float(m.group(1)) * _UNIT[m.group(2)]),
                "usable": int(float(m.group(3)) * _UNIT[m.group(4)])}
    return {"total": None}


def analyse(lowered, capacity: int, devices: int, images: int) -> dict:
    """Compile ``lowered``; memory per chip, FLOPs, collectives, compile time. A program
    that libtpu refuses for want of HBM gives ``fits: False`` with the used bytes it names."""
    t = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA's out-of-memory at compile time: the numbers, no traceback
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        mem = dict(_oom_numbers(text), capacity=capacity, at_least=True)
        return {"compile_s": round(time.perf_counter() - t, 2), "fits": False,
                "memory": mem,
                "error": one_line(text)[:500]}
    compile_s = time.perf_counter() - t
    ma = compiled.memory_analysis()
    mem = {"arguments": int(ma.argument_size_in_bytes),
           "outputs": int(ma.output_size_in_bytes),
           "temporaries": int(ma.temp_size_in_bytes),
           "generated_code": int(ma.generated_code_size_in_bytes),
           "aliased": int(ma.alias_size_in_bytes)}
    # Donated inputs that XLA writes the outputs into are counted once.
    mem["total"] = (mem["arguments"] + mem["outputs"] + mem["temporaries"]
                    + mem["generated_code"] - mem["aliased"])
    mem["capacity"] = capacity
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_chip = float((cost or {}).get("flops", 0.0))
    return {"compile_s": round(compile_s, 2), "fits": mem["total"] <= capacity,
            "memory": mem, "flops_per_chip": flops_chip,
            "flops_per_step": flops_chip * devices,
            "flops_per_image": flops_chip * devices / images,
            "collectives": collectives(compiled.as_text())}


def search_batch(s: Setup, capacity: int, start: int, *, limit: int = 4096) -> dict:
    """The largest batch whose train step fits, per batch shard (data x fsdp) doubling from
    ``start`` up to ``limit``, then bisecting to within 1/16: {'global', 'per_chip'}
    (0 when one image per shard does not fit)."""
    shards = parallel.batch_size_per_shard(s.mesh)
    devices = s.mesh.devices.size

    def fits(per_shard: int) -> bool:
        r = analyse(lower_train(s, per_shard * shards), capacity, devices, per_shard * shards)
        log.info("per-shard batch %d: %s", per_shard, "fits" if r["fits"] else "does not fit")
        return r["fits"]

    lo, hi = 0, max(1, start)
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            break
    else:
        while hi - lo > max(1, lo // 16):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    g = lo * shards
    return {"global": g, "per_chip": g // devices if g % devices == 0 else g / devices,
            "limit_reached": hi > limit}


def compile_report(config, topology_name: str, *, num_slices: int = 1,
                   search: bool = False, num_classes=None, num_train=None,
                   config_name: str = "") -> dict:
    """Compile ``config``'s train and eval steps for ``topology_name``; the report."""
    topo = topology(topology_name)
    version = libtpu_version()
    devices = topology_devices(topo, num_slices)
    s = build(config, devices, num_classes=num_classes, num_train=num_train)
    capacity = int(topo.hbm_gib * GIB)
    n = len(devices)
    gb = int(s.config.batch_size)
    eval_gb = int(s.config.eval.batch_size or gb)
    shards = parallel.batch_size_per_shard(s.mesh)
    report = {
        "config": config_name, "model_name": s.config.model_name,
        "attention_impl": attention.resolve(s.mcfg.attention_impl), "dtype": str(s.mcfg.dtype),
        "topology": ALIASES.get(topology_name, topology_name), "libtpu_topology": topo.name,
        "num_slices": num_slices, "devices": n, "hosts": s.hosts,
        "device_kind": devices[0].device_kind, "hbm_per_chip": capacity,
        "mesh": dict(s.mesh.shape), "global_batch": gb,
        "per_chip_batch": gb // n if gb % n == 0 else gb / n,
        "per_host_batch": gb // s.hosts, "grad_accum_steps": int(
            s.config.optim.get("grad_accum_steps", 1) or 1),
        "libtpu": version, "jax": jax.__version__,
    }
    log.info("compiling the train step for %s (%d devices, %d hosts)", topo.name, n, s.hosts)
    report["train"] = analyse(lower_train(s, gb), capacity, n, gb)
    log.info("compiling the eval step")
    report["eval"] = analyse(lower_eval(s, eval_gb), capacity, n, eval_gb)
    report["fits"] = bool(report["train"]["fits"] and report["eval"]["fits"])
    if search:
        found = search_batch(s, capacity, max(1, gb // shards))
        report["max_per_chip_batch"] = found["per_chip"]
        report["max_global_batch"] = found["global"]
    return report


# --------------------------------------------------------------------------------------
# The console
# --------------------------------------------------------------------------------------


def _gib(x) -> str:
    return "?" if x is None else f"{x / GIB:.2f} GiB"


def format_report(r: dict) -> str:
    lines = [f"{r['config'] or r['model_name']} on {r['topology']} x{r['num_slices']} "
             f"({r['devices']} x {r['device_kind']}, {r['hosts']} host(s), libtpu "
             f"{r['libtpu']}): mesh {r['mesh']}, global batch {r['global_batch']} "
             f"({r['per_chip_batch']:g} per chip, {r['per_host_batch']} per host), "
             f"attention {r['attention_impl']}, {r['dtype']}"]
    for step in ("train", "eval"):
        a = r[step]
        m = a["memory"]
        if "arguments" in m:
            mem = (f"HBM per chip {_gib(m['total'])} of {_gib(m['capacity'])} (arguments "
                   f"{_gib(m['arguments'])}, temporaries {_gib(m['temporaries'])}, outputs "
                   f"{_gib(m['outputs'])}, aliased {_gib(m['aliased'])})")
        else:
            mem = (f"HBM per chip at least {_gib(m['total'])} of {_gib(m['capacity'])} (XLA: "
                   f"{a['error']})")
        line = (f"  {step}: {'fits' if a['fits'] else 'DOES NOT FIT'}; {mem}; compiled in "
                f"{a['compile_s']:.1f} s")
        if "flops_per_step" in a:
            line += (f"; {a['flops_per_step'] / 1e12:.3f} TFLOP per step, "
                     f"{a['flops_per_image'] / 1e9:.2f} GFLOP per image")
            coll = ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                             for k, v in sorted(a["collectives"].items()))
            line += f"; collectives: {coll or 'none'}"
        lines.append(line)
    if "max_per_chip_batch" in r:
        lines.append(f"  largest per-chip train batch that fits: {r['max_per_chip_batch']}")
    if r["attention_impl"] == "pallas":
        lines.append("  (XLA's FLOP count does not see inside the Pallas kernels)")
    return "\n".join(lines)


def _not_fitting(r: dict) -> str:
    parts = [f"{step} step needs {'at least ' if r[step]['memory'].get('at_least') else ''}"
             f"{_gib(r[step]['memory']['total'])} per chip"
             for step in ("train", "eval") if not r[step]["fits"]]
    return (f"{r['config'] or r['model_name']} does not fit on {r['topology']}: "
            f"{', '.join(parts)}, the chip has {_gib(r['hbm_per_chip'])}; lower "
            "--config.batch_size (with --config.optim.grad_accum_steps to keep the global "
            "batch), shard the weights with --config.mesh.fsdp, or use bfloat16 "
            "(--config.model.dtype=bfloat16)")


FLAGS: dict = {}  # defined by run() only: importing this module defines no absl flag


def _define_flags() -> None:
    if FLAGS:
        return
    FLAGS.update(
        config=cli.define_config_flag(),
        topology=flags.DEFINE_string("topology", None, "TPU slice: " + ", ".join(TOPOLOGIES)),
        num_slices=flags.DEFINE_integer("num-slices", 1,
                                        "Slices joined over the data-center network."),
        json=flags.DEFINE_string("json", None, "Write the report to this JSON file."),
        search=flags.DEFINE_bool("search-batch", False, "Also find the largest per-chip "
                                 "batch that fits (more compiles)."),
        num_classes=flags.DEFINE_integer("num-classes", None,
                                         "Classes, where the dataset is not here."),
        num_train=flags.DEFINE_integer("num-train", None,
                                       "Train images, where the dataset is not here."),
        verbose=cli.define_verbose_flag())
    flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    del argv
    cli.setup_console(FLAGS["verbose"].value)
    with cli.cli_errors():
        _run()


def _run() -> None:
    f = {k: v.value for k, v in FLAGS.items()}
    topology(f["topology"])  # an unknown name before anything is loaded
    libtpu_version()
    if f["json"]:
        cli.check_output(f["json"], [], flag="--json", suffix=".json")
    if f["num_slices"] < 1:
        raise ConfigError(f"--num-slices={f['num_slices']}: must be at least 1")
    prepare_host()
    # A compile-only TPU executable cannot be read back from JAX's persistent cache (no
    # client to load it into): compile afresh, and time the compile itself.
    jax.config.update("jax_enable_compilation_cache", False)
    r = compile_report(f["config"], f["topology"], num_slices=f["num_slices"],
                       search=f["search"], num_classes=f["num_classes"],
                       num_train=f["num_train"], config_name=_config_arg())
    print(format_report(r), flush=True)
    if f["json"]:
        cli.write_json(f["json"], r)
    if not r["fits"]:
        raise DoesNotFitError(_not_fitting(r))


def _config_arg() -> str:
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a.startswith("--config="):
            return os.path.basename(a.split("=", 1)[1])
        if a == "--config" and i + 1 < len(args):
            return os.path.basename(args[i + 1])
    return ""


def run(argv: list[str] | None = None):
    """The ``deepvit-aot`` console command (and ``python -m deepvit_jax.aot``)."""
    argv = list(sys.argv if argv is None else argv)
    for i, a in enumerate(argv):  # a recipe name -> its file (as deepvit-train does)
        if a.startswith("--config="):
            argv[i] = "--config=" + configs.resolve(a[len("--config="):])
        elif a == "--config" and i + 1 < len(argv):
            argv[i + 1] = configs.resolve(argv[i + 1])
    sys.argv = argv
    _define_flags()
    cli.run_absl(main)


if __name__ == "__main__":
    run()
