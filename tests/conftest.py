"""Shared test set-up: quiet TensorFlow, float32 everywhere, and under CI a test that skips
because a dependency cannot be imported is a failure (the dev extras must be installed)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's persistent compilation cache, shared by the tests, the xdist workers and the
# training runs they start as subprocesses (they inherit the environment): the same tiny
# models are compiled dozens of times otherwise. Keys are hashes of the compiled program,
# so a change to the code compiles afresh.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest

MISSING_IMPORT = "could not import"  # the reason pytest.importorskip gives


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir with the embedded digits prepared, once per test session (worker)."""
    from deepvit_jax.data.config import digits_data_config
    from deepvit_jax.data.pipeline import dataset_info

    cfg = digits_data_config()
    cfg.data_dir = str(tmp_path_factory.mktemp("tfds"))
    dataset_info(cfg)
    return cfg.data_dir


@pytest.fixture
def ram_scheme(monkeypatch):
    """``ram://`` (TensorFlow's in-memory filesystem) routed through etils.epath's
    tf.io.gfile backend, as ``gs://`` is: paths that no os.path call can handle.

    An object store replaces an object on each write; TensorFlow's RAM filesystem appends
    when a file is opened for writing again. ``write_text`` / ``write_bytes`` on ``ram://``
    therefore write a new file and rename it over the old one (one atomic step there), as
    an object write is."""
    import uuid

    import tensorflow as tf
    from etils.epath import backend, gpath, register

    monkeypatch.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "ram://"))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)

    def replacing(write):
        def replace(self, data, *args, **kwargs):
            if not str(self).startswith("ram://"):
                return write(self, data, *args, **kwargs)
            tmp = type(self)(f"{self}.new-{uuid.uuid4().hex}")
            n = write(tmp, data, *args, **kwargs)
            tf.io.gfile.rename(str(tmp), str(self), overwrite=True)
            return n
        return replace

    monkeypatch.setattr(gpath.PosixGPath, "write_text", replacing(gpath.PosixGPath.write_text))
    monkeypatch.setattr(gpath.PosixGPath, "write_bytes",
                        replacing(gpath.PosixGPath.write_bytes))
    yield f"ram://bucket-{uuid.uuid4().hex[:8]}/run"


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    """Parity tests compare with PyTorch at 1e-5: use full-precision matmuls on any backend."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_missing_import(report):
    if report.skipped and _in_ci() and MISSING_IMPORT in str(report.longrepr):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"CI=true: {reason}. A dependency the tests need is missing: "
                           "pip install -e '.[dev]' (and vit-pytorch, see .ci/run)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_import(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_import(outcome.get_result())
