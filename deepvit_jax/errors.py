"""The project's error types and the exit statuses of every command line.

Each error's message names the field, file or key and says what to do. Every error class of
the package lives here, in one hierarchy under :class:`DeepViTError`. The command lines
(``main``, ``convert``, ``predict``, ``data``, ``evaluate``, ``export``, ``analysis``) run
inside ``deepvit_jax.cli.cli_errors``, which turns them into one line on stderr and the exit
status of :func:`exit_code`:

====  ===================================================================================
0     done (or preempted: a checkpoint was saved, run the same command again to resume)
1     training stopped on a NaN/inf loss or non-finite parameters
2     bad config or input (a config field, a file, a folder, a dataset; ``aot``: the step
      does not fit in the chips' HBM)
3     the workdir, or an output, is in use by another command (its lock file is named)
4     an I/O error (disk full, permission denied, storage unreachable)
5     ``aot``: the TPU compiler (libtpu) failed inside itself on the step (a compiler bug)
130   interrupted twice (SIGINT / SIGTERM again while saving): nothing more was saved
====  ===================================================================================

Anything else is a bug and keeps its traceback. ``DEEPVIT_TRACEBACK=1`` shows the traceback
of the errors above too.
"""

from __future__ import annotations

import errno
import os
import re

EXIT_OK = 0
EXIT_NONFINITE = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3
EXIT_IO = 4
EXIT_COMPILER = 5
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


class OutputInUseError(DeepViTError):
    """Another command is writing the same output file or directory (its lock is named)."""

    exit_code = EXIT_LOCKED


class TrainingStopped(DeepViTError):
    """Training stopped on a non-finite loss / parameters (see train.reporting)."""

    exit_code = EXIT_NONFINITE


class Aborted(DeepViTError):
    """A second SIGINT / SIGTERM while the first one's checkpoint was being written."""

    exit_code = EXIT_ABORTED


class NonFiniteLossError(TrainingStopped, RuntimeError):
    """The loss (or gradient norm, or the parameters) became NaN/inf; the message names the
    step."""


class Preempted(DeepViTError):
    """Raised inside an evaluation interrupted by SIGTERM / SIGINT; the training loop saves a
    checkpoint and stops (exit status 0: run the same command to resume)."""

    exit_code = EXIT_OK


class ModelFileError(InputError):
    """A model directory is missing, incomplete or does not match its config."""


class CheckpointError(InputError):
    """A path that is not a readable model directory or training checkpoint; the message
    names the file and the fix."""


class DatasetNotPreparedError(InputError):
    """The dataset (TFDS name or image folder) has not been prepared; the message gives the
    ``python -m deepvit_jax.data prepare`` command."""


class PrepareError(InputError):
    """``python -m deepvit_jax.data prepare`` cannot prepare the dataset (missing or wrong
    files); the message lists each problem and the fix."""


class ConversionError(InputError):
    """PyTorch weights that cannot be converted (unknown layout, missing or extra keys,
    shapes that do not match the target model)."""


class EmptySplitError(InputError):
    """An image-folder split without a single decodable image."""


class DoesNotFitError(ConfigError):
    """``deepvit_jax.aot``: the compiled step needs more HBM per chip than the topology has;
    the message holds the numbers and the settings that lower them."""


class CompilerError(DeepViTError):
    """``deepvit_jax.aot``: libtpu failed inside itself (an INTERNAL error such as a
    RET_CHECK) on a step that is a valid program; the message names its first line."""

    exit_code = EXIT_COMPILER


class StorageError(DeepViTError):
    """A write failed for lack of space, quota or permission (or the storage failed); the
    message names the path and the fix."""

    exit_code = EXIT_IO


# Storage failures by errno, and by the text that wraps them where they arrive as another
# exception type (TensorStore / Orbax raise ValueError('RESOURCE_EXHAUSTED: ... No space
# left on device [os_error_code=28]'); TensorFlow's file layer raises its own OpErrors).
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the filesystem", errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error"}
_STORAGE_TEXTS = (("No space left on device", errno.ENOSPC),
                  ("Disk quota exceeded", errno.EDQUOT), ("File too large", errno.EFBIG),
                  ("Read-only file system", errno.EROFS),
                  ("Permission denied", errno.EACCES), ("PERMISSION_DENIED", errno.EACCES))
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def storage_problem(exc: BaseException) -> str | None:
    """What went wrong with the storage behind ``exc`` ('no space left on the device',
    'disk quota exceeded', 'permission denied', ...), looking through wrapping exceptions
    and their text; None when ``exc`` is not a storage failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[exc.errno]
        if not isinstance(exc, (OSError, DeepViTError)):
            text = str(exc)
            m = _OS_ERROR_CODE.search(text)
            if m and int(m.group(1)) in _STORAGE_ERRNOS:
                return _STORAGE_ERRNOS[int(m.group(1))]
            for needle, code in _STORAGE_TEXTS:
                if needle in text:
                    return _STORAGE_ERRNOS[code]
        exc = exc.__cause__ or exc.__context__
    return None


_QUOTED_PATH = re.compile(r'"((?:/|[a-z0-9]+://)[^"]+)"')


def storage_path(exc: BaseException) -> str | None:
    """The file a storage failure names (an OSError's filename, or the last quoted path in
    a wrapped message), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.filename:
            return os.fspath(exc.filename)
        paths = _QUOTED_PATH.findall(str(exc))
        if paths:
            return paths[-1]
        exc = exc.__cause__ or exc.__context__
    return None


def storage_message(exc: BaseException, what: str = "", fix: str = "") -> str:
    """One line for a storage failure: the problem, the path and the fix."""
    problem = storage_problem(exc) or "I/O error"
    path = storage_path(exc)
    where = f" writing {what}" if what else ""
    at = f" ({path})" if path and path not in what else ""
    return (f"{problem}{where}{at}: "
            + (fix or "free space, raise the quota or fix the permissions, then run the "
               "same command again"))


_TF_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\]( name: \S*)?")


def one_line(message: object) -> str:
    """``message`` on one line (multi-line details joined with '; '), in the project's
    words: TensorFlow's wrappers (``{{function_node ...}}``, ``[Op:...]``, AutoGraph's
    'in user code:' trace) are stripped."""
    text = str(message)
    if text.lstrip().startswith("in user code:"):
        # AutoGraph re-raises an exception from traced code with the trace in front of
        # the original 'Type: message' line, the last one.
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+: ", last) else last
    text = _TF_NODE.sub("", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
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
    if storage_problem(exc):  # also when wrapped by Orbax / TensorStore / TensorFlow
        return EXIT_IO
    if isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError,
                        IsADirectoryError, *input_errors)):
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError):
        return EXIT_IO
    return -1
