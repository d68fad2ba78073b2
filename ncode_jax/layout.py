"""Static layouts that map a flat parameter vector θ to named weight arrays.

A vector field's weights are a *state* in N-CODE (θ(t) evolves with the flow), so they live
as one flat vector per sample.  A :class:`ParamLayout` is the static, hashable description of
how that flat vector is cut into named arrays, how it is initialised, and how a batch of flat
vectors ``(..., P)`` becomes a dict of batched weights ``{name: (..., *shape)}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

Init = Literal["lecun", "zeros", "normal"]


@dataclass(frozen=True)
class ParamSpec:
    """One named weight: its shape, how to initialise it and its fan-in (for ``lecun``)."""

    name: str
    shape: tuple[int, ...]
    init: Init = "lecun"
    fan_in: int | None = None
    scale: float = 1.0

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamLayout:
    """An ordered tuple of :class:`ParamSpec`; flat θ is their concatenation (C order)."""

    specs: tuple[ParamSpec, ...]

    def __post_init__(self):
        if not self.specs:
            raise ValueError("ParamLayout needs at least one ParamSpec (a field without weights has no θ)")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"ParamLayout: duplicate weight names in {names}")

    @property
    def size(self) -> int:
        """P, the length of the flat θ vector."""
        return sum(s.size for s in self.specs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``{name: (start, stop)}`` inside the flat vector."""
        out, start = {}, 0
        for s in self.specs:
            out[s.name] = (start, start + s.size)
            start += s.size
        return out

    def check(self, theta: Array, who: str = "theta") -> None:
        """Raise a ValueError unless ``theta`` has shape ``(..., P)`` and a float dtype (a
        TypeError if it is not an array at all)."""
        if not hasattr(theta, "ndim") or not hasattr(theta, "dtype"):
            raise TypeError(
                f"{who} must be an array of shape (..., P={self.size}), got {type(theta).__name__}")
        if theta.ndim < 1 or theta.shape[-1] != self.size:
            raise ValueError(
                f"{who} has shape {tuple(theta.shape)}, but this layout needs a last axis of "
                f"size P={self.size} (weights {', '.join(f'{s.name}{s.shape}' for s in self.specs)})"
            )
        if not jnp.issubdtype(theta.dtype, jnp.floating):
            raise TypeError(f"{who} must be a floating-point array, got dtype {theta.dtype}")

    def unflatten(self, theta: Float[ArrayLike, "*batch P"]) -> dict[str, Array]:
        """Cut ``theta`` of shape ``(*batch, P)`` into ``{name: (*batch, *shape)}``.

        One ``jnp.split``, not a slice per weight: the cotangent of a split is one concatenation
        of the weights' cotangents, where a slice's is a zero-padded θ-sized array per weight,
        summed (six ``(B, P)`` pads and adds per field evaluation in the backward pass of a conv
        N-CODE; benchmarks/README.md, "Fifth session"). Same values either way; a NumPy θ gives
        NumPy weights (views), as slicing did."""
        self.check(theta)
        batch = theta.shape[:-1]
        cuts = [stop for _, stop in self.offsets().values()][:-1]
        split = np.split if isinstance(theta, np.ndarray) else jnp.split  # numpy in, numpy out
        parts = split(theta, cuts, axis=-1)
        return {s.name: part.reshape(*batch, *s.shape) for s, part in zip(self.specs, parts)}

    def flatten(self, weights: dict[str, Array]) -> Float[Array, "*batch P"]:
        """Inverse of :meth:`unflatten`; the batch shape is read from the first weight."""
        missing = set(self.names) - set(weights)
        if missing:
            raise KeyError(f"ParamLayout.flatten: missing weights {sorted(missing)}")
        first = self.specs[0]
        batch = weights[first.name].shape[: weights[first.name].ndim - len(first.shape)]
        parts = []
        for s in self.specs:
            w = weights[s.name]
            if tuple(w.shape) != (*batch, *s.shape):
                raise ValueError(
                    f"weight {s.name!r} has shape {tuple(w.shape)}, expected {(*batch, *s.shape)}"
                )
            parts.append(w.reshape(*batch, s.size))
        return jnp.concatenate(parts, axis=-1)

    def init(self, key: PRNGKeyArray, dtype=jnp.float32) -> Float[Array, " P"]:
        """A flat θ with each weight initialised by its spec (LeCun-normal kernels, zero biases)."""
        keys = jax.random.split(key, len(self.specs))
        parts = []
        for k, s in zip(keys, self.specs):
            if s.init == "zeros":
                w = jnp.zeros((s.size,), dtype)
            else:
                std = s.scale
                if s.init == "lecun":
                    fan_in = s.fan_in if s.fan_in is not None else int(np.prod(s.shape[:-1]) or 1)
                    std = s.scale / math.sqrt(fan_in)
                w = std * jax.random.normal(k, (s.size,), dtype)
            parts.append(w)
        return jnp.concatenate(parts)

    def init_std(self, dtype=jnp.float32) -> Float[Array, " P"]:
        """The per-entry standard deviation that :meth:`init` uses (0 for zero-initialised)."""
        parts = []
        for s in self.specs:
            if s.init == "zeros":
                std = 0.0
            elif s.init == "lecun":
                fan_in = s.fan_in if s.fan_in is not None else int(np.prod(s.shape[:-1]) or 1)
                std = s.scale / math.sqrt(fan_in)
            else:
                std = s.scale
            parts.append(jnp.full((s.size,), std, dtype))
        return jnp.concatenate(parts)
