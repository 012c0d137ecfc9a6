"""The project's error types and the exit statuses of every command line.

Each error's message names the field, file or key and says what to do. The command lines
(``main``, ``convert``, ``predict``, ``data``, ``evaluate``, ``export``) run inside
:func:`cli_errors`, which turns them into one line on stderr and an exit status:

====  ===================================================================================
0     done (or preempted: a checkpoint was saved, run the same command again to resume)
1     training stopped on a NaN/inf loss or non-finite parameters
2     bad config or input (a config field, a file, a folder, a dataset)
3     the workdir is in use by another run (its lock file is named)
4     an I/O error (disk full, permission denied, storage unreachable)
130   interrupted twice (SIGINT / SIGTERM again while saving): nothing more was saved
====  ===================================================================================

Anything else is a bug and keeps its traceback. ``DEEPVIT_TRACEBACK=1`` shows the traceback
of the errors above too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

EXIT_OK = 0
EXIT_NONFINITE = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3
EXIT_IO = 4
EXIT_ABORTED = 130


class DeepViTError(Exception):
    """Base of the project's errors; ``exit_code`` is the command-line exit status."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(DeepViTError, ValueError):
    """A bad configuration value; the message names the config field (``config.x.y``)."""


class InputError(DeepViTError, ValueError):
    """A bad input file, folder or dataset; the message names it and the fix."""


class WorkdirLockedError(DeepViTError):
    """Another run holds the workdir's lock."""

    exit_code = EXIT_LOCKED


class TrainingStopped(DeepViTError):
    """Training stopped on a non-finite loss / parameters (see train.reporting)."""

    exit_code = EXIT_NONFINITE


class Aborted(DeepViTError):
    """A second SIGINT / SIGTERM while the first one's checkpoint was being written."""

    exit_code = EXIT_ABORTED


def one_line(message: object) -> str:
    """``message`` on one line (multi-line details joined with '; ')."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "no detail"
    out = lines[0]
    for ln in lines[1:]:  # "Run:\n  command" reads as "Run: command"
        out += (" " if out.endswith(":") else "; ") + ln
    return out


def exit_code(exc: BaseException, input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """The exit status of ``exc`` (see the module docstring); -1 for a bug."""
    if isinstance(exc, DeepViTError):
        return exc.exit_code
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError,
                        IsADirectoryError, *input_errors)):
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError):
        return EXIT_IO
    return -1


@contextlib.contextmanager
def cli_errors(input_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a command line's body: the project's errors (and ``input_errors``, e.g. a
    module's own ValueError subclass) become ``error: <one line>`` on stderr and
    ``SystemExit(code)``. Other exceptions propagate with their traceback (bugs).

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
