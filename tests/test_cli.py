"""The command-line layer (deepvit_jax/cli.py): mistakes in --config and its overrides are
one line with exit status 2, a log file that cannot be written is the run's I/O error (exit
status 4, one line, no logging traceback), output guards, and log lines do not break the bar."""

import logging
import os
import subprocess
import sys
import threading

import pytest

from deepvit_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")
I1K = os.path.join(ROOT, "configs", "i1k.py")


@pytest.fixture(scope="module")
def main_flags():
    """The flags of deepvit_jax.main, defined once in this process."""
    from deepvit_jax import main  # noqa: F401 (defines the flags)


def _parse(args, capsys, monkeypatch) -> tuple[int, str]:
    argv = ["main", *args, "--workdir", "/tmp/unused"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from it
    with pytest.raises(SystemExit) as e:
        cli.parse_absl_flags(argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    return e.value.code, err


def test_unknown_config_field_names_the_nearest(main_flags, capsys, monkeypatch):
    code, err = _parse([f"--config={DEFAULT}", "--config.nonexistent=1"], capsys, monkeypatch)
    assert code == 2 and "--config.nonexistent" in err and "no field" in err
    code, err = _parse([f"--config={DEFAULT}", "--config.model.depht=3"], capsys, monkeypatch)
    assert code == 2 and "did you mean --config.model.depth?" in err
    code, err = _parse([f"--config={DEFAULT}", "--config.batch_sise=3"], capsys, monkeypatch)
    assert "did you mean --config.batch_size?" in err


def test_config_file_syntax_error_names_file_and_line(main_flags, capsys, monkeypatch, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return dict(a=1\n\n\nx = (\n")
    code, err = _parse([f"--config={bad}"], capsys, monkeypatch)
    assert code == 2 and f"{bad}:" in err and "syntax error" in err
    line = int(err.split(f"{bad}:")[1].split(":")[0])
    assert 2 <= line <= 5


def test_missing_config_file_is_bad_input(main_flags, capsys, monkeypatch, tmp_path):
    code, err = _parse([f"--config={tmp_path / 'nope.py'}"], capsys, monkeypatch)
    assert code == 2 and "nope.py: no such file" in err


def test_bad_literal_names_field_and_type(main_flags, capsys, monkeypatch):
    code, err = _parse([f"--config={DEFAULT}", "--config.batch_size=1e3"], capsys, monkeypatch)
    assert code == 2 and "config.batch_size takes a int" in err and "1e3" in err


def test_unknown_recipe_lists_the_known_ones(main_flags, capsys, monkeypatch):
    code, err = _parse([f"--config={I1K}:nope"], capsys, monkeypatch)
    assert code == 2 and "nope" in err and "deepvit_s" in err and "vit_16b" in err


def test_unknown_flag(main_flags, capsys, monkeypatch):
    code, err = _parse([f"--config={DEFAULT}", "--workdri=x"], capsys, monkeypatch)
    assert code == 2 and "unknown flag --workdri; did you mean --workdir?" in err


def test_main_exit_status_2_end_to_end(tmp_path):
    """Today's absl parsing exits 1 with 'FATAL Flags parsing error'; the contract is 2."""
    r = subprocess.run([sys.executable, "-m", "deepvit_jax.main", f"--config={DEFAULT}",
                        "--config.batch_size=1e3", f"--workdir={tmp_path / 'w'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line, nothing else
    assert "FATAL" not in r.stderr and not (tmp_path / "w").exists()


def test_log_file_failure_is_one_line_exit_4(tmp_path, capsys):
    """A full disk under train.log (here /dev/full): the run stops with its own one-line I/O
    error, never logging's '--- Logging error ---' traceback."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    path = tmp_path / "train.log"
    os.symlink("/dev/full", path)
    log = logging.getLogger("deepvit_jax.test_cli")
    raise_exc = logging.raiseExceptions
    cli.setup_console()
    handler = cli.add_log_file(path)
    try:
        def other_thread():  # a failure in another thread is kept, not raised there
            log.info("from a thread")

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert handler.failed is not None and "No space left" in str(handler.failed)

        def body():
            log.info("training row")  # raised here, in the main thread
            raise AssertionError("not reached")

        assert cli.run_cli(body) == 4
        err = capsys.readouterr().err
        assert "Logging error" not in err and "Traceback" not in err
        assert err.count("\n") == 1 and "train.log" in err and "no space left" in err.lower()
        log.info("after the failure")  # silent from now on
        assert capsys.readouterr().err == ""
    finally:
        cli.remove_log_file(handler)
        logging.raiseExceptions = raise_exc


def test_console_writes_through_the_progress_bar(capsys):
    """A warning while a bar is drawn goes through tqdm.write (the bar is redrawn below it),
    INFO stays off the console."""
    from tqdm import tqdm

    cli.setup_console()
    log = logging.getLogger("deepvit_jax.test_cli")
    calls = []
    orig = tqdm.write
    tqdm.write = classmethod(lambda cls, s, file=None, end="\n", nolock=False:
                             calls.append(s))
    try:
        log.warning("input-bound")
        log.info("chatter")
    finally:
        tqdm.write = orig
    assert calls == ["warning: input-bound"]


def test_check_output(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    with pytest.raises(cli.InputError, match="would write into the input"):
        cli.check_output(str(src / "x.json"), [str(src)])
    with pytest.raises(cli.InputError, match=r"ending in \.npy"):
        cli.check_output(str(tmp_path / "x.txt"), [], suffix=".npy")
    (tmp_path / "old.npy").write_bytes(b"")
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli.check_output(str(tmp_path / "old.npy"), [], suffix=".npy", overwrite=False)
    assert cli.check_output("rel.json", []) == os.path.abspath("rel.json")


def test_tensorflow_import_notices_are_filtered_and_errors_kept(capfd):
    """What TensorFlow writes to fd 2 while it is imported: its INFO / WARNING notices are
    dropped (TF_CPP_MIN_LOG_LEVEL does not reach them), anything else is written through."""
    from deepvit_jax.tf_notices import filtered_stderr

    notice = ("WARNING: All log messages before absl::InitializeLog() is called are written "
              "to STDERR\nI0000 00:00:1796577370.643258    3405 port.cc:153] oneDNN custom "
              "operations are on.\nW0000 00:00:1796577370.643258    3405 cpu.cc:7] a warning\n")
    with filtered_stderr():
        os.write(2, notice.encode())
        os.write(2, b"E0000 00:00:1796577370.643258    3405 x.cc:1] a real error\n")
        print("a Python warning", file=sys.stderr)
    err = capfd.readouterr().err
    # (under capfd, sys.stderr is pytest's own: the Python line may come first)
    assert sorted(err.splitlines()) == [
        "E0000 00:00:1796577370.643258    3405 x.cc:1] a real error", "a Python warning"]
    # The package installs it: importing TensorFlow after deepvit_jax prints no notice.
    r = subprocess.run([sys.executable, "-c", "import deepvit_jax, tensorflow"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_reading_a_run_prints_no_orbax_read_only_warnings(tmp_path, caplog):
    """A read-only CheckpointManager (evaluate, export, analysis) sets what read-only implies
    itself, so Orbax has nothing to override and warn about; its unconditional note that the
    directory is read-only is kept off the console and train.log."""
    import logging

    from deepvit_jax import console, workdir

    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level(logging.WARNING):
        workdir.read_only_manager(tmp_path / "checkpoints").close()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "CheckpointManagerOptions" in m], messages
    noted = [r for r in caplog.records if r.getMessage().startswith("Given directory is read")]
    assert noted and not any(console._not_noisy(r) for r in noted)
    other = logging.LogRecord("absl", logging.WARNING, "/x/orbax/checkpoint/y.py", 1,
                              "something else", None, None)
    assert console._not_noisy(other)  # other Orbax warnings still reach the console
