"""Compile a training config for a TPU topology ahead of time, on a machine without a TPU
(libtpu's compile-only devices): does the recipe compile, does it fit in the chips' HBM, what
does a step cost. The command and its report are described in ``__main__.py``
(``python -m deepvit_jax.aot --help``).

The modules, in import order: ``topologies.py`` (topology names -> libtpu's compile-only
devices), ``programs.py`` (the train and eval programs, built by the training loop's own
functions and lowered), ``compiled.py`` (compile; memory, FLOPs, collectives; the batch
search), ``report.py`` (the report and its console form), ``__main__.py`` (the command: flags
and ``run``, the ``deepvit-aot`` console script).
"""

from deepvit_jax.aot.compiled import (COLLECTIVES, SEARCH_LIMIT, analyse, collectives,
                                      search_batch)
from deepvit_jax.aot.programs import KNOWN_DATASETS, Setup, build, lower_eval, lower_train
from deepvit_jax.aot.report import compile_report, format_report, not_fitting
from deepvit_jax.aot.topologies import (ALIASES, GIB, INSTALL, TOPOLOGIES, Topology,
                                        libtpu_version, prepare_host, topology,
                                        topology_devices)

__all__ = ["ALIASES", "COLLECTIVES", "GIB", "INSTALL", "KNOWN_DATASETS", "SEARCH_LIMIT",
           "TOPOLOGIES", "Setup",
           "Topology", "analyse", "build", "collectives", "compile_report", "format_report",
           "libtpu_version", "lower_eval", "lower_train", "not_fitting", "prepare_host",
           "search_batch", "topology", "topology_devices"]
