"""The notebooks' dataset cell on a dataset that TFDS downloads (``colab.prepare_dataset``),
without a network: a TFDS builder defined here downloads its two splits, through TFDS's own
download manager, from an HTTP server on 127.0.0.1. The cell says it is downloading, then the
prepared classes and split sizes; with the server gone it is one line naming the fix."""

import http.server
import io
import threading

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

SIZES = {"train": 12, "test": 6}


def _split_bytes(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, images=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(n) % 2)
    return buf.getvalue()


class StandinDownload(tfds.core.GeneratorBasedBuilder):
    """Two classes of 16x16 noise, each split a file at ``URL``/<split>.npz."""

    VERSION = tfds.core.Version("1.0.0")
    URL = ""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(16, 16, 3)),
            "label": tfds.features.ClassLabel(num_classes=2)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        paths = dl_manager.download({s: f"{self.URL}/{s}.npz" for s in SIZES})
        return {s: self._generate_examples(p) for s, p in paths.items()}

    def _generate_examples(self, path):
        with path.open("rb") as f:
            data = np.load(f)
            for i, (image, label) in enumerate(zip(data["images"], data["labels"],
                                                   strict=True)):
                yield i, {"image": image, "label": int(label)}


@pytest.fixture
def server():
    files = {f"/{s}.npz": _split_bytes(n, i) for i, (s, n) in enumerate(SIZES.items())}
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def test_prepare_dataset_downloads_through_tfds(tmp_path, server, monkeypatch, capsys):
    from deepvit_jax import colab
    from deepvit_jax.data.config import digits_data_config

    url, requests = server
    monkeypatch.setattr(StandinDownload, "URL", url)
    cfg = digits_data_config()
    cfg.dataset, cfg.data_dir = "standin_download", str(tmp_path / "tfds")
    info = colab.prepare_dataset(cfg)
    assert sorted(requests) == ["/test.npz", "/train.npz"]  # each file fetched once
    assert (info.num_classes, info.num_train, info.num_eval) == (2, 12, 6)
    out = capsys.readouterr().out.splitlines()
    # ours first and last (TFDS's own "Downloading and preparing ..." lines in between)
    assert out[0] == ("data: downloading and preparing standin_download (once; kept in the "
                      "TFDS data dir)")
    assert out[-1] == (f"data: standin_download, 2 classes, train 12 / test 6 images "
                       f"({info.data_dir})")
    # Prepared once: a second call downloads nothing and says so in one line.
    colab.prepare_dataset(cfg)
    assert len(requests) == 2 and len(capsys.readouterr().out.splitlines()) == 1


def test_prepare_dataset_without_network_is_one_line(tmp_path, server, monkeypatch, capsys):
    from deepvit_jax import colab
    from deepvit_jax.data.config import digits_data_config

    url, _ = server
    monkeypatch.setattr(StandinDownload, "URL", url + "/gone")  # every file 404
    cfg = digits_data_config()
    cfg.dataset, cfg.data_dir = "standin_download", str(tmp_path / "tfds")
    with pytest.raises(RuntimeError) as e:
        colab.prepare_dataset(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data: could not prepare 'standin_download' (")
    assert msg.endswith("check the runtime's internet connection, or use the dataset 'digits'")
