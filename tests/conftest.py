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
    from deepvit_jax.data.dataset import dataset_info

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


# Seconds each long test took (``pytest -n 2 --durations=40`` on the 2-core CI machine,
# setup included). Only the order depends on them: xdist hands tests out in collection
# order, and a 3-minute test started last leaves the other worker idle for 3 minutes.
# Modules stay contiguous (their module-scoped fixtures run once per worker).
_LONG_S = {
    "test_multiprocess.py::test_sigterm_to_one_process_stops_both_then_two_process_resume": 219,
    "test_fault_injection.py::test_sigkill_at_any_point_then_exact_completion": 208,
    "test_main.py::test_exact_resume_after_sigterm_and_kill": 175,
    "test_reliability2.py::test_full_disk_during_training_exits_4_and_the_rerun_loses_nothing":
        172,
    "test_main.py::test_default_config_shortened_converges": 83,
    "test_main.py::test_one_vs_eight_devices_same_loss_curve": 73,
    "test_reliability.py::test_signal_during_evaluation_saves_and_resumes_the_evaluation": 62,
    "test_reliability2.py::test_sighup_saves_and_resumes_like_sigterm": 60,
    "test_notebooks.py::test_attention_collapse_notebook": 55,
    "test_evaluate.py::test_cli_two_processes_four_devices": 39,
    "test_reliability.py::test_resume_refusals_and_fallback": 39,
    "test_main.py::test_init_from_starts_from_the_saved_weights": 36,
    "test_reliability2.py::test_simultaneous_takeovers_of_a_stale_lock_have_one_owner": 35,
    "test_drive_mirror.py::test_new_runtime_resumes_exactly_from_the_mirrored_drive_workdir": 33,
    "test_data_array_record.py::test_worker_processes_give_the_in_process_stream_and_stop": 32,
    "test_aot.py::test_command_reports_a_tiny_config": 28,
}


def pytest_collection_modifyitems(config, items):
    def seconds(item):
        path, _, name = item.nodeid.partition("::")
        return _LONG_S.get(f"{os.path.basename(path)}::{name.split('[')[0]}", 0)

    module_s, first = {}, {}
    for i, item in enumerate(items):
        m = item.nodeid.partition("::")[0]
        module_s[m] = max(module_s.get(m, 0), seconds(item))
        first.setdefault(m, i)
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (-module_s[it.nodeid.partition("::")[0]],
                               first[it.nodeid.partition("::")[0]], -seconds(it),
                               order[id(it)]))
