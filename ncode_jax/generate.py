"""Latent samplers for generation (paper sec. 5.4 and appendix A.7).

A deterministic autoencoder generates by fitting a density to its latent codes, sampling it and
decoding the samples. Three samplers, one interface (``sample(n, seed) -> (n, d)`` float32):

* :class:`GMMSampler` — a Gaussian mixture fitted by expectation–maximisation (scikit-learn's
  ``GaussianMixture``) with one k-means initialisation, tolerance ``1e-3`` and at most 100
  iterations, as in appendix A.7; full covariances by default.
* :class:`KDESampler` — a Gaussian kernel density estimate (scikit-learn's ``KernelDensity``)
  on the codes standardised per dimension; samples are mapped back. ``bandwidth`` is the kernel
  width in standardised units (Scott's rule ``n^(-1/(d+4))`` when None).
* :class:`PriorSampler` — N(0, I), the VAE's prior.

The fits are NumPy/scikit-learn code (not JAX): they run once per evaluation on a few thousand
codes.
"""

from __future__ import annotations

import warnings

import numpy as np
from jaxtyping import Float

GMM_TOL = 1e-3
GMM_MAX_ITER = 100


def _check_codes(codes, who: str) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"{who}: latent codes must be a non-empty (num_codes, dim) array, got shape "
                         f"{codes.shape}")
    if not np.all(np.isfinite(codes)):
        raise ValueError(f"{who}: latent codes contain NaN or inf")
    return codes


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"number of samples must be a positive int, got {n!r}")
    return int(n)


class GMMSampler:
    """Gaussian mixture with ``n_components`` fitted to ``codes`` ``(N, d)``.

    Raises a ValueError when ``n_components > N`` (a mixture cannot have more components than
    codes). ``fit_info`` records what the fit had to work with: codes per component, distinct
    codes, components that hold no code (weight below half a code), whether EM converged and in
    how many iterations, scikit-learn's warnings, and a ``note`` for a collapsed fit (fewer
    distinct codes than components, or empty components: also a ``UserWarning``) and for fewer than
    ``d + 1`` codes per component (each full covariance is then underdetermined and held up only by
    scikit-learn's ``reg_covar`` ridge).
    """

    def __init__(self, codes: Float[np.ndarray, "N d"], n_components: int, *, seed: int = 0,
                 covariance_type: str = "full", tol: float = GMM_TOL, max_iter: int = GMM_MAX_ITER,
                 reg_covar: float = 1e-6):
        from sklearn.mixture import GaussianMixture

        codes = _check_codes(codes, "GMMSampler")
        n, d = codes.shape
        if isinstance(n_components, bool) or not isinstance(n_components, int | np.integer) \
                or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        if n_components > n:
            raise ValueError(f"cannot fit a Gaussian mixture with {n_components} components to {n} "
                             f"latent codes: use at most {n} components (or encode more data)")
        self.gmm = GaussianMixture(n_components=int(n_components), covariance_type=covariance_type,
                                   tol=tol, max_iter=max_iter, n_init=1, init_params="kmeans",
                                   reg_covar=reg_covar, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # recorded in fit_info (and a collapse warned about below)
            self.gmm.fit(codes)
        per = n / n_components
        distinct = len(np.unique(codes, axis=0))
        empty = int(np.sum(self.gmm.weights_ * n < 0.5))  # components that hold no code
        self.fit_info = {"n_components": int(n_components), "n_codes": n, "dim": d,
                         "codes_per_component": round(per, 2), "converged": bool(self.gmm.converged_),
                         "n_iter": int(self.gmm.n_iter_), "covariance_type": covariance_type,
                         "distinct_codes": distinct, "empty_components": empty,
                         "warnings": sorted({str(w.message) for w in caught})}
        notes = []
        if distinct < n_components or empty:
            notes.append(f"collapsed fit: {empty} of {n_components} components hold no code "
                         f"({distinct} distinct codes among {n}); samples come from the others only "
                         "(the codes may have collapsed: check the encoder, or use fewer components)")
            warnings.warn(f"GMMSampler: {notes[-1]}", UserWarning, stacklevel=2)
        if covariance_type == "full" and per < d + 1:
            notes.append(f"{per:.1f} codes per component < dim+1={d + 1}: full "
                         f"covariances are underdetermined, held up by reg_covar={reg_covar}")
        if notes:
            self.fit_info["note"] = "; ".join(notes)

    def sample(self, n: int, seed: int = 0) -> Float[np.ndarray, "n d"]:
        n = _check_n(n)
        rng = np.random.default_rng(seed)
        self.gmm.random_state = int(rng.integers(2**31 - 1))
        x, _ = self.gmm.sample(n)  # sorted by component: shuffle
        return x[rng.permutation(n)].astype(np.float32)

    def predict(self, codes) -> np.ndarray:
        """Most likely component of each code (used to colour t-SNE plots, fig. A.7)."""
        return self.gmm.predict(_check_codes(codes, "GMMSampler.predict"))


class KDESampler:
    """Gaussian kernel density on per-dimension standardised codes; ``bandwidth`` in those units."""

    def __init__(self, codes: Float[np.ndarray, "N d"], *, bandwidth: float | None = None):
        from sklearn.neighbors import KernelDensity

        codes = _check_codes(codes, "KDESampler")
        n, d = codes.shape
        if bandwidth is None:
            bandwidth = n ** (-1.0 / (d + 4))
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        self.mean = codes.mean(0)
        self.std = np.maximum(codes.std(0), 1e-12)
        self.bandwidth = float(bandwidth)
        self.kde = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth)
        self.kde.fit((codes - self.mean) / self.std)
        self.fit_info = {"n_codes": n, "dim": d, "bandwidth": round(self.bandwidth, 4)}

    def sample(self, n: int, seed: int = 0) -> Float[np.ndarray, "n d"]:
        u = self.kde.sample(_check_n(n), random_state=seed)
        return (u * self.std + self.mean).astype(np.float32)


class PriorSampler:
    """N(0, I) in ``dim`` dimensions (the VAE's prior)."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.fit_info = {"dim": self.dim}

    def sample(self, n: int, seed: int = 0) -> Float[np.ndarray, "n d"]:
        return np.random.default_rng(seed).standard_normal((_check_n(n), self.dim)).astype(np.float32)
