"""Controllers: where the field's weights θ come from and how they move.

* :class:`StaticInit` — θ(0) is one learned vector shared by all inputs (NODE / ANODE).
* :class:`Hypernetwork` — open loop, θ(0) = γ(x(0)) per sample (γ an MLP).
* :class:`Feedback` — closed loop, dθ/dt = g(θ, x, t) (g an MLP on ``[θ, x, t]``).
* :func:`augment` — zero-pad the state's last axis (ANODE-style augmentation).

Each controller is a frozen, hashable description with ``init(key) -> params`` and a pure
``__call__(params, ...)``; parameters are plain PyTrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .fields import activation, add_bias
from .layout import ParamLayout
from .nn import mlp_apply, mlp_init


def _check_mlp(who: str, in_name: str, in_size, hidden) -> tuple[int, ...]:
    """Validate an MLP controller's sizes; returns ``hidden`` as a tuple (hashable)."""
    if isinstance(in_size, bool) or not isinstance(in_size, int) or in_size < 1:
        raise ValueError(f"{who}: {in_name} must be a positive integer, got {in_size!r}")
    try:
        widths = tuple(hidden)
    except TypeError:
        raise ValueError(f"{who}: hidden must be a tuple of layer widths, got {hidden!r}") from None
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"{who}: hidden widths must be positive integers, got hidden={hidden!r}")
    return widths


def augment(x: Array, extra: int) -> Array:
    """Append ``extra`` zero channels on the last axis of ``x`` (``extra=0`` returns ``x``)."""
    if extra < 0:
        raise ValueError(f"augment: extra channels must be >= 0, got {extra}")
    if extra == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, extra)]
    return jnp.pad(x, pad)


@dataclass(frozen=True)
class StaticInit:
    """θ(0) = θ̄, a learned vector shared by the whole batch: returns shape ``(P,)``."""

    layout: ParamLayout

    def init(self, key: PRNGKeyArray, dtype=jnp.float32) -> dict[str, Array]:
        return {"theta": self.layout.init(key, dtype)}

    def __call__(self, params, x0: Array) -> Float[Array, " P"]:
        del x0
        return params["theta"]


@dataclass(frozen=True)
class Hypernetwork:
    """Open-loop control θ(0) = γ(x(0)) = θ̄ + MLP(flatten(x(0))): returns ``(B, P)``.

    ``in_size`` is the number of entries of one input sample; ``hidden`` the MLP widths (the
    paper's image classifier uses one layer of 10 units). The MLP's last layer is scaled by the
    layout's per-weight init scale, so θ(0) starts near a well-initialised field.
    """

    layout: ParamLayout
    in_size: int
    hidden: tuple[int, ...] = (32,)
    act: str = "tanh"

    def __post_init__(self):
        object.__setattr__(self, "hidden", _check_mlp("Hypernetwork", "in_size", self.in_size, self.hidden))
        activation(self.act)

    def init(self, key: PRNGKeyArray, dtype=jnp.float32) -> dict:
        k_base, k_mlp = jax.random.split(key)
        sizes = (self.in_size, *self.hidden, self.layout.size)
        return {
            "theta": self.layout.init(k_base, dtype),
            "mlp": mlp_init(k_mlp, sizes, last_scale=self.layout.init_std(dtype), dtype=dtype),
        }

    def __call__(self, params, x0: Array) -> Float[Array, "B P"]:
        flat = x0.reshape(x0.shape[0], math.prod(x0.shape[1:]))
        if flat.shape[1] != self.in_size:
            raise ValueError(
                f"Hypernetwork expects inputs with {self.in_size} entries per sample, got "
                f"x0 of shape {tuple(x0.shape)} ({flat.shape[1]} per sample)"
            )
        return add_bias(mlp_apply(params["mlp"], flat, self.act), params["theta"])


@dataclass(frozen=True)
class Feedback:
    """Closed-loop control ``dθ/dt = g(θ, x, t) = MLP([θ, flatten(x), t])``: returns ``(B, P)``.

    ``x_size`` is the number of entries of one state sample. The last layer starts small
    (``out_scale`` times LeCun), so training begins close to open-loop dynamics.
    """

    layout: ParamLayout
    x_size: int
    hidden: tuple[int, ...] = (32,)
    act: str = "tanh"
    out_scale: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "hidden", _check_mlp("Feedback", "x_size", self.x_size, self.hidden))
        activation(self.act)

    def init(self, key: PRNGKeyArray, dtype=jnp.float32) -> dict:
        sizes = (self.layout.size + self.x_size + 1, *self.hidden, self.layout.size)
        return {"mlp": mlp_init(key, sizes, last_scale=self.out_scale, dtype=dtype)}

    def __call__(self, params, t, theta: Array, x: Array) -> Float[Array, "B P"]:
        b = x.shape[0]
        theta = jnp.broadcast_to(theta, (b, self.layout.size))
        flat = x.reshape(b, -1)
        tt = jnp.broadcast_to(jnp.asarray(t, x.dtype), (b, 1))
        # θ-sized output at every solver stage: on CPU the bias is folded into the last matrix
        # product (see mlp_apply); not on accelerators, whose default matmul precision (TF32, bf16
        # passes) would round the bias, and whose batch sums are not the slow part
        return mlp_apply(params["mlp"], jnp.concatenate([theta, flat, tt], axis=-1), self.act,
                         fold_last_bias=jax.default_backend() == "cpu")
