"""Shared test set-up: quiet TensorFlow, float32 everywhere."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    """Parity tests compare with PyTorch at 1e-4: use full-precision matmuls on any backend."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
