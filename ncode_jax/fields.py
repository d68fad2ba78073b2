"""Parameterized vector fields ``f(t, x, θ)`` whose weights θ arrive as a flat vector.

Every field is a frozen, hashable description (no arrays inside) with

* ``state_shape`` — the per-sample shape of ``x`` (``x`` itself is ``(B, *state_shape)``);
* ``layout`` — a :class:`~ncode_jax.layout.ParamLayout` mapping flat θ to named weights;
* ``__call__(t, x, theta)`` — a pure function. ``theta`` is either *shared*, shape ``(P,)``
  (NODE: one field for the whole batch) or *per sample*, shape ``(B, P)`` (N-CODE: every sample
  follows its own field). Both forms compute the same thing sample by sample.

Per-sample dense layers are batched matrix products (``einsum('bi,bio->bo')``), so a batch of
different fields is still one XLA computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .layout import ParamLayout, ParamSpec

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,  # stable for large |u| (a hand-written 1/(1+exp(-u)) gives NaN grads)
    "identity": lambda u: u,
}


def activation(name: str) -> Callable[[Array], Array]:
    """Look up an activation by name, with an error that lists the known names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def _check_positive(who: str, **sizes) -> None:
    """``ValueError`` naming the first size that is not a positive integer."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{who}: {name} must be a positive integer, got {name}={value!r}")


def add_bias(y: Array, b: Array) -> Array:
    """``y + b`` with ``b`` broadcast to ``y``'s shape explicitly (trailing axes aligned, as in
    NumPy), so that a shared ``(O,)`` and a per-sample ``(B, O)`` bias both add to ``(B, O)``
    without implicit rank promotion (the library runs under ``jax_numpy_rank_promotion="raise"``).

    Raises:
      ValueError: (JAX's) when ``b``'s shape does not broadcast to ``y``'s.
    """
    return y + jnp.broadcast_to(b, y.shape)


def dense(x: Array, w: Array, b: Array | None = None) -> Array:
    """``x @ w + b`` for shared weights ``w: (I, O)`` (``x: (..., I)``, ``b: (O,)``) or per-sample
    weights ``w: (B, I, O)`` (``x: (B, I)``, ``b: (B, O)``)."""
    y = x @ w if w.ndim == 2 else jnp.einsum("bi,bio->bo", x, w)
    return y if b is None else add_bias(y, b)


class VectorField:
    """Base class: :meth:`__call__` checks shapes and dtypes, :meth:`evaluate` (what a solve calls
    at every stage) does not; both dispatch to :meth:`apply`."""

    state_shape: tuple[int, ...]
    layout: ParamLayout

    @property
    def num_params(self) -> int:
        """P, the size of flat θ."""
        return self.layout.size

    def check_x(self, x: Array, who: str = "x") -> None:
        if tuple(x.shape[1:]) != tuple(self.state_shape) or x.ndim != len(self.state_shape) + 1:
            raise ValueError(
                f"{who} has shape {tuple(x.shape)}, but {type(self).__name__} needs "
                f"(batch, {', '.join(map(str, self.state_shape))})"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{who} must be a floating-point array, got dtype {x.dtype}")

    def check_theta(self, theta: Array, batch: int, who: str = "theta") -> None:
        self.layout.check(theta, who)
        if theta.ndim == 2 and theta.shape[0] != batch:
            raise ValueError(f"{who} has batch {theta.shape[0]} but x has batch {batch}")
        if theta.ndim > 2:
            raise ValueError(f"{who} must be (P,) shared or (batch, P) per sample; got {theta.shape}")

    def __call__(self, t, x: Array, theta: Array) -> Array:
        """``dx/dt`` ``(B, *S)`` for θ shared ``(P,)`` or per sample ``(B, P)``, after checking
        the shapes and dtypes of ``x`` and θ.

        Raises:
          ValueError, TypeError: an ``x`` of the wrong shape or dtype, a θ of the wrong size,
            batch or dtype.
        """
        self.check_x(x)
        self.check_theta(theta, x.shape[0])
        return self.evaluate(t, x, theta)

    def evaluate(self, t, x: Array, theta: Array) -> Array:
        """``dx/dt`` without checks: what a solve calls at every stage (it checked ``x0`` and θ0
        once, where they entered). A field that defines its own ``__call__`` (and no
        ``evaluate``) is evaluated through it."""
        if type(self).__call__ is not VectorField.__call__:
            return self(t, x, theta)
        return self.apply(t, x, self.layout.unflatten(theta))

    def apply(self, t, x: Array, w: dict[str, Array]) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class MLPField(VectorField):
    """``f(t, x, θ) = W₂ σ(W₁ [x, t] + b₁) + b₂`` — the paper's two-layer MLP field (sec. 5.1).

    ``dim`` is the state size d, ``hidden`` the width (16 in the paper). With
    ``time_dependent=True`` the input is ``[x, t]`` (d + 1 entries).
    """

    dim: int
    hidden: int = 16
    act: str = "tanh"
    time_dependent: bool = False

    def __post_init__(self):
        activation(self.act)
        _check_positive("MLPField", dim=self.dim, hidden=self.hidden)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def layout(self) -> ParamLayout:
        d_in = self.dim + int(self.time_dependent)
        return ParamLayout(
            (
                ParamSpec("w1", (d_in, self.hidden)),
                ParamSpec("b1", (self.hidden,), "zeros"),
                ParamSpec("w2", (self.hidden, self.dim)),
                ParamSpec("b2", (self.dim,), "zeros"),
            )
        )

    def apply(self, t, x, w):
        if self.time_dependent:
            x = jnp.concatenate([x, jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0], 1))], -1)
        hid = activation(self.act)(dense(x, w["w1"], w["b1"]))
        return dense(hid, w["w2"], w["b2"])


@dataclass(frozen=True)
class LinearField(VectorField):
    """``f(t, x, θ) = A(θ) x`` with a dense ``A`` of shape ``(dim, dim)``."""

    dim: int

    def __post_init__(self):
        _check_positive("LinearField", dim=self.dim)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def layout(self) -> ParamLayout:
        return ParamLayout((ParamSpec("a", (self.dim, self.dim), fan_in=self.dim),))

    def matrix(self, theta: Array) -> Array:
        """The dense matrix ``A``: ``(dim, dim)`` or ``(B, dim, dim)``."""
        return self.layout.unflatten(theta)["a"]

    def apply(self, t, x, w):
        a = w["a"]
        return x @ a.T if a.ndim == 2 else jnp.einsum("bij,bj->bi", a, x)


@dataclass(frozen=True)
class SparseLinearField(VectorField):
    """``f(t, x, θ) = A(θ) x`` with a fixed sparse pattern: row i of A is non-zero only at
    columns ``(i + o) mod dim`` for ``o`` in ``offsets`` (default ``(0, 1)``: the diagonal and
    the cyclic super-diagonal, two entries per row — AutoN-CODE, sec. 5.3).

    θ holds ``dim * len(offsets)`` entries, weight ``a`` of shape ``(dim, len(offsets))`` with
    ``A[i, (i + offsets[k]) % dim] = a[i, k]``.
    """

    dim: int
    offsets: tuple[int, ...] = (0, 1)

    def __post_init__(self):
        _check_positive("SparseLinearField", dim=self.dim)
        try:
            offsets = tuple(self.offsets)
        except TypeError:
            raise ValueError(
                f"SparseLinearField: offsets must be a tuple of ints, got {self.offsets!r}") from None
        if any(isinstance(o, bool) or not isinstance(o, (int, np.integer)) for o in offsets):
            raise ValueError(f"SparseLinearField: offsets must be integers, got {self.offsets!r}")
        object.__setattr__(self, "offsets", tuple(int(o) for o in offsets))  # hashable, static
        if not self.offsets:
            raise ValueError("SparseLinearField needs at least one offset (non-zero per row)")
        cols = {o % self.dim for o in self.offsets}
        if len(cols) != len(self.offsets):
            raise ValueError(f"offsets {self.offsets} repeat a column modulo dim={self.dim}")

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def layout(self) -> ParamLayout:
        k = len(self.offsets)
        return ParamLayout((ParamSpec("a", (self.dim, k), fan_in=k),))

    def matrix(self, theta: Array) -> Float[Array, "*batch dim dim"]:
        """The dense equivalent of ``A(θ)`` (for tests and analysis)."""
        a = self.layout.unflatten(theta)["a"]
        rows = jnp.arange(self.dim)
        dense_a = jnp.zeros((*a.shape[:-2], self.dim, self.dim), a.dtype)
        for k, o in enumerate(self.offsets):
            dense_a = dense_a.at[..., rows, (rows + o) % self.dim].set(a[..., k])
        return dense_a

    def apply(self, t, x, w):
        # one product with the stacked shifts, not a slice of a per offset: the cotangent of a is
        # then one array, not a zero-padded a per offset summed (ParamLayout.unflatten, same reason)
        shifted = jnp.stack([jnp.roll(x, -o, axis=-1) for o in self.offsets], axis=-1)
        return jnp.sum(jnp.broadcast_to(w["a"], shifted.shape) * shifted, axis=-1)
