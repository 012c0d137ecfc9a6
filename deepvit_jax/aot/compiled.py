"""What a compiled TPU program holds: per-chip memory (``memory_analysis()``), FLOPs
(``cost_analysis()``), the collectives of its HLO and the compile time; libtpu's
out-of-memory refusal read as numbers; the largest batch that fits (bisection over compiles).
"""

from __future__ import annotations

import logging
import math
import re
import time

from deepvit_jax import parallel
from deepvit_jax.aot.programs import Setup, lower_train
from deepvit_jax.errors import CompilerError, one_line

log = logging.getLogger(__name__)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r"compare\(.*?\),\s*direction=LT")
_CONST = re.compile(r"constant\((\d+)\)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{name: instruction lines} of an HLO module's text, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith((" ", "HloModule")):
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            comps[current].append(_COMMENT.sub("", line))
    return comps, entry


def _trip_count(condition: list[str]) -> int:
    """The iterations of a while loop that jax.lax.scan emits: its condition is
    ``counter < N`` with the counter from 0 and N a constant. 1 for another form."""
    consts = [int(c) for line in condition for c in _CONST.findall(line)]
    if len(consts) == 1 and any(_TRIP.search(line) for line in condition):
        return consts[0]
    return 1


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'count', 'bytes'}} of the collectives one execution of a compiled HLO module
    runs: bytes are the per-device sizes of each op's result shapes (an async ``-start`` op
    counted once; its result tuple holds the operand as well, so all-gather / reduce-scatter
    bytes of async ops include the operand). An op inside a loop body counts once per
    iteration (``model.scan_blocks``: the blocks' gradient all-reduce sits in the scanned
    backward pass), as XLA's own cost analysis does not."""
    comps, entry = _computations(hlo_text)
    if entry is None:  # a fragment without computations: count its lines once
        comps, entry = {"": hlo_text.splitlines()}, ""
    memo: dict[str, dict[str, dict[str, int]]] = {}

    def total(name: str) -> dict[str, dict[str, int]]:
        if name in memo:
            return memo[name]
        memo[name] = out = {}   # a recursive reference (none in HLO) would count nothing

        def add(kind, count, nbytes):
            row = out.setdefault(kind, {"count": 0, "bytes": 0})
            row["count"] += count
            row["bytes"] += nbytes

        for line in comps.get(name, []):
            w = _WHILE.search(line)
            if w is not None:
                trips = _trip_count(comps.get(w.group(1), []))
                for kind, row in total(w.group(2)).items():
                    add(kind, trips * row["count"], trips * row["bytes"])
                continue
            for called, branches in _CALLS.findall(line):
                for callee in [called] if called else re.findall(r"%?([\w.\-]+)", branches):
                    for kind, row in total(callee).items():
                        add(kind, row["count"], row["bytes"])
            m = _OP.match(line)
            if m is None:
                continue
            nbytes = 0
            for dtype, dims in _SHAPE.findall(m.group(1)):
                if dtype in _DTYPE_BYTES:
                    nbytes += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",")
                                                              if d)
            add(m.group(2), 1, nbytes)
        return out

    return {k: dict(v) for k, v in sorted(total(entry).items())}


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
        if text.startswith("INTERNAL") or "RET_CHECK failure" in text:
            raise CompilerError(
                f"libtpu failed inside its compiler on this step, a compiler bug and not a "
                f"config error ({one_line(text)[:300]}); try another libtpu release "
                "(pip install -U libtpu) or a nearby setting (--config.model.scan_blocks, "
                "--config.batch_size)") from None
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


SEARCH_LIMIT = 4096  # images per batch shard: the batch search stops there


def search_batch(s: Setup, capacity: int, start: int, *, limit: int = SEARCH_LIMIT) -> dict:
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
