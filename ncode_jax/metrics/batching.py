"""Apply a jitted function to a large array in fixed-size batches (one compilation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["map_batches"]


def map_batches(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``concatenate([fn(batch) for batch in x])`` with every batch of the same size: the last,
    partial batch is zero-padded to ``min(batch_size, len(x))`` rows and the padding rows of the
    result are dropped, so a jitted ``fn`` compiles once. ``fn`` must act row-wise."""
    x = np.asarray(x)
    n = x.shape[0]
    if n == 0:
        raise ValueError("map_batches: empty input")
    if batch_size < 1:
        raise ValueError(f"map_batches: batch_size must be >= 1, got {batch_size}")
    b = min(int(batch_size), n)
    out = []
    for start in range(0, n, b):
        chunk = x[start : start + b]
        real = chunk.shape[0]
        if real < b:
            chunk = np.concatenate([chunk, np.zeros((b - real, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(chunk))[:real])
    return np.concatenate(out)
