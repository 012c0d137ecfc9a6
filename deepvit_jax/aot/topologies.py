"""TPU topologies as users name them (``v5e-8``, ``v4-32``) -> libtpu's compile-only devices.

libtpu (``pip install 'deepvit-jax[tpu]'``, Linux x86-64) describes a named topology through
``jax.experimental.topologies`` (as MaxText's ``train_compile.py`` does); the devices of every
host and slice are in the list, so a multi-host program is compiled whole.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import metadata

import jax
from jax.experimental import topologies

from deepvit_jax.errors import ConfigError, InputError, one_line

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

INSTALL = "pip install 'deepvit-jax[tpu]' (or pip install 'jax[tpu]'; Linux x86-64)"


def topology(name: str) -> Topology:
    key = ALIASES.get(name, name)
    if key not in TOPOLOGIES:
        raise ConfigError(f"--topology {name!r} is unknown; known: {', '.join(TOPOLOGIES)} "
                          f"(and {', '.join(ALIASES)})")
    return TOPOLOGIES[key]


def libtpu_version() -> str:
    """The installed libtpu's version; InputError with the install command without it."""
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
    # Without a TPU VM's metadata libtpu prints two warnings and an INVALID_ARGUMENT line on
    # start (no accelerator type, no worker hostnames); name this compiling host instead.
    # What is compiled for comes from the topology description, not from these.
    user = next((k for k, v in TOPOLOGIES.items() if v == topo), topo.name)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", user.replace("v5e-", "v5litepod-"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    kw = {"chip_config_name": topo.chip_config, "chips_per_host_bounds": topo.chips_per_host,
          "num_slices": num_slices}
    try:
        return list(topologies.get_topology_desc(topology_name=topo.name, platform="tpu",
                                                 **kw).devices)
    except Exception as e:  # libtpu refused the topology: name it
        raise ConfigError(f"libtpu cannot describe topology {topo.name!r} x{num_slices}: "
                          f"{one_line(e)}") from None
