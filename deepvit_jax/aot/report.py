"""The report of a TPU compile: :func:`compile_report` compiles a config's train and eval
steps for a topology into a JSON-ready dict (``--json FILE``); :func:`format_report` is its
console form, :func:`not_fitting` the one-line error of a step that needs more HBM."""

from __future__ import annotations

import logging

import jax

from deepvit_jax import parallel
from deepvit_jax.aot.compiled import SEARCH_LIMIT, analyse, search_batch
from deepvit_jax.aot.programs import build, lower_eval, lower_train, unrolled_flops
from deepvit_jax.aot.topologies import (ALIASES, GIB, libtpu_version, topology,
                                        topology_devices)
from deepvit_jax.models import attention

log = logging.getLogger(__name__)


def compile_report(config, topology_name: str, *, num_slices: int = 1,
                   search: bool = False, search_limit: int = SEARCH_LIMIT,
                   num_classes=None, num_train=None,
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
    if s.mcfg.scan_blocks:  # XLA's count of the compiled program sees one block per scan
        log.info("counting the FLOPs of the unrolled steps")
        flops = unrolled_flops(s, gb, eval_gb)
        for step, total, images in (("train", flops[0], gb), ("eval", flops[1], eval_gb)):
            if "flops_per_step" in report[step]:
                report[step].update(flops_per_step=total, flops_per_chip=total / n,
                                    flops_per_image=total / images,
                                    flops_counted="unrolled program, lowered for the CPU")
    if search:
        found = search_batch(s, capacity, max(1, gb // shards), limit=search_limit)
        report["max_per_chip_batch"] = found["per_chip"]
        report["max_global_batch"] = found["global"]
        report["max_batch_limit_reached"] = bool(found["limit_reached"])
        report["max_batch_search_limit"] = search_limit
    return report


def _gib(x) -> str:
    return "?" if x is None else f"{x / GIB:.2f} GiB"


def _step_line(step: str, a: dict) -> str:
    """One step's console line: fits or not, HBM per chip, compile time, FLOPs, collectives."""
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
    return line


def format_report(r: dict) -> str:
    lines = [f"{r['config'] or r['model_name']} on {r['topology']} x{r['num_slices']} "
             f"({r['devices']} x {r['device_kind']}, {r['hosts']} host(s), libtpu "
             f"{r['libtpu']}): mesh {r['mesh']}, global batch {r['global_batch']} "
             f"({r['per_chip_batch']:g} per chip, {r['per_host_batch']} per host), "
             f"attention {r['attention_impl']}, {r['dtype']}"]
    lines += [_step_line(step, r[step]) for step in ("train", "eval")]
    if "max_per_chip_batch" in r:
        limit = r.get("max_batch_limit_reached")
        lines.append("  largest per-chip train batch that fits: "
                     + (f"at least {r['max_per_chip_batch']} (the search stops at "
                        f"{r.get('max_batch_search_limit', SEARCH_LIMIT)} images per batch "
                        "shard)" if limit
                        else str(r["max_per_chip_batch"])))
    if r["attention_impl"] == "pallas":
        lines.append("  (XLA's FLOP count does not see inside the Pallas kernels)")
    return "\n".join(lines)


def not_fitting(r: dict) -> str:
    """The one-line error of a report whose train or eval step does not fit."""
    parts = [f"{step} step needs {'at least ' if r[step]['memory'].get('at_least') else ''}"
             f"{_gib(r[step]['memory']['total'])} per chip"
             for step in ("train", "eval") if not r[step]["fits"]]
    return (f"{r['config'] or r['model_name']} does not fit on {r['topology']}: "
            f"{', '.join(parts)}, the chip has {_gib(r['hbm_per_chip'])}; lower "
            "--config.batch_size (with --config.optim.grad_accum_steps to keep the global "
            "batch), shard the weights with --config.mesh.fsdp, or use bfloat16 "
            "(--config.model.dtype=bfloat16)")
