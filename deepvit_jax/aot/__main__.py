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
``train.program.make_program`` (optimizer, EMA, mixup, BatchNorm, on-device augmentation,
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
listing the known ones), no libtpu (the install command), or any bad config field; 5 libtpu
failed inside its compiler (a compiler bug: one line naming it).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from deepvit_jax import cli, configs
from deepvit_jax.aot.compiled import SEARCH_LIMIT
from deepvit_jax.aot.report import compile_report, format_report, not_fitting
from deepvit_jax.aot.topologies import TOPOLOGIES, libtpu_version, prepare_host, topology
from deepvit_jax.errors import ConfigError, DoesNotFitError

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
        search_limit=flags.DEFINE_integer("search-limit", SEARCH_LIMIT,
                                          "Images per batch shard where the search stops."),
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
    if f["search_limit"] < 1:
        raise ConfigError(f"--search-limit={f['search_limit']}: must be at least 1")
    prepare_host()
    # A compile-only TPU executable cannot be read back from JAX's persistent cache (no
    # client to load it into): compile afresh, and time the compile itself.
    jax.config.update("jax_enable_compilation_cache", False)
    r = compile_report(f["config"], f["topology"], num_slices=f["num_slices"],
                       search=f["search"], search_limit=f["search_limit"],
                       num_classes=f["num_classes"],
                       num_train=f["num_train"], config_name=_config_arg())
    print(format_report(r), flush=True)
    if f["json"]:
        cli.write_json(f["json"], r)
    if not r["fits"]:
        raise DoesNotFitError(not_fitting(r))


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
