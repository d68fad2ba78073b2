"""The paper's toy problems (sec. 5.1), generated from a seed.

* :func:`reflection` — learn ``φ(x) = -x`` on ``[-1, 1]`` (Dupont et al., 2019). A 1-D flow
  map is increasing, so a NODE's MSE cannot go below ``E[x²] = 1/3``.
* :func:`annuli` — two classes in ℝ²: a disk ``|x| < r_inner`` (label 0) inside an annulus
  ``r_outer[0] < |x| < r_outer[1]`` (label 1). No homeomorphism of the plane makes them
  linearly separable.

:func:`toy_split` draws one split of either as a :class:`ToySplit` (host arrays) for training.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Shaped


def reflection(key: PRNGKeyArray, n: int) -> tuple[Array, Array]:
    """``x ~ U[-1, 1]``, shape ``(n, 1)``; target ``y = -x``."""
    if n < 1:
        raise ValueError(f"reflection: n must be >= 1, got {n}")
    x = jax.random.uniform(key, (n, 1), minval=-1.0, maxval=1.0)
    return x, -x


def annuli(
    key: PRNGKeyArray,
    n: int,
    r_inner: float = 0.5,
    r_outer: tuple[float, float] = (1.0, 1.5),
) -> tuple[Array, Array]:
    """``n`` points, half in the disk (label 0) and half in the annulus (label 1), uniform in
    area; returns ``x`` ``(n, 2)`` float32 and ``y`` ``(n,)`` int32, shuffled."""
    if n < 2:
        raise ValueError(f"annuli: n must be >= 2, got {n}")
    if not 0 < r_inner < r_outer[0] < r_outer[1]:
        raise ValueError(f"annuli: need 0 < r_inner < r_outer[0] < r_outer[1], got {r_inner}, {r_outer}")
    k_r, k_a, k_p = jax.random.split(key, 3)
    n0 = n // 2
    labels = jnp.concatenate([jnp.zeros(n0, jnp.int32), jnp.ones(n - n0, jnp.int32)])
    lo = jnp.where(labels == 0, 0.0, r_outer[0])
    hi = jnp.where(labels == 0, r_inner, r_outer[1])
    u = jax.random.uniform(k_r, (n,))
    radius = jnp.sqrt(lo**2 + u * (hi**2 - lo**2))  # uniform in area
    angle = jax.random.uniform(k_a, (n,), maxval=2 * jnp.pi)
    x = jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], axis=-1)
    perm = jax.random.permutation(k_p, n)
    return x[perm], labels[perm]


#: the toy problems by name
PROBLEMS = {"reflection": reflection, "annuli": annuli}


class ToySplit(NamedTuple):
    """One split of a toy problem, in memory. Its fields are named as an image
    :class:`~ncode_jax.data.Dataset`'s, so that :class:`~ncode_jax.data.BatchIterator` and the
    training engine batch both alike.

    Attributes:
        images: ``(n, d)`` float32 points (``d`` = 1 for reflection, 2 for annuli).
        labels: ``(n,)`` float32 target ``-x`` (reflection) or int32 class (annuli).
        name: the problem, a key of :data:`PROBLEMS`.
        split: ``"train"`` or ``"test"``.
    """

    images: Float[np.ndarray, "n d"]
    labels: Shaped[np.ndarray, " n"]
    name: str
    split: str

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])


def toy_split(problem: str, key: PRNGKeyArray, n: int, split: str = "train") -> ToySplit:
    """``n`` points of ``problem`` (a key of :data:`PROBLEMS`) drawn with ``key``, as host arrays;
    reflection's target ``-x`` as 1-D labels. Raises ValueError for an unknown problem or ``n``
    too small for it."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown toy problem {problem!r}; known: {', '.join(PROBLEMS)}")
    x, y = PROBLEMS[problem](key, n)
    if problem == "reflection":
        y = y[:, 0]
    return ToySplit(np.asarray(x), np.asarray(y), problem, split)
