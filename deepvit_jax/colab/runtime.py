"""The runtime a notebook runs on (the accelerator JAX sees, or why it sees none), Google
Drive, and the training workdir on it."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import sys

import jax

from deepvit_jax.workdir import latest_step
from deepvit_jax.workdir_lock import WorkdirLock

# Where Drive is mounted (Colab: /content/drive); the tests mount a stand-in elsewhere.
DRIVE_MOUNT = os.environ.get("DEEPVIT_DRIVE_MOUNT", "/content/drive")
DRIVE_ROOT = DRIVE_MOUNT + "/MyDrive"


def say(line: str) -> None:
    """One line for the notebook reader (stdout, flushed so it shows before long cells)."""
    print(line, flush=True)


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or importlib.util.find_spec("google.colab") is not None


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The accelerator JAX sees. ``config_arg`` is the matching ``configs/colab.py`` runtime."""

    platform: str  # 'tpu' | 'gpu' | 'cpu'
    device_kind: str
    device_count: int
    config_arg: str

    @property
    def accelerated(self) -> bool:
        return self.platform != "cpu"

    def __str__(self) -> str:
        return f"{self.device_kind} x{self.device_count} ({self.platform})"


def config_arg(platform: str, kind: str, count: int) -> str:
    if platform == "gpu":
        return "gpu"
    if platform == "tpu":
        k = kind.lower()
        if "v2" in k or "v3" in k or count > 1:
            return "tpu_v2_8"
        return "tpu_v5e1"
    return "cpu_small"


def _unused_accelerator() -> str | None:
    """An accelerator the machine has but JAX does not use (wrong jax build), if any."""
    if glob.glob("/dev/accel[0-9]*") or os.environ.get("COLAB_TPU_ADDR") or os.environ.get(
            "TPU_ACCELERATOR_TYPE"):
        return "TPU"
    if glob.glob("/dev/nvidia[0-9]*"):
        return "GPU"
    return None


def detect_runtime(verbose: bool = True) -> Runtime:
    """The platform JAX runs on, printed as one line; on CPU, what to do for full size."""
    devices = jax.devices()
    platform = devices[0].platform  # 'tpu', 'gpu' (CUDA / ROCm) or 'cpu'
    kind = getattr(devices[0], "device_kind", platform)
    rt = Runtime(platform, kind, len(devices), config_arg(platform, kind, len(devices)))
    if verbose:
        if rt.accelerated:
            say(f"runtime: {rt}, jax {jax.__version__}; configs/colab.py:{rt.config_arg}")
        else:
            unused = _unused_accelerator()
            how = ("pip install -U 'jax[tpu]'" if unused == "TPU" else
                   "the CUDA build, https://docs.jax.dev/en/latest/installation.html")
            fix = (f"this machine has a {unused} that JAX does not see: install JAX for it "
                   f"({how}) and restart the runtime" if unused else
                   "for full size pick Runtime > Change runtime type > TPU or GPU")
            say(f"runtime: no accelerator, running on CPU at small size "
                f"(configs/colab.py:cpu_small); {fix}")
    return rt



def mount_drive(mount_point: str = DRIVE_MOUNT) -> bool:
    """Mount Google Drive on Colab; elsewhere (or if mounting fails) say why and return False."""
    if not in_colab():
        say("Google Drive: not a Colab runtime, so nothing to mount; paths are local")
        return False
    try:
        from google.colab import drive

        drive.mount(mount_point)
    except Exception as e:  # the user declined, or Drive is unreachable
        say(f"Google Drive: not mounted ({str(e).splitlines()[0] if str(e) else type(e)}); "
            f"run this cell again and allow access, or use a local path")
        return False
    return os.path.isdir(os.path.join(mount_point, "MyDrive"))


def on_unmounted_drive(path: str) -> bool:
    p = os.path.abspath(os.path.expanduser(path))
    return p.startswith(DRIVE_MOUNT + "/") and not os.path.isdir(DRIVE_ROOT)


def drive_or_local(path: str, what: str = "output", local_root: str = "runs") -> str:
    """``path``, or ``local_root/<its name>`` (saying so in one line) when ``path`` lies on a
    Google Drive that is not mounted."""
    path = os.path.expanduser(path)
    if not on_unmounted_drive(path):
        return path
    local = os.path.abspath(os.path.join(local_root, os.path.basename(path.rstrip("/"))))
    say(f"{what}: Google Drive is not mounted, so using {local}, which a disconnected "
        f"runtime loses; run the Drive cell (mount_drive) to keep it at {path}")
    return local


def resolve_workdir(path: str, local_root: str = "runs", *,
                    take_over_lock: bool | None = None) -> str:
    """``path`` (created), or a local folder when it lies on a Drive that is not mounted.

    Prints where the run lives and whether it resumes (its latest checkpoint). A run holds
    ``WORKDIR/lock`` (host and pid) while it trains; a runtime that disconnected never
    removes it, and the next runtime is another host, which the training loop refuses
    (it cannot tell whether that host still runs). ``take_over_lock`` (default: on Colab)
    removes a lock of another host, saying so: one Colab runtime per workdir."""
    path = drive_or_local(path, "workdir", local_root)
    os.makedirs(path, exist_ok=True)
    if (in_colab() if take_over_lock is None else take_over_lock) and (
            host := WorkdirLock(path).take_over_from_other_host()):
        say(f"workdir: removed the lock of the runtime that trained here before (host {host}, "
            f"now gone); do not train into one workdir from two runtimes at once")
    step = latest_checkpoint(path)
    say(f"workdir: {path}" + (f" (holds checkpoint step {step}: training resumes from it)"
                              if step is not None else " (new run)"))
    return path


def latest_checkpoint(workdir: str) -> int | None:
    """The latest complete training checkpoint step in ``workdir/checkpoints``, or None."""
    return latest_step(workdir)
