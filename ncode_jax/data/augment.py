"""Train-time image augmentation on host arrays (NumPy), driven by an explicit generator so a
resumed run can replay it exactly."""

from __future__ import annotations

import numpy as np


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each NHWC image by its own integer offset in ``[-max_shift, max_shift]`` along
    height and width; the uncovered border repeats the nearest edge pixel (after normalisation
    the background is not zero, so zero fill would draw a frame)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"random_shift expects NHWC images (4 dims), got shape {images.shape}")
    n, h, w, _ = images.shape
    if not 0 <= max_shift < min(h, w):
        raise ValueError(f"max_shift={max_shift} must be in [0, {min(h, w) - 1}] for {h}x{w} images")
    if max_shift == 0:
        return images
    s = max_shift
    padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
    dy, dx = rng.integers(-s, s + 1, size=(2, n))
    rows = (s - dy)[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = (s - dx)[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
