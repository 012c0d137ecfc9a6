"""The command-line layer: what every command (``main``, ``evaluate``, ``export``, ``predict``,
``analysis``, ``convert``, ``data``) shares, so that they behave alike.

* **One flag convention.** Flags are lower-case words joined by hyphens (``--data-dir``,
  ``--batch-size``, ``--coordinator-address``); the weights a command reads are
  ``--checkpoint PATH`` (a model directory, a training workdir or ``WORKDIR/checkpoints/N``);
  what it writes is ``--output`` (a file) or ``--out`` (a directory). ``main`` (and ``aot``)
  take ``--config FILE[:ARG]`` and ``--config.a.b=v`` overrides, whose names are the config
  fields' own (:func:`define_config_flag`, :func:`run_absl`).
* **One console** (``deepvit_jax.console``, re-exported here: :func:`setup_console`,
  :func:`add_log_file`): warnings and errors on stderr, printed through the progress bar
  (never breaking it); INFO chatter only in a log file (``train.log``) or with ``--verbose``;
  TensorFlow's and XLA's C++ notices hidden unless ``--verbose`` (set when the package is
  imported, before TensorFlow is).
* **Output guards** (:func:`check_output`) before any work, and atomic JSON results
  (:func:`write_json`).
* **The distributed flags** (:func:`add_distributed_flags`, :func:`init_distributed`).
* **Error exits** (:func:`cli_errors`, :func:`run_cli`): the project's errors
  (``deepvit_jax.errors``) become ``error: <one line>`` on stderr and the exit status of
  ``errors.exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from deepvit_jax import parallel
from deepvit_jax.console import (LogFile, add_log_file, remove_log_file,  # noqa: F401
                                 setup_console)
from deepvit_jax.errors import (EXIT_ABORTED, EXIT_IO, ConfigError, DeepViTError, InputError,
                                exit_code, one_line, storage_message, storage_problem)
from deepvit_jax.utils import atomic_output

# --------------------------------------------------------------------------------------
# Error exits
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def cli_errors(input_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a command line's body: the project's errors (and ``input_errors``, e.g. a
    module's own ValueError subclass) become ``error: <one line>`` on stderr and
    ``SystemExit(code)``. Other exceptions propagate with their traceback (bugs);
    ``DEEPVIT_TRACEBACK=1`` shows the traceback of every error.

        with cli_errors():
            run(args)
    """
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:  # mapped below, or re-raised
        if isinstance(e, KeyboardInterrupt):
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(EXIT_ABORTED) from None
        code = exit_code(e, input_errors)
        if code < 0 or os.environ.get("DEEPVIT_TRACEBACK"):
            raise
        text = one_line(e)
        if code == EXIT_IO and not isinstance(e, DeepViTError) and storage_problem(e):
            text = storage_message(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
            text = f"{e.filename}: {text}"
        print(f"error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def run_cli(body, *, input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``body()`` inside :func:`cli_errors`; returns the exit status (0 when it returns)
    instead of raising SystemExit, for ``main(argv) -> int`` entry points."""
    try:
        with cli_errors(input_errors):
            body()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


# --------------------------------------------------------------------------------------
# Parsers and common flags
# --------------------------------------------------------------------------------------


def parser(prog: str, description: str, doc: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with the module docstring's examples as epilog and ``--verbose``."""
    p = argparse.ArgumentParser(
        prog=f"python -m {prog}", description=description,
        epilog=doc.split("\n\n", 1)[1] if doc and "\n\n" in doc else doc,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true",
                   help="also show INFO logs and TensorFlow / XLA notices")
    return p


def add_checkpoint_flag(p: argparse.ArgumentParser, *, many: bool = False,
                        help: str | None = None) -> None:
    """``--checkpoint PATH`` (repeatable with ``many``): the weights a command reads."""
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   action="append" if many else "store",
                   help=help or "model directory, training workdir, or "
                                "WORKDIR/checkpoints/<step>" + (" (repeatable)" if many else ""))


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator-address", default="",
                   help="host:port of process 0 for multi-process runs outside TPU/SLURM")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)


def init_distributed(args) -> None:
    """``jax.distributed`` from the distributed flags (or the TPU / SLURM environment)."""
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") \
            from None


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def check_output(out: str, inputs: Sequence[str], *, flag: str = "--output",
                 overwrite: bool = True, suffix: str | None = None) -> str:
    """``out`` as an absolute path, checked before any work: refused when it is or lies
    inside an input, when it lacks ``suffix``, is a directory where a file is meant
    (``suffix``), or exists and ``overwrite`` is off."""
    real = os.path.realpath(out)
    for p in inputs:
        p = os.path.realpath(p)
        if real == p or real.startswith(p.rstrip(os.sep) + os.sep):
            raise InputError(f"{flag} {out} would write into the input {p}; choose a path "
                             "outside it")
    if suffix is not None:
        if not out.endswith(suffix):
            raise InputError(f"{flag} {out}: give a file name ending in {suffix}")
        if os.path.isdir(out):
            raise InputError(f"{flag} {out} is a directory: give a file name ending in "
                             f"{suffix}")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{flag} {out} already exists (add --overwrite to replace it)")
    return os.path.abspath(out)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written atomically."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------
# --config FILE[:ARG] and --config.a.b=v (absl; main and aot)
# --------------------------------------------------------------------------------------


def define_config_flag(name: str = "config"):
    """``--config FILE[:ARG]`` with ``--config.a.b=v`` overrides (``ml_collections``), the
    flag of ``main`` and ``aot``; run the command with :func:`run_absl` so that mistakes in
    it are one line and exit status 2."""
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file(
        name, None, "Training config file and its argument (configs/FILE.py[:ARG]).",
        lock_config=True)


def define_absl_distributed_flags() -> dict:
    """The distributed flags for an absl command (read them with :func:`absl_distributed`)."""
    from absl import flags

    return {"coordinator_address": flags.DEFINE_string(
                "coordinator-address", "",
                "host:port of process 0 for multi-process runs outside TPU/SLURM."),
            "num_processes": flags.DEFINE_integer(
                "num-processes", 0, "Number of processes (with --coordinator-address)."),
            "process_id": flags.DEFINE_integer(
                "process-id", -1, "This process's index (with --coordinator-address).")}


def define_verbose_flag():
    from absl import flags

    return flags.DEFINE_bool("verbose", False,
                             "Also show INFO logs and TensorFlow / XLA notices.")


def run_absl(main, config_flag: str = "config") -> None:
    """``absl.app.run(main)`` with the flags parsed by :func:`parse_absl_flags`."""
    from absl import app

    app.run(main, flags_parser=lambda argv: parse_absl_flags(argv, config_flag))


def parse_absl_flags(argv: list[str], config_flag: str = "config") -> list[str]:
    """absl's flag parsing, with every mistake one line and exit status 2: a missing config
    file, a syntax error in it (file:line), an unknown recipe argument, an unknown config
    field (with the nearest real one), a value of the wrong type, an unknown flag."""
    from absl import flags

    with cli_errors():
        args = argv[1:]
        spec = _flag_value(args, config_flag)
        if spec is not None:
            config = load_config_file(spec)
            for name in _override_names(args, config_flag):
                check_field(config, name, config_flag)
        else:
            config = None
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            raise ConfigError(_flag_error(e, config, config_flag)) from None
    raise AssertionError("unreachable")  # cli_errors re-raises or exits


def _flag_value(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def _override_names(args: Sequence[str], name: str) -> list[str]:
    out = []
    for a in args:
        for prefix in (f"--{name}.", f"--no{name}."):
            if a.startswith(prefix):
                out.append(a[len(prefix):].split("=", 1)[0])
    return out


def load_config_file(spec: str):
    """The ConfigDict of ``FILE.py[:ARG]`` (``get_config(ARG)``), or a one-line error naming
    the file (and line) or the argument."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise InputError(f"--config {path}: no such file (a Python file defining get_config, "
                         "e.g. configs/default.py)")
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    module_spec = importlib.util.spec_from_loader(f"deepvit_config_{abs(hash(path))}",
                                                  loader=None, origin=path)
    module = importlib.util.module_from_spec(module_spec)
    module.__file__ = path
    try:
        exec(code, module.__dict__)
        get_config = module.get_config
        return get_config(arg) if arg else get_config()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        line = _config_line(e, path)
        raise ConfigError(f"{path}{line}: {one_line(e)}" if not str(e).startswith(path)
                          else one_line(e)) from None


def _config_line(e: BaseException, path: str) -> str:
    """``:N``, the line of ``path`` where ``e`` was raised, if it was raised there."""
    tb, line = e.__traceback__, ""
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def config_fields(config, prefix: str = "") -> list[str]:
    """Every dotted field name of a ConfigDict (sections and leaves)."""
    out = []
    for key in config.keys():
        out.append(prefix + key)
        value = config[key]
        if hasattr(value, "keys") and hasattr(value, "lock"):
            out += config_fields(value, f"{prefix}{key}.")
    return out


def check_field(config, name: str, flag: str = "config") -> None:
    """Raise ConfigError unless ``name`` (dotted) is a field of ``config``, suggesting the
    nearest real one."""
    fields = config_fields(config)
    if name in fields:
        return
    near = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    hint = (f"did you mean --{flag}.{near[0]}?" if near else
            f"the sections are {', '.join(k for k in config.keys())}")
    raise ConfigError(f"--{flag}.{name}: the config has no field {name!r}; {hint}")


def _flag_error(e: Exception, config, flag: str) -> str:
    """One line for absl's flag error ``e``: the field and its expected type for a bad
    value, the nearest real flag for an unknown one."""
    text = one_line(e)
    m = re.match(rf"flag --{flag}\.([\w.]+)=(.*?): (.*)", text)
    if m and config is not None:
        name, value, why = m.groups()
        node = config
        for part in name.split("."):
            node = node[part]
        kind = type(node).__name__ if node is not None else "value"
        return (f"--{flag}.{name}={value}: config.{name} takes a {kind} (now {node!r}); "
                f"{why}")
    m = re.match(r"Unknown command line flag '([^']+)'", text)
    if m:
        from absl import flags

        near = difflib.get_close_matches(m.group(1), list(flags.FLAGS), n=1, cutoff=0.6)
        return f"unknown flag --{m.group(1)}" + (f"; did you mean --{near[0]}?" if near else
                                                 "; see --help")
    return text
