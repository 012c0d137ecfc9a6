"""The index layer of the random-access (ArrayRecord) reader: which record each process reads.

Epoch ``e`` of a training run visits the ``n`` records of the split in the order
``record = permute(position, n, seed, e)`` for ``position = 0 .. n - 1``.  Global batch ``s``
holds positions ``[s * B, (s + 1) * B)`` (the epoch's remainder ``n % B`` is dropped), and
process ``p`` of ``P`` takes its contiguous slice ``s * B + p * L + [0, L)`` with ``L = B / P``
- the same rule as the tf.data reader's global order.  A process therefore reads exactly its
``L`` records per step, and the global batches (and so the loss curve) do not depend on ``P``.

``permute`` is a keyed Feistel network over the smallest even-bit power of two >= n with
cycle-walking (positions that land outside ``[0, n)`` are permuted again until they land
inside): a bijection of ``[0, n)``, computed for just the positions asked (no n-sized table,
no per-epoch set-up), vectorised in NumPy.  It is written here rather than taken from a
library on purpose: the order is part of a run's identity (a resumed run must see the same
records), so it must not change when NumPy, grain or TFDS change their shuffles
(tests/test_data_array_record.py pins it with golden values).
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
ROUNDS = 6


def _mix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser (Steele, Lea, Flood 2014) on uint64 arrays (wrapping)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def round_keys(seed: int, epoch: int) -> np.ndarray:
    """The ``ROUNDS`` 64-bit Feistel keys of (seed, epoch)."""
    with np.errstate(over="ignore"):
        h = _mix64(np.uint64(int(seed) & MASK64))
        h = _mix64(h + np.uint64(int(epoch) & MASK64) * np.uint64(0x9E3779B97F4A7C15))
        return _mix64(h + np.arange(1, ROUNDS + 1, dtype=np.uint64))


def _feistel(x: np.ndarray, keys: np.ndarray, half_bits: int) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for k in keys:
        left, right = right, left ^ (_mix64(right ^ k) & mask)
    return (left << shift) | right


def permute(positions, n: int, seed: int, epoch: int) -> np.ndarray:
    """Record index (int64) at each of ``positions`` (in ``[0, n)``) of epoch ``epoch``."""
    n = int(n)
    pos = np.asarray(positions, np.int64)
    if n <= 0:
        raise ValueError(f"cannot permute an empty split (n={n})")
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f"positions must lie in [0, {n}), got [{pos.min()}, {pos.max()}]")
    if n == 1:
        return np.zeros_like(pos)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = round_keys(seed, epoch)
    y = _feistel(pos.astype(np.uint64), keys, half_bits)
    out = y >= np.uint64(n)
    while out.any():   # cycle-walking: the domain is < 4 n, so < 4 rounds on average
        y[out] = _feistel(y[out], keys, half_bits)
        out = y >= np.uint64(n)
    return y.astype(np.int64)


def process_positions(step_in_epoch: int, global_batch_size: int, process_index: int,
                      process_count: int) -> np.ndarray:
    """The global positions (in the epoch's order) that process ``p`` reads at a step."""
    local = global_batch_size // process_count
    start = step_in_epoch * global_batch_size + process_index * local
    return np.arange(start, start + local, dtype=np.int64)
