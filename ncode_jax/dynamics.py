"""The augmented field ``h = (f, g[, ℓ])`` on the state ``z = (x, θ[, c])`` (paper eq. 4–5).

* ``f`` — a :mod:`~ncode_jax.fields` vector field, ``dx/dt = f(t, x, θ)``.
* ``g`` — an optional closed-loop controller, ``dθ/dt = g(θ, x, t)``. Without it θ is
  constant, so it is *not* integrated: it rides in ``args`` and the state is ``x`` alone (the
  step-size control is then not diluted by components that never move).
* ``ℓ`` — an optional running cost, ``dc/dt = ℓ(t, x, θ, cost_args)`` with ``c`` of shape
  ``(B,)``. Reading ``c(T)`` gives ``∫₀ᵀ ℓ dt`` and any diffrax adjoint differentiates it: this
  is Theorem 1's augmented adjoint without a hand-written backward pass. A cost object with a
  true attribute ``sees_field`` is called as ``ℓ(t, x, θ, cost_args, dx=f(t, x, θ),
  field_fn=lambda x: f(t, x, θ))`` instead: regularisers of the flow itself (kinetic energy
  ``‖f‖²``, Jacobian norms through ``jax.jvp(field_fn, ...)``) reuse the evaluation of ``f``
  that the step already made.

Everything differentiable travels in ``args``, a :class:`DynamicsArgs` (the constant θ, the
feedback parameters, the running cost's arguments), never in closures (docs/design.md,
"Parameters through args").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array

from .control import Feedback
from .fields import VectorField

RunningCost = Callable[[Any, Array, Array, Any], Array]


class DynamicsArgs(NamedTuple):
    """What the dynamics take besides the state (diffrax's ``args``): ``theta``, the constant θ of
    an open loop (``(P,)`` or ``(B, P)``; None when θ is integrated); ``feedback``, the controller
    g's parameters (closed loop); ``cost_args``, the running cost's arguments (any PyTree)."""

    theta: Array | None = None
    feedback: Any = None
    cost_args: Any = None


class State(NamedTuple):
    """ODE state: ``x`` ``(B, *S)``; ``theta`` ``(B, P)`` or None; ``cost`` ``(B,)`` or None."""

    x: Array
    theta: Array | None = None
    cost: Array | None = None


@dataclass(frozen=True)
class Dynamics:
    """``h(t, z, args)`` for diffrax. Hashable, array-free: safe as a static argument."""

    field: VectorField
    feedback: Feedback | None = None
    running_cost: RunningCost | None = None

    def __post_init__(self):
        if self.feedback is not None and self.feedback.layout != self.field.layout:
            raise ValueError(
                "Dynamics: the feedback controller was built for a different layout "
                f"(P={self.feedback.layout.size}) than the field (P={self.field.layout.size})"
            )

    @property
    def closed_loop(self) -> bool:
        return self.feedback is not None

    def __call__(self, t, z: State, args: DynamicsArgs) -> State:
        """``dz/dt`` at time ``t``; the field is evaluated without checks (the solve checked its
        inputs where they entered)."""
        theta = z.theta if self.closed_loop else args.theta
        dx = self.field.evaluate(t, z.x, theta)
        dtheta = self.feedback(args.feedback, t, theta, z.x) if self.closed_loop else None
        dc = None
        if self.running_cost is not None:
            if getattr(self.running_cost, "sees_field", False):
                value = self.running_cost(
                    t, z.x, theta, args.cost_args, dx=dx,
                    field_fn=lambda x_: self.field.evaluate(t, x_, theta),
                )
            else:
                value = self.running_cost(t, z.x, theta, args.cost_args)
            dc = jnp.broadcast_to(value, (z.x.shape[0],)).astype(z.x.dtype)
        return State(dx, dtheta, dc)

    def initial_state(self, x0: Array, theta0: Array) -> tuple[State, Array | None]:
        """Split ``(x0, θ0)`` into the integrated state and the constant θ kept in ``args``."""
        cost0 = jnp.zeros((x0.shape[0],), x0.dtype) if self.running_cost is not None else None
        if self.closed_loop:
            theta = jnp.broadcast_to(theta0, (x0.shape[0], self.field.layout.size))
            return State(x0, theta, cost0), None
        return State(x0, None, cost0), theta0
