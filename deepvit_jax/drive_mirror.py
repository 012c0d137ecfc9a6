"""Train on fast local disk, keep the run on Google Drive: a background mirror.

Orbax writing straight into a Drive (FUSE) workdir writes every checkpoint there, with its
temporary directories and renames, at Drive's speed. Instead the loop trains into a local
workdir and :class:`DriveMirror` copies it to the Drive workdir in a background thread:

* on entry, the Drive workdir's latest checkpoint (and its logs) is copied to the local
  workdir if the local one has nothing newer: a new runtime resumes from Drive;
* while training, the newest complete checkpoint (Orbax renames a step's directory into place
  only when it is complete) is copied to ``DRIVE/checkpoints/<step>.partial`` and renamed to
  ``<step>``, at most once every ``min_interval_s`` seconds; older steps on Drive are then
  removed (Drive keeps the latest). Everything outside ``checkpoints/`` (metrics, TensorBoard,
  logs) is copied when it changed;
* on exit (also after an exception or an interrupt) the last checkpoint is mirrored.

    with DriveMirror(drive_workdir, local_copy(drive_workdir)) as local:
        train_and_evaluate(config, local)
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from deepvit_jax.colab import DRIVE_MOUNT

SKIP = {"lock"}  # the local run's lock belongs to the local workdir only


def local_copy(workdir: str, local_root: str = "local_runs") -> str:
    """The local folder a workdir on Google Drive trains in (``local_runs/<name>`` under the
    working directory, ``/content`` on Colab); any other workdir is its own."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if not path.startswith(os.path.abspath(DRIVE_MOUNT) + os.sep):
        return workdir
    return os.path.abspath(os.path.join(local_root, os.path.basename(path.rstrip("/"))))


def _steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class DriveMirror:
    """Context manager: yields the local workdir; mirrors it to ``remote`` meanwhile."""

    def __init__(self, remote: str, local: str, *, min_interval_s: float = 600.0,
                 poll_s: float = 5.0, verbose: bool = True):
        self.remote, self.local = Path(remote), Path(local)
        self.min_interval_s, self.poll_s, self.verbose = min_interval_s, poll_s, verbose
        self.mirrored_step: int | None = None
        self.bytes_written = 0  # to the remote workdir, all files
        self.checkpoint_bytes_written = 0  # of which checkpoints
        self._last = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _say(self, line: str) -> None:
        if self.verbose:
            print(line, flush=True)

    # -- copying -------------------------------------------------------------------------

    def _copy_small_files(self, src: Path, dst: Path) -> int:
        """Files outside ``checkpoints/`` that are new or changed (size or mtime)."""
        written = 0
        for f in src.rglob("*"):
            rel = f.relative_to(src)
            if not f.is_file() or rel.parts[0] in ("checkpoints", *SKIP):
                continue
            target = dst / rel
            st = f.stat()
            if target.exists():
                tt = target.stat()
                if tt.st_size == st.st_size and tt.st_mtime >= st.st_mtime:
                    continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            written += st.st_size
        return written

    def _copy_step(self, src_root: Path, dst_root: Path, step: int) -> int:
        partial = dst_root / f"{step}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src_root / str(step), partial)
        final = dst_root / str(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return _tree_bytes(final)

    def sync(self, force: bool = False) -> None:
        """Mirror the newest complete local checkpoint (if due) and the changed files."""
        with self._lock:
            steps = _steps(self.local / "checkpoints")
            due = force or time.monotonic() - self._last >= self.min_interval_s
            if steps and steps[-1] != self.mirrored_step and due:
                remote_ckpts = self.remote / "checkpoints"
                remote_ckpts.mkdir(parents=True, exist_ok=True)
                n = self._copy_step(self.local / "checkpoints", remote_ckpts, steps[-1])
                self.bytes_written += n
                self.checkpoint_bytes_written += n
                for old in _steps(remote_ckpts):
                    if old != steps[-1]:
                        shutil.rmtree(remote_ckpts / str(old), ignore_errors=True)
                self.mirrored_step = steps[-1]
                self._last = time.monotonic()
            self.bytes_written += self._copy_small_files(self.local, self.remote)

    def restore(self) -> int | None:
        """Copy the remote's latest checkpoint and files into the local workdir when the
        local one has no newer checkpoint; returns the step copied (or None)."""
        remote_steps = _steps(self.remote / "checkpoints")
        local_steps = _steps(self.local / "checkpoints")
        if not remote_steps or (local_steps and local_steps[-1] >= remote_steps[-1]):
            return None
        step = remote_steps[-1]
        (self.local / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._copy_step(self.remote / "checkpoints", self.local / "checkpoints", step)
        self._copy_small_files(self.remote, self.local)
        self.mirrored_step = step
        self._say(f"workdir: copied checkpoint step {step} from {self.remote} to {self.local} "
                  f"(training resumes from it)")
        return step

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync()
            except OSError as e:  # Drive briefly unreachable: try again at the next poll
                self._say(f"workdir: mirroring to {self.remote} failed ({e}); retrying")

    def __enter__(self) -> str:
        if self.local.resolve() == self.remote.resolve():  # not on Drive: nothing to mirror
            self._thread = None
            return str(self.local)
        self.local.mkdir(parents=True, exist_ok=True)
        self.remote.mkdir(parents=True, exist_ok=True)
        self.restore()
        self._last = time.monotonic()  # the first mirror after min_interval_s (or at exit)
        self._thread = threading.Thread(target=self._run, name="drive-mirror", daemon=True)
        self._thread.start()
        self._say(f"workdir: training in {self.local} (local disk), mirrored to {self.remote} "
                  f"at most every {self.min_interval_s:g} s and when training stops")
        return str(self.local)

    def __exit__(self, *exc) -> None:
        if self.local.resolve() == self.remote.resolve():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync(force=True)
        self._say(f"workdir: mirrored checkpoint step {self.mirrored_step} to {self.remote} "
                  f"({self.bytes_written / 1e6:.1f} MB written there by this runtime)")
