"""tests/conftest.py: under CI=true a test skipped for a missing import fails the run."""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_missing_import_fails_in_ci_and_skips_locally(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs_extra.py").write_text(
        "import pytest\n"
        "pytest.importorskip('no_such_module_deepvit_xyz')\n\n"
        "def test_a():\n    pass\n")
    (tmp_path / "test_inside.py").write_text(
        "import pytest\n\n"
        "def test_b():\n    pytest.importorskip('no_such_module_deepvit_xyz')\n\n"
        "def test_c():\n    pytest.skip('not applicable here')\n")

    def run(ci, target=tmp_path):
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci:
            env["CI"] = "true"
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-p", "no:xdist", str(target)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    local = run(ci=False)
    assert local.returncode == 0, local.stdout[-2000:]
    assert "3 skipped" in local.stdout
    # a module-level import skip: a collection error
    ci = run(ci=True)
    assert ci.returncode != 0 and "ERROR collecting test_needs_extra.py" in ci.stdout
    assert "pip install -e '.[dev]'" in ci.stdout
    # inside a test: a failure; an ordinary skip stays a skip
    ci = run(ci=True, target=tmp_path / "test_inside.py")
    assert ci.returncode == 1 and "1 failed, 1 skipped" in ci.stdout, ci.stdout[-2000:]
