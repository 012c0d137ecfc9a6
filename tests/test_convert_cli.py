"""python -m deepvit_jax.convert: PyTorch file -> model directory -> PyTorch file, and the
bad-input paths (clear message, non-zero exit, nothing written)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepvit_jax import model_dir as ck  # noqa: E402
from deepvit_jax.convert.__main__ import main  # noqa: E402
from deepvit_jax.convert.torch_files import load_state_dict  # noqa: E402
from deepvit_jax.reference import official as R  # noqa: E402
from deepvit_jax.reference.vit_pytorch import load_deepvit_class  # noqa: E402


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A DeepViT-S-structured timm training file (16 blocks, CNN stem) at 32 px, with EMA."""
    torch.manual_seed(0)
    ref = R.randomize_(R.create("deepvit_S", img_size=32, num_classes=10)).eval()
    ema = R.randomize_(R.create("deepvit_S", img_size=32, num_classes=10), seed=1).eval()
    path = tmp_path_factory.mktemp("cli") / "DViT_82_16b.pth.tar"
    import argparse

    torch.save({"state_dict": ref.state_dict(), "state_dict_ema": ema.state_dict(),
                "args": argparse.Namespace(model="deepvit_S"), "epoch": 3}, path)
    return path, ref, ema


def test_cli_round_trip(official_file, tmp_path, capsys):
    path, _ref, ema = official_file
    out = tmp_path / "deepvit_s"
    assert main([str(path), "--model", "deepvit_s", "--image-size", "32", "--num-classes",
                 "10", "--ema", "--out", str(out)]) == 0
    assert "converted to deepvit_s" in capsys.readouterr().err
    model = ck.load_model(out)
    assert model.config.image_size == 32 and model.config.num_classes == 10
    x = torch.randn(3, 3, 32, 32)  # the shapes test_convert's parity tests compiled
    with torch.no_grad():
        want = ema(x).numpy()
    np.testing.assert_allclose(np.asarray(model(x.permute(0, 2, 3, 1).numpy())), want,
                               atol=1e-5)

    # model directory -> .safetensors and .pth, bit-exact with the EMA weights
    for name in ("back.safetensors", "back.pth"):
        assert main([str(out), "--to-pytorch", str(tmp_path / name)]) == 0
        back = load_state_dict(tmp_path / name)
        sd = {k: v for k, v in ema.state_dict().items()
              if not k.endswith("num_batches_tracked")}
        assert set(back) == set(sd)
        for k, v in sd.items():
            np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_cli_errors_leave_nothing(official_file, tmp_path, capsys):
    path, ref, _ = official_file
    out = tmp_path / "out"
    # wrong variant: the message lists keys with shapes and names the right variant
    assert main([str(path), "--model", "deepvit_16b", "--image-size", "32",
                 "--num-classes", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "patch_embed.conv1.weight (64, 3, 7, 7)" in err and "looks like 'deepvit_s'" in err
    # shape mismatch
    assert main([str(path), "--model", "deepvit_s", "--image-size", "32", "--out",
                 str(out)]) == 2
    assert "head.weight: checkpoint (10, 396), model expects (1000, 396)" in \
        capsys.readouterr().err
    # missing key
    sd = dict(ref.state_dict())
    del sd["blocks.12.attn.var_norm.running_var"]
    torch.save(sd, tmp_path / "missing.pth")
    assert main([str(tmp_path / "missing.pth"), "--model", "deepvit_s", "--image-size", "32",
                 "--num-classes", "10", "--out", str(out)]) == 2
    assert "blocks.12.attn.var_norm.running_var (12,)" in capsys.readouterr().err
    # truncated file
    data = path.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) // 3])
    assert main([str(tmp_path / "cut.pth.tar"), "--model", "deepvit_s", "--out",
                 str(out)]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    # nothing requested / existing output
    assert main([str(path)]) == 2
    (tmp_path / "exists").mkdir()
    assert main([str(path), "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pth.tar", "exists",
                                                         "missing.pth"]


def test_cli_vit_pytorch_mean_pool(tmp_path):
    DeepViT = load_deepvit_class()
    torch.manual_seed(0)
    ref = DeepViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=4,
                  mlp_dim=64, dim_head=8, pool="mean").eval()
    torch.save(ref.state_dict(), tmp_path / "vp.pt")
    assert main([str(tmp_path / "vp.pt"), "--pool", "mean", "--out", str(tmp_path / "m"),
                 "--to-pytorch", str(tmp_path / "back.pth")]) == 0
    model = ck.load_model(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x).numpy()
    np.testing.assert_allclose(np.asarray(model(x.permute(0, 2, 3, 1).numpy())), want,
                               atol=1e-5)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    ref.load_state_dict(back, strict=True)  # written in the vit-pytorch layout


def test_cli_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "deepvit_jax.convert", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "--to-pytorch" in r.stdout and "DViT_82_16b.pth.tar" in r.stdout
