"""The ArrayRecord reader (data.reader='array_record'): conversion, index layer, 1/P reads,
batches independent of P, same augmentation as tf.data, resume across P, errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grain")

from deepvit_jax.data import index as index_lib
from deepvit_jax.data.array_record_files import add_array_record, data_source
from deepvit_jax.data.config import digits_data_config
from deepvit_jax.data.dataset import ImageSpec, dataset_info
from deepvit_jax.data.train_stream import make_train_iterator


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    info = dataset_info(_cfg(d, reader="tfrecord"))
    add_array_record(info.builder.data_dir, progress=False)
    return d


def _cfg(data_dir, reader="array_record", **kw):
    cfg = digits_data_config()
    cfg.data_dir, cfg.reader, cfg.num_workers = data_dir, reader, 0
    cfg.prefetch_batches = 1   # TrainIterator reads no step ahead (the read counter is exact)
    cfg.rrc_scale, cfg.hflip = (0.3, 1.0), 0.5     # a real random augmentation
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _stream(cfg, pi=0, pc=1, B=32, source=None, seed=0):
    it = make_train_iterator(cfg, global_batch_size=B, spec=ImageSpec(16), sharding=None,
                             seed=seed, process_index=pi, process_count=pc)
    if source is not None:
        it.host.fn._source = source
    return it


def test_permutation_golden_and_bijective():
    # Pinned: changing these values changes every run's order (and breaks resumes).
    np.testing.assert_array_equal(index_lib.permute(np.arange(10), 10, 0, 0),
                                  [7, 5, 2, 3, 1, 6, 9, 8, 0, 4])
    np.testing.assert_array_equal(index_lib.permute(np.arange(10), 10, 0, 1),
                                  [3, 6, 2, 9, 4, 1, 7, 5, 0, 8])
    np.testing.assert_array_equal(index_lib.permute(np.arange(10), 10, 1, 0),
                                  [7, 8, 2, 3, 0, 9, 1, 4, 6, 5])
    for n in (1, 2, 3, 17, 1437, 4099):
        assert sorted(index_lib.permute(np.arange(n), n, 5, 3).tolist()) == list(range(n))
    # any slice gives what the whole permutation gives there
    full = index_lib.permute(np.arange(1437), 1437, 9, 2)
    np.testing.assert_array_equal(index_lib.permute(np.arange(100, 164), 1437, 9, 2),
                                  full[100:164])
    # uniform: the record at position 0 over 4000 seeds, chi-square with 9 dof < 27.9 (p=.001)
    c = np.bincount([index_lib.permute([0], 10, s, 0)[0] for s in range(4000)], minlength=10)
    assert ((c - 400) ** 2 / 400).sum() < 27.9


def test_conversion_is_byte_identical_per_split(data_dir):
    import tensorflow_datasets as tfds

    builder = dataset_info(_cfg(data_dir)).builder
    for split in ("train", "test"):
        src = data_source(builder.data_dir, split)
        tf_records = [r.numpy() for r in builder.info.file_format and
                      _tfrecord_records(builder, split)]
        assert len(src) == len(tf_records) == builder.info.splits[split].num_examples
        assert [src[i] for i in range(len(src))] == tf_records
    # the tf.data reader keeps working after the conversion
    assert len(list(tfds.as_numpy(builder.as_dataset(split="test")))) == 360


def _tfrecord_records(builder, split):
    import tensorflow as tf

    files = builder.info.splits[split].filepaths
    return list(tf.data.TFRecordDataset([str(f) for f in files]))


class CountingSource:
    def __init__(self, inner):
        self.inner, self.keys = inner, []

    def __getitems__(self, keys):
        self.keys.append(list(keys))
        return self.inner.__getitems__(keys)


def test_global_batches_equal_for_1_2_4_processes_and_each_reads_its_share(data_dir):
    cfg = _cfg(data_dir)
    info = dataset_info(cfg)
    B, steps = 32, 4
    one = _stream(cfg, B=B)
    ref = [next(one) for _ in range(steps)]
    for P in (2, 4):
        procs = []
        for p in range(P):
            counter = CountingSource(data_source(info.builder.data_dir, "train"))
            procs.append((_stream(cfg, p, P, B, source=counter), counter))
        for s in range(steps):
            parts = [next(it) for it, _ in procs]
            for k in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([x[k] for x in parts]), ref[s][k])
        for p, (_it, counter) in enumerate(procs):
            # exactly L = B / P records per step, and they are its slice of the global batch
            assert [len(k) for k in counter.keys] == [B // P] * steps
            for s, keys in enumerate(counter.keys):
                want = index_lib.permute(index_lib.process_positions(s, B, p, P),
                                         info.num_train, 0, 0)
                assert keys == want.tolist()
        assert procs[0][0].get_state() == procs[-1][0].get_state() == one.get_state()


def test_same_record_and_seed_augment_identically_in_both_readers(data_dir):
    import tensorflow as tf

    from deepvit_jax.data import augment
    from deepvit_jax.data.dataset import _seed_words, get_builder

    cfg = _cfg(data_dir)
    it = _stream(cfg, B=16)
    batch = next(it)
    _, pos, rec = it.host.fn.records(0)
    builder = get_builder(cfg)
    encoded = [ex["image"] for ex in builder.as_dataset(
        split="train", decoders={"image": __import__("tensorflow_datasets").decode.SkipDecoding()})]
    fn = augment.make_train_augment(cfg, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    words = _seed_words(0, 0, 0, 3)
    base = tf.constant([words[0] % 2**62, words[1] % 2**62], tf.int64)
    # tf.data's map, as the tf.data reader runs it (example number = global position)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.stack([encoded[r] for r in rec]), tf.constant(pos, tf.int64)))
    ds = ds.map(lambda e, i: fn(e, base + tf.stack([tf.constant(0, tf.int64), i])))
    want = np.stack(list(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(batch["image"], want)
    assert np.std(want) > 0.1     # a real image, not a constant


def test_resume_with_another_process_count_equals_an_uninterrupted_run(data_dir):
    cfg = _cfg(data_dir)
    B, spe = 32, 1437 // 32
    whole = _stream(cfg, B=B)
    # start across an epoch boundary
    whole.set_state({**whole.get_state(), "epoch": 0, "position": spe - 2})
    ref = [next(whole) for _ in range(5)]
    for P1, P2 in ((1, 2), (2, 1)):
        first = [_stream(cfg, p, P1, B) for p in range(P1)]
        for it in first:
            it.set_state({**it.get_state(), "epoch": 0, "position": spe - 2})
        got = [[next(it) for it in first] for _ in range(2)]
        state = first[0].get_state()
        second = [_stream(cfg, p, P2, B) for p in range(P2)]
        for it in second:
            it.set_state(dict(state))
        got += [[next(it) for it in second] for _ in range(3)]
        for s, parts in enumerate(got):
            np.testing.assert_array_equal(np.concatenate([x["image"] for x in parts]),
                                          ref[s]["image"])
    # a tf.data state cannot resume the ArrayRecord stream (another order)
    tf_state = _stream(_cfg(data_dir, reader="tfrecord"), B=B).get_state()
    with pytest.raises(ValueError, match="reader=tfrecord, this run has array_record"):
        _stream(cfg, B=B).set_state(tf_state)


def test_auto_reader_picks_array_record_where_its_files_are(data_dir, tmp_path, caplog):
    from deepvit_jax.data.array_record import ArrayRecordTrainStream
    from deepvit_jax.data.train_stream import HostTrainStream

    auto = _stream(_cfg(data_dir, reader="auto"), B=32)
    assert isinstance(auto.host, ArrayRecordTrainStream)
    explicit = _stream(_cfg(data_dir), B=32)
    for _ in range(2):
        np.testing.assert_array_equal(next(auto)["image"], next(explicit)["image"])
    # no ArrayRecord files: tf.data, and on several processes a warning with the command
    fresh = _cfg(str(tmp_path / "fresh"), reader="auto")
    dataset_info(fresh)
    name = "deepvit_jax.data.train_stream"
    with caplog.at_level("WARNING", logger=name):
        one = _stream(fresh, B=32)
        assert isinstance(one.host, HostTrainStream)
        assert not [r for r in caplog.records if r.name == name]
        two = _stream(fresh, 0, 2, B=32)
    assert isinstance(two.host, HostTrainStream)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == name]
    assert "each of the 2 processes reads the whole train split" in warning
    assert f"prepare digits --array-record --data-dir {tmp_path / 'fresh'}" in warning
    # global_order=False reads a per-process split: the tf.data reader
    assert isinstance(_stream(_cfg(data_dir, reader="auto", global_order=False)).host,
                      HostTrainStream)


def test_auto_reader_resumes_with_the_reader_the_run_started_with(data_dir):
    """A run started by tf.data (before its dataset had ArrayRecord files) resumes with
    tf.data under data.reader='auto', exactly; and an ArrayRecord state stays ArrayRecord."""
    for started in ("tfrecord", "array_record"):
        first = _stream(_cfg(data_dir, reader=started), B=32)
        next(first), next(first)
        state = first.get_state()
        want = [next(first)["image"] for _ in range(3)]
        resumed = _stream(_cfg(data_dir, reader="auto"), B=32)
        resumed.set_state(dict(state))
        assert resumed.get_state()["reader"] == started
        for w in want:
            np.testing.assert_array_equal(next(resumed)["image"], w)


def test_worker_processes_give_the_in_process_stream_and_stop(data_dir):
    import multiprocessing

    it0 = _stream(_cfg(data_dir), B=32)
    it2 = _stream(_cfg(data_dir, num_workers=2), B=32)
    for _ in range(3):
        a, b = next(it0), next(it2)
        np.testing.assert_array_equal(a["image"], b["image"])
    assert len(multiprocessing.active_children()) >= 2
    it2.close()
    for child in multiprocessing.active_children():
        child.join(timeout=30)
    assert not multiprocessing.active_children()


def test_undecodable_image_stops_with_a_named_positioned_error(data_dir):
    from deepvit_jax.errors import InputError

    cfg = _cfg(data_dir)
    it = _stream(cfg, B=32)
    _, pos, rec = it.host.fn.records(0)
    inner = data_source(dataset_info(cfg).builder.data_dir, "train")
    features = dataset_info(cfg).builder.info.features

    class Corrupt(CountingSource):
        def __getitems__(self, keys):
            out = list(super().__getitems__(keys))
            ex = features.deserialize_example_np(out[5])
            ex["image"] = np.zeros((32, 32, 3), np.uint8)
            bad = features.serialize_example(ex)
            # keep the record well-formed, break the image bytes inside it
            out[5] = bad.replace(_png_magic(), b"\x00" * 8, 1)
            return out

    it.host.fn._source = Corrupt(inner)
    with pytest.raises(InputError, match=rf"example {pos[5]} of epoch 0 .*record {rec[5]}"):
        next(it)


def _png_magic():
    return b"\x89PNG\r\n\x1a\n"


def test_missing_files_and_missing_extra_are_one_line_errors(tmp_path, monkeypatch):
    import builtins

    from deepvit_jax.errors import ConfigError, InputError

    cfg = _cfg(str(tmp_path / "fresh"))
    with pytest.raises(InputError, match="prepare digits --array-record"):
        _stream(cfg)
    real = builtins.__import__

    def no_grain(name, *a, **k):
        if name == "grain":
            raise ImportError(name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_grain)
    with pytest.raises(ConfigError, match=r'pip install "deepvit-jax\[grain\]"'):
        _stream(cfg)



def test_older_tfds_reads_tfrecord_and_names_the_floor_for_array_record(data_dir, monkeypatch):
    """A TFDS older than 4.9.8 (a Colab runtime's; the base package supports it) has no list of
    other file formats: 'auto' reads tf.data there, and the ArrayRecord reader names the TFDS
    it needs, instead of an AttributeError from inside the proto."""
    import types

    from deepvit_jax.data import array_record_files as array_record
    from deepvit_jax.data.train_stream import HostTrainStream
    from deepvit_jax.errors import ConfigError

    assert array_record._tfds_lists_formats()        # the installed TFDS (the dev extra's)
    tfds_info, *rest = array_record._tfds_core()

    def old_proto(path):       # what TFDS 4.9.4-4.9.6 reads: no alternative_file_formats
        return types.SimpleNamespace(file_format=tfds_info.read_from_json(path).file_format)

    old = types.SimpleNamespace(read_from_json=old_proto)
    monkeypatch.setattr(array_record, "_tfds_core", lambda: (old, *rest))
    monkeypatch.setattr(array_record, "_tfds_lists_formats", lambda: False)
    assert isinstance(_stream(_cfg(data_dir, reader="auto"), B=32).host, HostTrainStream)
    with pytest.raises(ConfigError, match=r"needs tensorflow-datasets>=4\.9\.8 \(installed: "
                                          r"[0-9.]+\): pip install \"deepvit-jax\[grain\]\""):
        _stream(_cfg(data_dir), B=32)

_CHILD = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_data_array_record import _cfg, _stream
it = _stream(_cfg({data_dir!r}), {p}, 2, 32)
np.savez({out!r}, *[next(it)["image"] for _ in range(3)], state=repr(it.get_state()))
"""


def test_two_real_processes_give_the_one_process_batches(data_dir, tmp_path):
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD.format(
        tests=tests, data_dir=data_dir, p=p, out=str(tmp_path / f"p{p}.npz"))])
        for p in range(2)]
    assert [proc.wait(timeout=300) for proc in procs] == [0, 0]
    one = _stream(_cfg(data_dir), B=32)
    parts = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
    for s in range(3):
        np.testing.assert_array_equal(
            np.concatenate([x[f"arr_{s}"] for x in parts]), next(one)["image"])
    assert str(parts[0]["state"]) == str(parts[1]["state"]) == repr(one.get_state())


def _stat(pid) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    import os

    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        stat = _stat(entry)
        if stat is not None and stat[0] != "Z":
            parents.setdefault(stat[1], set()).add(int(entry))
    out, todo = set(), [pid]
    while todo:
        kids = parents.get(todo.pop(), set())
        out |= kids
        todo += kids
    return out


def test_sigterm_stops_the_run_and_leaves_no_worker_process(data_dir, tmp_path):
    """A real training run reading through 2 grain worker processes gets SIGTERM: it saves,
    exits 0, and none of its worker processes outlives it."""
    import json
    import os
    import pathlib
    import signal
    import subprocess
    import sys
    import time

    root = pathlib.Path(__file__).resolve().parents[1]
    wd = tmp_path / "run"
    tiny = ["--config.model.embed_dim=16", "--config.model.depth=2",
            "--config.model.num_heads=2", "--config.model.reattn_blocks=(0,1)",
            "--config.batch_size=32", "--config.log_every_steps=1",
            "--config.eval.bn_recalibration_batches=0", "--config.collapse_every_steps=0"]
    p = subprocess.Popen(
        [sys.executable, "-m", "deepvit_jax.main", f"--config={root}/configs/default.py",
         f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
         "--config.data.reader=array_record", "--config.data.num_workers=2", *tiny],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    metrics, t0 = wd / "metrics.jsonl", time.time()
    try:
        while not (metrics.exists() and any(
                "train/loss" in json.loads(line) for line in metrics.read_text().splitlines()
                if line.strip())):
            assert p.poll() is None and time.time() - t0 < 240, p.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = _children(p.pid)
        assert len(workers) >= 2  # the grain workers (and whatever they started)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out + err
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert [w for w in workers if _alive(w)] == []


def test_default_worker_count_is_capped_by_memory(monkeypatch):
    from deepvit_jax.data import array_record

    page = 4096
    def sysconf(avail_bytes):
        return lambda name: {"SC_AVPHYS_PAGES": avail_bytes // page, "SC_PAGE_SIZE": page}[name]

    monkeypatch.setattr(array_record.os, "cpu_count", lambda: 240)
    monkeypatch.setattr(array_record.os, "sysconf", sysconf(8 * 10**9))
    # half of 8 GB at 1.2 GB per worker
    assert array_record.num_workers(_cfg("", num_workers=-1)) == 3
    assert array_record.num_workers(_cfg("", num_workers=5)) == 5   # explicit: as given
    monkeypatch.setattr(array_record.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(array_record.os, "sysconf", sysconf(64 * 10**9))
    assert array_record.num_workers(_cfg("", num_workers=-1)) == 2   # one per core


class _Stop(Exception):
    pass


def test_a_run_resumes_with_the_reader_it_started_with(data_dir, tmp_path):
    """A run started with data.reader='tfrecord' (the default before 'auto'), stopped after
    its step-4 checkpoint, resumed under data.reader='auto' on a dataset that now has
    ArrayRecord files: it goes on with tf.data and ends bit-identical to the uninterrupted
    run. Resumed with the other reader named explicitly: one ConfigError naming the fix."""
    from test_main import _final_state

    from deepvit_jax.colab import load_config
    from deepvit_jax.errors import ConfigError
    from deepvit_jax.train.loop import train_and_evaluate

    tiny = {"model.embed_dim": 16, "model.depth": 2, "model.num_heads": 2,
            "model.reattn_blocks": [0, 1], "batch_size": 32, "log_every_steps": 1,
            "eval.bn_recalibration_batches": 0, "ema_decay": 0.0, "eval.batch_size": 120,
            "total_steps": 6, "eval.every_steps": 1000, "checkpoint.every_steps": 2,
            "collapse_every_steps": 0, "data.data_dir": data_dir, "data.num_workers": 0}

    def config(reader):
        return load_config("default.py", {**tiny, "data.reader": reader})

    def stop_at_5(step, run):
        if step == 5:
            raise _Stop

    train_and_evaluate(config("tfrecord"), str(tmp_path / "once"))
    _, ref = _final_state(tmp_path / "once")
    for reader, wd in (("auto", "resumed"), ("array_record", "refused")):
        with pytest.raises(_Stop):
            train_and_evaluate(config("tfrecord"), str(tmp_path / wd), on_step=stop_at_5)
        if reader == "auto":
            train_and_evaluate(config(reader), str(tmp_path / wd))
            step, got = _final_state(tmp_path / wd)
            assert step == 6
            for k in ref:
                np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        else:
            with pytest.raises(ConfigError, match=r"reader=tfrecord.*--config\.data\.reader=auto"):
                train_and_evaluate(config(reader), str(tmp_path / wd))
