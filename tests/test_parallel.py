"""Mesh resolution and sharding rules (no multi-device hardware needed)."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from deepvit_jax import parallel
from deepvit_jax.errors import ConfigError
from deepvit_jax.utils import path_str


def _cfg(data=-1, fsdp=1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


@pytest.mark.parametrize("cfg,n,want", [
    (_cfg(), 8, (8, 1, 1)),
    (_cfg(fsdp=4), 8, (2, 4, 1)),
    (_cfg(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (_cfg(data=1, fsdp=1, tensor=1), 1, (1, 1, 1)),
])
def test_mesh_shape(cfg, n, want):
    assert parallel.mesh_shape(cfg, n) == want


@pytest.mark.parametrize("cfg,n,field", [
    (_cfg(fsdp=3), 8, "config.mesh"),          # 8 not divisible by 3
    (_cfg(data=2, fsdp=2, tensor=1), 8, "config.mesh"),  # 4 != 8
    (_cfg(data=-1, fsdp=-1), 8, "config.mesh"),
    (_cfg(tensor=0), 8, "config.mesh.tensor"),
])
def test_impossible_mesh_names_field(cfg, n, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parallel.mesh_shape(cfg, n)


def test_make_mesh_on_host():
    mesh = parallel.make_mesh(_cfg())
    assert mesh.axis_names == parallel.AXES
    assert mesh.devices.size == jax.device_count()


def test_param_spec_rules():
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
    # Tensor rule first (column-parallel qkv), then FSDP on the largest remaining dimension.
    assert parallel.param_spec("blocks/0/attn/qkv/kernel", (384, 1152), mesh) == P("fsdp", "tensor")
    assert parallel.param_spec("blocks/0/attn/proj/kernel", (384, 384), mesh) == P("tensor", "fsdp")
    assert parallel.param_spec("blocks/0/mlp/fc1/bias", (1152,), mesh) == P("tensor")
    # Optimizer moments have the same path suffix, so they follow the same rule.
    assert (parallel.param_spec("opt/0/mu/blocks/0/mlp/fc2/kernel", (1152, 384), mesh)
            == P("tensor", "fsdp"))
    # Small arrays stay replicated; indivisible dimensions are skipped.
    assert parallel.param_spec("blocks/0/attn/reattn_weight", (12, 12), mesh) == P(None, None)
    assert parallel.param_spec("pos_embed", (1, 197, 384), mesh) == P(None, None, "fsdp")
    assert parallel.param_spec("head/kernel", (383, 1001), mesh) == P(None, None)
    none = types.SimpleNamespace(shape={"data": 8, "fsdp": 1, "tensor": 1})
    assert parallel.param_spec("blocks/0/attn/qkv/kernel", (384, 1152), none) == P(None, None)


def test_tree_shardings_paths_match_model_state():
    from flax import nnx

    from deepvit_jax import create_model

    model = create_model("deepvit_16b", num_classes=10, image_size=32, depth=1, embed_dim=64,
                         num_heads=4)
    params = nnx.state(model, nnx.Param)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert "blocks/0/attn/qkv/kernel" in paths and "pos_embed" in paths
    sh = parallel.tree_shardings(params, parallel.make_mesh(_cfg()))
    leaves = jax.tree.leaves(sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    assert len(leaves) == len(jax.tree.leaves(params))
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in leaves)
    np.testing.assert_equal(parallel.batch_size_per_shard(parallel.make_mesh(_cfg())),
                            jax.device_count())
