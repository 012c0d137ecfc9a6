"""Issue 24: reliability, second round (continued). One section per case of
docs/reliability.md that this round added:

* conversions that cannot silently zero a model: integer / boolean weights refused, NaN /
  inf refused unless --allow-nonfinite, a dtype / range summary per group of tensors;
* outputs two writers cannot corrupt: of two concurrent writers of one output exactly one
  wins and the other exits 3; temporary names are marked and only ours are removed;
* a full disk while writing an output: one line, exit 4;
* image inputs with a pixel limit (decompression bombs refused from the header);
* nothing the user made replaced silently (a workdir with another run's files);
* config values checked for meaning; prepare --val-fraction.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_predict import model_dir  # noqa: E402,F401  (a small 1000-class model directory)


# ---------------------------------------------------------------------------------------
# Conversions that check what they write
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vp_file(tmp_path_factory):
    """A tiny vit-pytorch DeepViT state dict (2 blocks, dim 32, 32 px)."""
    from deepvit_jax.reference.vit_pytorch import load_deepvit_class

    torch.manual_seed(0)
    ref = load_deepvit_class()(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2,
                               heads=4, mlp_dim=64, dim_head=8).eval()
    path = tmp_path_factory.mktemp("vp") / "vp.pt"
    torch.save(ref.state_dict(), path)
    return path, ref.state_dict()


def _convert(args, capsys):
    from deepvit_jax.convert.__main__ import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_convert_refuses_integer_weights_and_nonfinite_unless_allowed(vp_file, tmp_path,
                                                                     capsys):
    _, sd = vp_file
    # An int64 cast (weights ~0.1 -> 0): before, an all-zero model was written, exit 0.
    ints = {k: (v * 100).to(torch.int64) for k, v in sd.items()}
    ints["transformer.layers.0.0.reattn_weights"] = sd["transformer.layers.0.0.reattn_weights"]
    torch.save(ints, tmp_path / "ints.pt")
    out = tmp_path / "m"
    rc, err = _convert([tmp_path / "ints.pt", "--out", out], capsys)
    assert rc == 2 and not out.exists(), err
    assert f"{len(sd) - 1} of the vit-pytorch checkpoint's weights are not floating-point " \
        "tensors" in err and "to_patch_embedding.1.weight: int64" in err, err
    assert "Traceback" not in err
    bools = dict(sd, **{"mlp_head.1.bias": torch.ones(5, dtype=torch.bool)})
    torch.save(bools, tmp_path / "bools.pt")
    rc, err = _convert([tmp_path / "bools.pt", "--out", out], capsys)
    assert rc == 2 and "mlp_head.1.bias: bool" in err and not out.exists(), err

    nan = {k: v.clone() for k, v in sd.items()}
    nan["transformer.layers.1.1.net.1.weight"][3, 5] = float("nan")
    nan["mlp_head.1.bias"][0] = float("inf")
    torch.save(nan, tmp_path / "nan.pt")
    rc, err = _convert([tmp_path / "nan.pt", "--out", out], capsys)
    assert rc == 2 and not out.exists(), err
    assert "2 tensor(s) hold NaN/inf" in err and "--allow-nonfinite" in err
    assert "transformer.layers.1.1.net.1.weight: 1 of 2048 values are NaN/inf" in err, err
    rc, err = _convert([tmp_path / "nan.pt", "--out", out, "--allow-nonfinite"], capsys)
    assert rc == 0, err
    from deepvit_jax.model_dir import load_model, model_arrays

    arrays = model_arrays(load_model(out))
    assert sum(int(np.sum(~np.isfinite(a))) for a in arrays.values()) == 2  # kept as given


def test_convert_prints_a_dtype_and_range_summary_per_group(vp_file, tmp_path, capsys):
    path, sd = vp_file
    rc, err = _convert([path, "--out", tmp_path / "m"], capsys)
    assert rc == 0, err
    lines = err.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.strip().startswith("group"))
    rows = {}
    for ln in lines[head + 1:]:
        parts = ln.split()
        if len(parts) != 8:
            break
        rows[parts[0]] = parts[1:]
    # the two blocks' MLP first layer: one group, checked against the PyTorch tensors
    from deepvit_jax.model_dir import load_model, model_arrays

    arrays = model_arrays(load_model(tmp_path / "m"))
    groups = {}
    for key, a in arrays.items():
        name = ".".join("*" if str(p).isdigit() else str(p) for p in key[:-1]) or key[0]
        groups.setdefault(name, []).append(a)
    assert set(rows) == set(groups), (sorted(rows), sorted(groups))
    for name, arrs in groups.items():
        vals = np.concatenate([a.ravel() for a in arrs]).astype(np.float64)
        n, size, dtype, lo, hi, mean, bad = rows[name]
        assert (int(n), int(size), dtype, int(bad)) == (len(arrs), vals.size, "float32", 0)
        np.testing.assert_allclose([float(lo), float(hi), float(mean)],
                                   [vals.min(), vals.max(), np.abs(vals).mean()], rtol=1e-3)
    # the PyTorch side of one group: all qkv weights of both blocks
    qkv = np.concatenate([sd[f"transformer.layers.{b}.0.to_qkv.weight"].numpy().ravel()
                          for b in (0, 1)])
    qkv_row = next(r for g, r in rows.items() if g.endswith("qkv"))
    np.testing.assert_allclose(float(qkv_row[4]), qkv.max(), rtol=1e-3)


# ---------------------------------------------------------------------------------------
# Outputs two writers cannot corrupt
# ---------------------------------------------------------------------------------------


def _writer(src, out, pth, rounds, barrier, results):
    """One ``convert SRC --out OUT --to-pytorch PTH`` per round, at the same moment as the
    other writer."""
    import contextlib
    import io

    from deepvit_jax.convert.__main__ import main

    for r in range(rounds):
        barrier.wait()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([src, "--out", out, "--to-pytorch", pth])
        results.put((r, rc, err.getvalue()))
        barrier.wait()  # both done: the test checks and clears the outputs


def test_two_concurrent_writers_of_one_output_have_one_winner(vp_file, tmp_path):
    """Before: both printed "wrote" and exited 0 and the directory held a mix that would
    not load, or one hung on an Orbax lock. Now, in every round, exactly one writer exits 0
    with a complete, loadable output; the other exits 3 at once with one line."""
    from deepvit_jax.convert.torch_files import load_state_dict
    from deepvit_jax.model_dir import load_model, model_arrays

    path, sd = vp_file
    out, pth = tmp_path / "model", tmp_path / "model.pth"
    rounds = 3
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(path), str(out), str(pth), rounds,
                                               barrier, results), daemon=True)
             for _ in range(2)]
    for p in procs:
        p.start()
    want = {k: v.numpy() for k, v in sd.items()}
    overlapped = 0
    try:
        for r in range(rounds):
            barrier.wait(timeout=300)
            got = sorted((results.get(timeout=300) for _ in range(2)), key=lambda x: x[1])
            codes = [rc for _, rc, _ in got]
            lost = [ln for ln in got[1][2].splitlines() if ln.startswith("error")]
            assert len(lost) == 1, got
            if codes == [0, 2]:  # the loser started after the winner had finished (a
                # loaded machine): refused as an existing output, never written over
                assert "already exists" in lost[0], got
            else:
                assert codes == [0, 3], (r, got)
                assert "is being written by another command" in lost[0] and "lock" in lost[0]
                overlapped += 1
            loaded = load_model(out)  # complete and loadable
            assert len(model_arrays(loaded)) == len(want)
            back = load_state_dict(pth)
            assert set(back) == set(want)
            for k, v in want.items():
                np.testing.assert_array_equal(back[k], v, err_msg=k)
            left = sorted(p.name for p in tmp_path.iterdir())
            assert left == ["model", "model.pth"], left  # no lock, no temporary copy
            import shutil

            shutil.rmtree(out)
            pth.unlink()
            barrier.wait(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert overlapped >= 1, "the writers never overlapped: the claim was not exercised"


def test_temporary_names_are_marked_and_only_ours_are_removed(vp_file, tmp_path, capsys):
    """Before: ``export --out X`` deleted a user's own ``X.partial/``. Now temporary names
    are ``NAME.deepvit-partial-<12 hex>``: a user's files are never touched, copies left by
    a killed writer (that exact pattern) are removed, and a failed write leaves nothing."""
    from deepvit_jax.utils import as_path, atomic_output, claim_output, partial_name

    path, _ = vp_file
    out = tmp_path / "m"
    (tmp_path / "m.partial").mkdir()
    (tmp_path / "m.partial" / "mine.txt").write_text("the user's")
    (tmp_path / "m.deepvit-partial-notes").write_text("the user's too")  # not our pattern
    killed = tmp_path / "m.deepvit-partial-0123456789ab"  # left by a writer killed -9
    (killed / "state").mkdir(parents=True)
    rc, err = _convert([path, "--out", out], capsys)
    assert rc == 0, err
    assert (tmp_path / "m.partial" / "mine.txt").read_text() == "the user's"
    assert (tmp_path / "m.deepvit-partial-notes").read_text() == "the user's too"
    assert not killed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m", "m.deepvit-partial-notes", "m.partial"]

    # the name keeps the extension (writers pick a format by it); a failure removes it
    target = tmp_path / "w.safetensors"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        assert os.path.basename(tmp).startswith("w.deepvit-partial-")
        assert tmp.endswith(".safetensors")
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("cut")
    assert not target.exists() and not list(tmp_path.glob("w.*"))
    with claim_output(target) as token:
        assert len(token) == 12
        assert partial_name(as_path(target), token).name == \
            f"w.deepvit-partial-{token}.safetensors"


# ---------------------------------------------------------------------------------------
# A full disk while writing an output: one line, exit 4, nothing left
# ---------------------------------------------------------------------------------------

FULL_DISK_CONVERT = """
set -u
mount -t tmpfs -o size=64k tmpfs "$WD"
python - "$@" <<'PY'
import sys
from deepvit_jax.convert.__main__ import main
src, wd, model, image = sys.argv[1:5]
for flag, out in (("--to-pytorch", "x.pth"), ("--to-pytorch", "x.safetensors"), ("--out", "m")):
    print(f"rc {main([src, flag, f'{wd}/{out}'])}", flush=True)
    print(f"rc-line", file=sys.stderr, flush=True)
from deepvit_jax import predict
try:  # fill the disk: the logits (4 KB) no longer fit
    with open(f"{wd}/filler", "wb") as f:
        f.write(bytes(1 << 20))
except OSError:
    pass
print(f"rc {predict.main(['--checkpoint', model, image, '--output', f'{wd}/l.npy'])}",
      flush=True)
print(f"rc-line", file=sys.stderr, flush=True)
import os
os.remove(f"{wd}/filler")
PY
ls -A "$WD"   # nothing may be left: stdout must hold only the exit statuses
"""


def test_full_disk_while_writing_outputs_exits_4_with_one_line(vp_file, model_dir,  # noqa: F811
                                                               tmp_path):
    """Before: a traceback (convert --to-pytorch, torch's "enforce fail ... unexpected
    pos") and exit 2 (convert --out). Now: exit 4, one line naming the output and the fix,
    nothing left; predict --output too."""
    from PIL import Image

    import subprocess
    import sys

    from test_reliability2 import _can_mount_tmpfs

    if not _can_mount_tmpfs():
        pytest.skip("unprivileged user + mount namespaces are not available (unshare)")
    path, _ = vp_file
    wd = tmp_path / "wd"
    wd.mkdir()
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(image)
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c",
                        FULL_DISK_CONVERT, "full_disk", str(path), str(wd), str(model_dir),
                        str(image)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WD": str(wd), "PATH": os.path.dirname(sys.executable)
                            + os.pathsep + os.environ.get("PATH", "")})
    assert r.stdout.split() == ["rc", "4"] * 4, (r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    blocks = r.stderr.split("rc-line\n")[:4]
    for block, out in zip(blocks, ("x.pth", "x.safetensors", "m", "l.npy"), strict=True):
        errors = [ln for ln in block.splitlines() if ln.startswith("error")]
        assert len(errors) == 1, block
        assert errors[0].startswith("error: no space left on the device") and \
            f"{wd}/{out}" in errors[0] and "free space" in errors[0], errors


# ---------------------------------------------------------------------------------------
# Nothing the user made replaced silently; config values checked for meaning
# ---------------------------------------------------------------------------------------


def _tiny(data_dir, **top):
    from test_reliability import _tiny as tiny

    return tiny(data_dir, **top)


def test_workdir_with_another_runs_files_is_refused(tmp_path, data_dir):
    """Before: a workdir holding another run's metrics.jsonl but no checkpoint had that
    file replaced by a fresh start. Now it is refused (exit 2) naming the files, unless
    config.overwrite; a run's own files (the same config, killed before its first
    checkpoint) are replaced as before, so the same command still restarts it."""
    import json

    from deepvit_jax.errors import ConfigError
    from deepvit_jax.train import config as config_lib
    from deepvit_jax.train.loop import setup
    from deepvit_jax.workdir import RUN_CONFIG, check_fresh_workdir

    wd = tmp_path / "run"
    wd.mkdir()
    theirs = '{"step": 1, "train/loss": 2.5}\n'
    (wd / "metrics.jsonl").write_text(theirs)
    (wd / "tensorboard").mkdir()
    with pytest.raises(ConfigError) as e:
        setup(_tiny(data_dir, total_steps=2), str(wd))
    msg = str(e.value)
    assert f"--workdir {wd} holds another run's files (metrics.jsonl, tensorboard/)" in msg
    assert "--config.overwrite=True" in msg and "\n" not in msg
    assert (wd / "metrics.jsonl").read_text() == theirs and not (wd / RUN_CONFIG).exists()

    # --config.overwrite=True: started over, this run's config recorded
    c = _tiny(data_dir, total_steps=2, overwrite=True)
    cfg = json.loads(c.to_json_best_effort())
    allowed = config_lib.RESUMABLE_FIELDS
    check_fresh_workdir(wd, cfg, overwrite=True, allowed=allowed)
    assert json.loads((wd / RUN_CONFIG).read_text()) == cfg

    # this run's own files (same config, no checkpoint yet): allowed; a changed config
    # (another run) is refused again
    check_fresh_workdir(wd, dict(cfg, overwrite=False, total_steps=5), overwrite=False,
                        allowed=allowed)
    other = dict(cfg, seed=cfg["seed"] + 1)
    with pytest.raises(ConfigError, match=r"holds another run's files \(metrics.jsonl"):
        check_fresh_workdir(wd, other, overwrite=False, allowed=allowed)
    # an empty metrics.jsonl and no tensorboard/: nothing to lose
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    (empty / "train.log").write_text("x")
    check_fresh_workdir(empty, other, overwrite=False, allowed=allowed)


@pytest.mark.parametrize("field,value,want", [
    ("optim__learning_rate", -1e-3, "config.optim.learning_rate=-0.001: must be >= 0"),
    ("optim__eps", 0.0, "config.optim.eps=0.0: must be > 0"),
    ("optim__min_lr", -1e-5, "config.optim.min_lr=-1e-05: must be >= 0"),
    ("optim__b2", 1.0, "config.optim.b2=1.0: must be in [0, 1)"),
    ("batch_size", 0, "config.batch_size=0: must be a positive integer"),
    ("eval__every_steps", -5, "config.eval.every_steps=-5: must be a positive integer"),
])
def test_config_values_are_checked_for_meaning(data_dir, field, value, want):
    """Before: a negative learning rate trained (to loss 12884). Now every value no recipe
    can mean is one line naming the field, exit 2, before anything is built."""
    from deepvit_jax import cli
    from deepvit_jax.train import config as config_lib

    def body():
        config_lib.validate(_tiny(data_dir, **{field: value}))

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.run_cli(body) == 2
    assert err.getvalue() == f"error: {want}\n"


def test_one_class_dataset_is_refused(tmp_path):
    """Before: a one-class image folder trained to loss 0. Now refused (exit 2)."""
    from PIL import Image

    from deepvit_jax.errors import ConfigError
    from deepvit_jax.train.loop import setup

    root = tmp_path / "one"
    for split in ("train", "validation"):
        (root / split / "cat").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / split / "cat" / f"{i}.png")
    c = _tiny(str(tmp_path / "tfds"), total_steps=1)
    c.data.dataset = "folder"
    c.data.folder_path = str(root)
    from deepvit_jax.data.builders.folder import prepare_folder

    prepare_folder(root, c.data.data_dir)
    with pytest.raises(ConfigError, match=r"has 1 class\(es\); a classifier needs at least 2"):
        setup(c, str(tmp_path / "wd"))


# ---------------------------------------------------------------------------------------
# Image inputs with a pixel limit
# ---------------------------------------------------------------------------------------


def bomb_png(path, width: int, height: int) -> None:
    """A valid grey PNG of ``width`` x ``height`` zero pixels, written row by row (a
    20000 x 20000 one is ~400 KB on disk and 400 MB decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + the row
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                   8, 0, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding(model_dir, tmp_path, capsys,  # noqa: F811
                                                       monkeypatch):
    """Before: predict on a 388 KB 20000x20000 PNG reached 13.8 GB. Now the header is read
    first and the image refused (one line, exit 2) without decoding it; --max-pixels
    raises the limit (or lowers it)."""
    from PIL import Image

    from deepvit_jax import predict
    from deepvit_jax.data import preprocess

    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, 20000, 20000)
    assert bomb.stat().st_size < 1_000_000
    decoded = []
    real_decode = preprocess.decode_image

    def spy(encoded):
        decoded.append(1)
        return real_decode(encoded)

    monkeypatch.setattr(predict, "decode_image", spy)
    assert predict.main(["--checkpoint", str(model_dir), str(bomb)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not decoded
    assert captured.err == (f"error: {bomb}: 20000x20000 = 400,000,000 pixels is above the "
                            "limit of 89,478,485 (a decompression bomb?); if you trust the "
                            "file, pass --max-pixels 400000000 (0 = no limit)\n")
    # an ordinary image under a lowered limit: refused the same way; under the default: read
    cat = tmp_path / "cat.png"
    Image.fromarray(np.full((60, 50, 3), 128, np.uint8)).save(cat)
    assert predict.main(["--checkpoint", str(model_dir), str(cat), "--max-pixels",
                         "2999"]) == 2
    assert "50x60 = 3,000 pixels is above the limit of 2,999" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(model_dir), str(cat), "--max-pixels",
                         "3000"]) == 0
    assert decoded == [1] and "1." in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# prepare: an evaluation split for a train-only folder; bombs skipped
# ---------------------------------------------------------------------------------------


def test_prepare_val_fraction_for_a_train_only_folder(tmp_path, capsys):
    """Before: prepare of a train-only folder succeeded, then training exited 2 asking for
    a field prepare does not offer. Now prepare says how (--val-fraction), and
    --val-fraction F holds out F of each class, chosen by a hash of each path."""
    import hashlib

    from PIL import Image

    from deepvit_jax.data.__main__ import main

    root = tmp_path / "pets"
    files = {}
    for c, cls in enumerate(("cat", "dog")):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(5):
            rel = f"train/{cls}/{i}.png"
            Image.new("RGB", (8, 8), (c * 100, i * 40, 0)).save(root / rel)
            files.setdefault(cls, []).append(rel)
    bomb_png(root / "train" / "cat" / "bomb.png", 10000, 9000)  # 90 M pixels: skipped
    data_dir = tmp_path / "tfds"
    assert main(["prepare", "folder", "--folder", str(root), "--data-dir",
                 str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "--val-fraction 0.1" in err.strip().splitlines()[-1], err
    assert "bomb.png: 10000x9000 = 90,000,000 pixels is above the limit" in err

    assert main(["prepare", "folder", "--folder", str(root), "--data-dir", str(data_dir),
                 "--val-fraction", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "2 classes, train=6, validation=4" in out, out
    import tensorflow_datasets as tfds

    from deepvit_jax.data.builders.folder import prepared_dir

    builder = tfds.builder_from_directory(str(prepared_dir(root, data_dir)))
    got = sorted(ex["file_name"].decode() for ex in
                 tfds.as_numpy(builder.as_dataset(split="validation")))
    files["cat"].append("train/cat/bomb.png")  # ranked with the others, skipped when read
    want = sorted(rel for cls in files for rel in sorted(
        files[cls], key=lambda r: hashlib.sha256(r.encode()).hexdigest())[:2]
        if not rel.endswith("bomb.png"))
    assert got == want
    # a folder that has a validation split: --val-fraction is refused, one line
    (root / "validation" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "validation" / "cat" / "v.png")
    assert main(["prepare", "folder", "--folder", str(root), "--data-dir", str(data_dir),
                 "--val-fraction", "0.4"]) == 2
    assert "already has the evaluation split 'validation'" in capsys.readouterr().err


@pytest.mark.parametrize("module,argv", [
    ("evaluate", ["--checkpoint", "x", "--batch-size", "0"]),
    ("evaluate", ["--checkpoint", "x", "--batch-size", "-5"]),
    ("evaluate", ["--checkpoint", "x", "--bn-recalibrate", "-1"]),
    ("export", ["--checkpoint", "x", "--out", "y", "--bn-recalibrate", "-2"]),
    ("analysis", ["x", "--out", "y", "--num-images", "0"]),
    ("analysis", ["x", "--out", "y", "--batch-size", "-1"]),
])
def test_flags_where_zero_means_nothing_are_refused(module, argv, capsys):
    """Before: evaluate --batch-size 0 was ignored and -5 gave a traceback. Now a flag
    value that means nothing is refused by the parser (exit 2), naming the flag."""
    import importlib

    main = importlib.import_module(f"deepvit_jax.{module}" + (".__main__" if module ==
                                                             "analysis" else "")).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    flag = argv[-2]
    assert f"argument {flag}: '{argv[-1]}': must be" in err and "Traceback" not in err, err
