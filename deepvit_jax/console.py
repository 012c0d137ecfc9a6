"""The console and the log file of every command (used through ``deepvit_jax.cli``).

The console shows warnings and errors, printed through any progress bar so that a log line
never breaks it; INFO (and the libraries' per-step chatter) only with ``--verbose``.
TensorFlow's and XLA's C++ notices (e.g. the oneDNN notice) are hidden unless ``--verbose``:
``TF_CPP_MIN_LOG_LEVEL`` is set when the package is imported (``deepvit_jax/__init__.py``),
before any command imports TensorFlow, and the notices newer TensorFlow prints at import
whatever that says are filtered out of that import's stderr (``tf_notices.py``). A run's
``train.log`` (:func:`add_log_file`) gets INFO and above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

import tqdm

from deepvit_jax.errors import one_line, storage_problem
from deepvit_jax.utils import as_path, is_local

# Libraries that log every checkpoint / dataset / compile step at INFO.
_NOISY = ("orbax", "tensorflow_datasets", "jax/_src", "jax._src", "absl")


# Library warnings about what we do on purpose: Orbax's note that a CheckpointManager is
# read-only (evaluate, export, analysis read a run that may still be writing).
_EXPECTED = (("orbax", "Given directory is read only"),)


def _not_noisy(record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR and any(
            lib in record.pathname and str(record.msg).startswith(msg) for lib, msg in _EXPECTED):
        return False
    return record.levelno >= logging.WARNING or not any(
        k in record.pathname or record.name.startswith(k) for k in _NOISY)


def _not_a_duplicate(record: logging.LogRecord) -> bool:
    """asyncio's "exception was never retrieved" about a failed background write (Orbax's
    async save): the same failure is raised where the run waits for the save and is
    reported as the command's one error line; this echo of it comes later, at garbage
    collection, and would otherwise be the last line on the console. Orbax's own error
    records of a storage failure in its background save threads (a full disk) are the same
    failure, raised where the command waits for the save: also dropped. Both stay in
    train.log."""
    if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
        return False
    if record.levelno >= logging.ERROR and "orbax" in record.pathname:
        exc = record.exc_info[1] if record.exc_info else None
        if storage_problem(exc) or storage_problem(RuntimeError(record.getMessage())):
            return False
        if "background save thread" in record.getMessage():  # its summary of the same
            return False
    return True


def _closed_loop_echo(unraisable) -> bool:
    """``Event loop is closed`` raised in ``asyncio``'s ``call_soon_threadsafe``, reported
    as unraisable from a C++ thread: TensorStore prints one per write still in flight when
    Orbax's save fails (a full disk). Orbax runs the save in its own event loop and closes
    it at the first failed write (``asyncio_utils.run_sync``); the other writes'
    completion callbacks then find it closed. The failure itself is raised where the run
    waits for the save and is reported as the command's one error line."""
    if unraisable.exc_type is not RuntimeError or unraisable.object is not None:
        return False
    if str(unraisable.exc_value) != "Event loop is closed":
        return False
    tb, names = unraisable.exc_traceback, []
    while tb is not None:
        code = tb.tb_frame.f_code
        names.append((os.path.basename(code.co_filename), code.co_name))
        tb = tb.tb_next
    return bool(names) and names[0] == ("base_events.py", "call_soon_threadsafe")


def quiet_closed_loop_echoes() -> None:
    """Drop :func:`_closed_loop_echo` reports; every other unraisable exception goes to
    the hook that was there (Python's default prints it). Installed once."""
    previous = sys.unraisablehook
    if getattr(previous, "_deepvit", False):
        return

    def hook(unraisable):
        if not _closed_loop_echo(unraisable):
            previous(unraisable)

    hook._deepvit = True
    sys.unraisablehook = hook


class _ConsoleHandler(logging.StreamHandler):
    """stderr through ``tqdm.write``, so a log line never breaks a progress bar (what
    ``tqdm.contrib.logging.logging_redirect_tqdm`` does, but that handler drops the level and
    filters of the one it replaces)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {one_line(record.getMessage())}"


class LogFile(logging.FileHandler):
    """``train.log``. A write that fails (disk full, file removed) is the run's I/O error:
    raised in the main thread (exit status 4, one line) instead of logging's own
    ``--- Logging error ---`` traceback; the handler then stays silent. In other threads
    (Orbax's async saves) the error is kept and raised at the next main-thread record."""

    def __init__(self, path):
        super().__init__(os.fspath(path))
        self.failed: BaseException | None = None
        self._raised = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            super().emit(record)
        if (self.failed is not None and not self._raised
                and threading.current_thread() is threading.main_thread()):
            self._raised = True
            raise self.failed

    def close(self) -> None:
        """Closing flushes what a failed write left in the buffer: that fails again, and is
        the same failure (already kept in ``failed``), so it is not raised twice."""
        try:
            super().close()
        except OSError as e:
            if self.failed is None:
                self.failed = e

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            err = sys.exc_info()[1]
            if not isinstance(err, OSError):
                err = OSError(f"cannot write the log file: {err}")
            if not err.filename:
                err.filename = self.baseFilename
            self.failed = err


def setup_console(verbose: bool = False, *, quiet: bool = False,
                  library_warnings: bool = True) -> None:
    """The console of a command: warnings and errors on stderr through the progress bar
    (``quiet``: errors only, e.g. processes other than 0); INFO too with ``verbose``.
    Replaces absl's handler, so absl-logged library chatter follows the same rule;
    ``library_warnings=False`` also drops the warnings libraries log through absl (Orbax's
    notes on opening a checkpoint read-only are not a reader's concern)."""
    from absl import logging as absl_logging

    quiet_closed_loop_echoes()
    root = logging.getLogger()
    for h in list(root.handlers):
        if not isinstance(h, LogFile):
            root.removeHandler(h)
    console = _ConsoleHandler(sys.stderr)
    console.setFormatter(_Formatter())
    console.setLevel(logging.INFO if verbose else
                     (logging.ERROR if quiet else logging.WARNING))
    if not verbose:
        console.addFilter(_not_noisy)
    console.addFilter(_not_a_duplicate)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(
        logging.NOTSET if verbose or library_warnings else logging.ERROR)
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.raiseExceptions = verbose  # never logging's own tracebacks on the console


def add_log_file(path) -> LogFile | None:
    """Log INFO and above (without the libraries' per-step chatter) to ``path``; a local
    convenience: an object-store path (``gs://``) cannot be appended line by line."""
    if not is_local(path):
        return None
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    handler = LogFile(p)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_not_noisy)
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def remove_log_file(handler: LogFile | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        with contextlib.suppress(OSError):
            handler.close()
