"""Install deepvit-jax on a runtime that already has its accelerator stack (Colab) without
changing that stack. The notebooks' install cell runs it from the clone, before the package
is importable (so: standard library only):

    %run /content/deepvit-jax/deepvit_jax/colab_install.py /content/deepvit-jax --torch

What a plain ``pip install -e DIR`` gets wrong on such a runtime, and what this does instead:

* pip resolves the newest flax, whose jax floor may upgrade jax/jaxlib past the runtime's
  ``libtpu`` or ``jax-cuda*-plugin`` (JAX then silently drops to CPU). Here every installed
  release of the stack (:data:`KEEP`: jax, jaxlib, libtpu, the CUDA/ROCm plugins, TensorFlow,
  Keras, TensorBoard, PyTorch, NumPy, ml_dtypes, protobuf, the NVIDIA libraries) becomes a pip
  constraint (``NAME==VERSION``), so pip adds what is missing and picks releases of the rest
  (flax, optax, orbax, ...) that fit, but never changes those.
* ``tensorflow-cpu`` (our Linux requirement) would install over a preinstalled
  ``tensorflow`` into the same folder. Environment markers cannot see what is installed, so
  where a TensorFlow is installed the package is built from a copy whose TensorFlow
  requirement names that distribution (same floor): satisfied as it is, ``pip check`` clean.
* The notebooks also import scikit-image, gdown and IPython: the ``colab`` extra.
* Converting the official weights needs PyTorch: ``--torch`` installs the CPU build of
  :data:`TORCH` only where no torch is installed (Colab ships one).
* A jax older than our floor cannot be fixed by pip without breaking the accelerator: one
  line says what to do, before anything is installed.

Afterwards it runs ``pip check`` (a problem that was not there before fails the install)
and prints one line: what was installed and that the stack is unchanged.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

# Installed distributions the install must not change (regular expressions on the
# normalised name).
KEEP = (r"jax", r"jaxlib", r"libtpu(-nightly)?", r"jax-cuda\d+-(plugin|pjrt)",
        r"jax-rocm\d*-(plugin|pjrt)", r"jax-tpu.*", r"tensorflow(-cpu|-gpu|-macos|-intel)?",
        r"tf-nightly.*", r"tensorflow-(io|io-gcs-filesystem|text|probability|estimator)",
        r"tf-keras", r"keras", r"tensorboard(-data-server)?", r"torch", r"torchvision",
        r"torchaudio", r"numpy", r"ml-dtypes", r"protobuf", r"nvidia-.*", r"triton")
_KEEP = re.compile("|".join(f"(?:{k})" for k in KEEP))
# Distributions that provide the ``tensorflow`` module: any one of them satisfies us.
TENSORFLOWS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos",
               "tensorflow-intel", "tf-nightly", "tf-nightly-cpu")
# The PyTorch CPU build installed where conversion needs torch and none is installed.
TORCH = "torch==2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def say(line: str) -> None:
    print(line, flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{normalised name: version} of every distribution on this interpreter's path."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def kept(dists: dict[str, str]) -> dict[str, str]:
    """The installed distributions of the stack (:data:`KEEP`)."""
    return {n: v for n, v in sorted(dists.items()) if _KEEP.fullmatch(n)}


def _version(text: str):
    try:
        from packaging.version import Version
    except ImportError:  # pip vendors packaging; every Python with pip has it
        from pip._vendor.packaging.version import Version
    return Version(text)


def _req_name(req: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def requirements(src: Path, extras: list[str]) -> list[str]:
    """``[project] dependencies`` plus the ``extras`` of ``src/pyproject.toml``, as pip
    requirement strings (markers kept; an extra naming the project itself expanded)."""
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    name = canonical(project["name"])
    optional = project.get("optional-dependencies", {})
    reqs, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise SystemExit(f"install: {src}/pyproject.toml has no extra {extra!r} "
                             f"(it has {', '.join(sorted(optional))})")
        for req in optional[extra]:
            if _req_name(req) == name:  # deepvit-jax[torch] inside another extra
                todo.extend(e.strip() for e in re.search(r"\[(.*)\]", req).group(1).split(","))
            else:
                reqs.append(req)
    return list(dict.fromkeys(reqs))


def floor(reqs: list[str], name: str) -> str | None:
    for req in reqs:
        if _req_name(req) == name:
            m = re.search(r">=\s*([0-9][^,;\s]*)", req)
            if m:
                return m.group(1)
    return None


def plan(src: Path, extras: list[str], dists: dict[str, str], *, torch: bool,
         constraints: str) -> list[list[str]]:
    """The pip commands (argument lists after ``python -m pip``) for this runtime; raises
    SystemExit with one line when it cannot be done without changing the stack."""
    reqs = requirements(src, extras)
    jax_floor = floor(reqs, "jax")
    if "jax" in dists and jax_floor and _version(dists["jax"]) < _version(jax_floor):
        raise SystemExit(
            f"install: this runtime has jax {dists['jax']}, deepvit-jax needs jax>={jax_floor};"
            f" upgrade JAX together with its accelerator plugin (pip install -U 'jax[tpu]' on "
            f"a TPU, 'jax[cuda12]' on a GPU), restart the runtime (Runtime > Restart session) "
            f"and run this cell again")
    have_tf = [n for n in TENSORFLOWS if n in dists]
    target = str(src)
    if have_tf:  # keep that TensorFlow; never a second one over it
        target = str(_with_tensorflow(src, have_tf[0], Path(constraints).parent))
    extras_part = f"[{','.join(extras)}]" if extras else ""
    cmds = [["install", "-U", "-c", constraints, target + extras_part]]
    if torch and "torch" not in dists:
        cmds.append(["install", TORCH, "--index-url", TORCH_INDEX])
    return cmds


def _with_tensorflow(src: Path, tf_name: str, tmp: Path) -> Path:
    """A copy of ``src`` whose TensorFlow requirement names the distribution installed
    (``tensorflow`` on Colab) instead of ``tensorflow-cpu``: satisfied as it is, so pip
    installs no second TensorFlow and ``pip check`` stays clean."""
    import shutil

    copy = tmp / "src"
    shutil.copytree(src, copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__"))
    pyproject = copy / "pyproject.toml"
    lines = []
    for line in pyproject.read_text().splitlines(keepends=True):
        m = re.match(r'(\s*)"tensorflow(?:-cpu)?\s*(>=[^;"]*)[^"]*"', line)
        if m:
            line = f'{m.group(1)}"{tf_name}{m.group(2)}",\n'
        lines.append(line)
    pyproject.write_text("".join(lines))
    return copy


def pip(args: list[str], *, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    if not capture and "install" in args:
        cmd.insert(4, "-q")
    return subprocess.run(cmd, text=True, capture_output=capture, check=False)


def _problems() -> set[str]:
    return {line for line in pip(["check"], capture=True).stdout.splitlines()
            if line.strip() and not line.startswith("No broken requirements")}


def install(src: str | os.PathLike, extras: list[str] | None = None, *, torch: bool = False
            ) -> dict[str, str]:
    """Install ``src`` (the package's source folder) with ``extras`` (default ``colab``)
    without changing the runtime's stack; returns the versions kept."""
    src = Path(src).resolve()
    if not (src / "pyproject.toml").is_file():
        raise SystemExit(f"install: no pyproject.toml in {src}; clone the repository there "
                         f"first (git clone https://github.com/OWNER/deepvit-jax {src})")
    before = installed()
    stack = kept(before)
    before_problems = _problems()
    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(tmp, "constraints.txt")
        with open(constraints, "w") as f:
            f.writelines(f"{n}=={v}\n" for n, v in stack.items())
        for args in plan(src, ["colab"] if extras is None else extras, before, torch=torch,
                         constraints=constraints):
            if pip(args).returncode != 0:
                what = " ".join(a for a in args if not a.startswith(tmp))
                raise SystemExit(
                    f"install: pip {what[:200]} failed (above); the runtime's stack was kept "
                    f"as it was ({', '.join(f'{n} {v}' for n, v in stack.items()) or 'none'})")
    after = installed()
    changed = {n: (v, after.get(n)) for n, v in stack.items() if after.get(n) != v}
    if changed:  # cannot happen through the constraints; said loudly if it ever does
        raise SystemExit("install: changed the runtime's " + ", ".join(
            f"{n} {a} -> {b}" for n, (a, b) in changed.items()) + "; restart the runtime")
    new_problems = sorted(_problems() - before_problems)
    if new_problems:
        raise SystemExit("install: pip check found new problems: " + "; ".join(new_problems))
    names = ("jax", "jaxlib", "libtpu", "tensorflow", "tensorflow-cpu", "torch")
    shown = ", ".join(f"{n} {stack[n]}" for n in names if n in stack)
    added = sorted(set(after) - set(before))
    say(f"install: deepvit-jax {after.get('deepvit-jax', '?')} from {src}; kept "
        f"{shown or 'no preinstalled stack'} unchanged; {len(added)} packages added; "
        f"pip check: no new problems")
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[1]),
                        help="the repository's folder (default: the one this file is in)")
    parser.add_argument("--extras", default="colab", help="comma-separated extras (colab)")
    parser.add_argument("--torch", action="store_true",
                        help=f"install {TORCH} (CPU build) if no torch is installed")
    args = parser.parse_args(argv)
    install(args.src, [e for e in args.extras.split(",") if e], torch=args.torch)
    return 0


if __name__ == "__main__":
    main()
