"""TensorFlow's C++ start-up notices kept off the console (unless ``--verbose``).

TensorFlow 2.19+ prints notices while it is imported (the oneDNN notice, "All log messages
before absl::InitializeLog() ...") straight to file descriptor 2, before its logging honours
``TF_CPP_MIN_LOG_LEVEL`` (tensorflow/tensorflow#100442). No TensorFlow or absl setting
reaches them, so :func:`install` (called by ``deepvit_jax/__init__.py``) wraps the first
import of ``tensorflow`` - whoever imports it: our data modules, TFDS, a notebook - and
drops those INFO / WARNING lines from what it wrote to stderr; everything else (errors,
Python warnings) is written through. Standard library only: it runs before any other import.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# absl's preamble, and C++ log lines at INFO / WARNING level (glog format: I0000 00:00:...).
NOTICE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"
                    r"|[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w./-]+:\d+\] ")


@contextlib.contextmanager
def filtered_stderr():
    """Within the block, what is written to fd 2 is held back; on exit it is written to
    stderr without the lines matching :data:`NOTICE`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not NOTICE.match(line))
            if kept:
                os.write(2, kept.encode())


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` (through the other finders) and runs its import in
    :func:`filtered_stderr`; removes itself after that one import."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with filtered_stderr():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


def install() -> None:
    """Quiet the first ``import tensorflow`` of this process (a no-op once it is imported)."""
    if "tensorflow" not in sys.modules and not any(
            isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
