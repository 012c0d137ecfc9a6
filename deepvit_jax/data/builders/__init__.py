"""TFDS builders owned by this package (importing registers them with TFDS)."""

from deepvit_jax.data.builders.digits import Digits

__all__ = ["Digits"]
