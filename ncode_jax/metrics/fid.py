"""Fréchet distance between the Gaussians fitted to two sets of feature vectors (FID).

For features ``a`` with mean ``μ₁``, covariance ``Σ₁`` and features ``b`` with ``μ₂``, ``Σ₂``::

    d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^{1/2}

(the squared 2-Wasserstein distance between the two Gaussians). Which network produced the
features decides what the number means: see :mod:`ncode_jax.metrics.digit_features` (a small
digit classifier, reported as "digit-feature FID") and :mod:`ncode_jax.metrics.inception`
(InceptionV3 pool3 features, the usual "FID").

Numerics. ``Σ₁ Σ₂`` is not symmetric, and the usual ``scipy.linalg.sqrtm(Σ₁ @ Σ₂)`` returns
complex values or garbage when a covariance is singular — which it is whenever there are fewer
samples than feature dimensions. Here both covariances get a symmetric square root from
``eigh`` (eigenvalues at round-off level, ``|λ| ≤ D·ε·max|λ|``, and round-off negatives count as
exactly 0, so a singular covariance adds no spurious ``√ε`` terms), and

    tr (Σ₁ Σ₂)^{1/2} = tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} = ‖Σ₂^{1/2} Σ₁^{1/2}‖_*  (nuclear norm),

the sum of the singular values of ``B = Σ₂^{1/2} Σ₁^{1/2}`` (since ``BᵀB = Σ₁^{1/2} Σ₂ Σ₁^{1/2}``).
Taking singular values of ``B`` instead of eigenvalues of ``BᵀB`` avoids squaring: small
eigen-directions keep their accuracy (identical covariances give ``|d²| ≤ 1e-12·tr Σ`` in the
tests, where eigenvalues of ``BᵀB`` gave errors of ~3e-9·tr Σ on 128-d digit features). The
final distance is clipped to ``≥ 0``. Everything is float64 numpy.

Cost: two symmetric eigen-decompositions and one SVD of ``D×D`` matrices. For D = 2048 on this
project's busy 2-core machine: 14.8 s with ``OPENBLAS_NUM_THREADS=1`` (load average 4.5),
42 s with OpenBLAS's default threads (load 1.4–2.5) — threads thrash on shared cores; set
``OPENBLAS_NUM_THREADS=1`` there (see ``docs/inception_weights.md``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["feature_statistics", "fid_from_features", "frechet_distance"]

# A covariance eigenvalue below -_NEG_TOL · (largest |eigenvalue|) is not round-off: the matrix
# is not a covariance and the caller has a bug.
_NEG_TOL = 1e-6


def _as_features(features, name: str) -> np.ndarray:
    x = np.asarray(features)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name}: features must be real numbers, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(
            f"{name}: features must be a 2-D array (num_samples, feature_dim), got shape {x.shape}"
        )
    n, d = x.shape
    if n < 2:
        raise ValueError(f"{name}: need at least 2 samples to estimate a covariance, got {n}")
    if d < 1:
        raise ValueError(f"{name}: feature dimension must be >= 1, got shape {x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(
            f"{name}: features contain NaN or inf in {bad.size} of {n} samples (first at index {int(bad[0])})"
        )
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (``ddof=1``) of ``(N, D)`` features,
    both float64. Needs ``N >= 2`` finite samples; ``N <= D`` gives a singular covariance, which
    :func:`frechet_distance` handles (the estimate is then just noisy)."""
    x = _as_features(features, "feature_statistics")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{name}: mean must be 1-D (D,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"{name}: covariance must have shape ({d}, {d}) to match the mean, got {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mean or covariance contains NaN or inf")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-8 * scale:
        raise ValueError(
            f"{name}: covariance is not symmetric (max |Σ - Σᵀ| = {asym:.3g}, scale {scale:.3g})"
        )
    return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
    """Symmetric square root of a covariance; raises unless it is PSD up to round-off."""
    w, v = np.linalg.eigh(sigma)
    top = max(float(np.abs(w).max()), np.finfo(np.float64).tiny)
    if w.min() < -_NEG_TOL * top:
        raise ValueError(
            f"{name}: covariance is not positive semi-definite (smallest eigenvalue {w.min():.3g}, "
            f"largest |eigenvalue| {top:.3g})"
        )
    return (v * np.sqrt(_drop_round_off(w))) @ v.T


def _drop_round_off(w: np.ndarray) -> np.ndarray:
    """Eigenvalues at round-off level (``|λ| <= D·ε·max|λ|``, incl. small negatives) → exactly 0.

    A singular covariance has eigenvalues that are 0 in exact arithmetic but ±1e-16-ish in
    floating point; their square roots (1e-8-ish each) would add a spurious, dimension-dependent
    bias to ``tr (Σ₁Σ₂)^{1/2}``.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max()), 0.0)
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Stable for singular / rank-deficient covariances (see the module docstring); the result is
    a non-negative Python float. Raises ``ValueError`` for mismatched shapes, non-finite values,
    or matrices that are not symmetric positive semi-definite (beyond round-off).
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first distribution")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second distribution")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimensions differ: first distribution has {mu1.shape[0]}, second {mu2.shape[0]}"
        )
    root1 = _psd_sqrt(sigma1, "first distribution")
    root2 = _psd_sqrt(sigma2, "second distribution")
    # tr (Σ₁Σ₂)^{1/2} = nuclear norm of Σ₂^{1/2} Σ₁^{1/2}
    tr_sqrt = float(np.linalg.svd(root2 @ root1, compute_uv=False).sum())
    diff = mu1 - mu2
    d2 = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) - 2.0 * tr_sqrt
    return max(d2, 0.0)


def fid_from_features(features_a, features_b) -> float:
    """Fréchet distance between the Gaussians fitted to two ``(N, D)`` feature sets (the sets
    may have different ``N``; ``D`` must agree)."""
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: features_a has {a.shape[1]} (shape {a.shape}), "
            f"features_b has {b.shape[1]} (shape {b.shape})"
        )
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
