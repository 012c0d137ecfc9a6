"""``deepvit_jax.drive_mirror``: train on local disk, mirror to a (stand-in) Drive workdir, and
a new runtime (a fresh local folder) resumes from Drive to exactly the parameters of an
uninterrupted run. Also reports the bytes each way writes to Drive."""

import shutil

import numpy as np
import pytest
from test_main import _final_state

TINY = {"model.embed_dim": 16, "model.depth": 2, "model.num_heads": 2,
        "model.reattn_blocks": [0, 1], "batch_size": 32, "log_every_steps": 1,
        "eval.bn_recalibration_batches": 0, "ema_decay": 0.0, "eval.batch_size": 120,
        "total_steps": 6, "eval.every_steps": 1000, "checkpoint.every_steps": 2}


class _RuntimeGone(Exception):
    pass


def test_new_runtime_resumes_exactly_from_the_mirrored_drive_workdir(tmp_path, data_dir,
                                                                       capsys):
    from deepvit_jax.colab import load_config
    from deepvit_jax.drive_mirror import DriveMirror, _tree_bytes
    from deepvit_jax.train.loop import train_and_evaluate

    config = load_config("default.py", {**TINY, "data.data_dir": data_dir})
    # Reference: the whole run in one workdir (as Orbax on Drive would write it).
    train_and_evaluate(config, str(tmp_path / "once"))
    ref_step, ref = _final_state(tmp_path / "once")
    assert ref_step == 6
    per_ckpt = _tree_bytes(tmp_path / "once" / "checkpoints" / "6")

    drive = tmp_path / "drive" / "run"

    def gone_at_5(step, run):
        if step == 5:
            raise _RuntimeGone

    # Runtime 1 trains locally, mirrored, and disconnects at step 5 (checkpoint 4 saved).
    with pytest.raises(_RuntimeGone), DriveMirror(str(drive), str(tmp_path / "local1"),
                                                  min_interval_s=0, poll_s=0.05) as local:
        train_and_evaluate(config, local, on_step=gone_at_5)
    assert sorted(p.name for p in (drive / "checkpoints").iterdir()) == ["4"]
    assert (drive / "metrics.jsonl").is_file() and not (drive / "lock").exists()
    shutil.rmtree(tmp_path / "local1")  # the runtime's disk is gone

    # Runtime 2: a fresh local folder, resumed from Drive.
    mirror = DriveMirror(str(drive), str(tmp_path / "local2"), min_interval_s=1e9)
    with mirror as local:
        train_and_evaluate(config, local)
    out = capsys.readouterr().out
    assert f"copied checkpoint step 4 from {drive}" in out
    step, got = _final_state(drive)
    assert step == 6 and sorted(p.name for p in (drive / "checkpoints").iterdir()) == ["6"]
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"resumed from Drive: {k}")
    # With min_interval_s past the run, Drive got one checkpoint, at the end (step 6), and
    # not again the step 4 it came from. (The small run files are copied whenever they
    # change: their bytes depend on the run's speed.)
    assert mirror.checkpoint_bytes_written == _tree_bytes(drive / "checkpoints" / "6")
    assert mirror.checkpoint_bytes_written < 1.5 * per_ckpt
    print(f"\nbytes per checkpoint {per_ckpt}; runtime 2 wrote {mirror.bytes_written} to Drive "
          f"for 2 local checkpoints (direct Orbax on Drive: {2 * per_ckpt}+)")
