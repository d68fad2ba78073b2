"""The N-CODE module: initial control → augmented ODE → final state, as one pure function.

``NCODE`` composes a field ``f``, where θ(0) comes from (:class:`StaticInit` or
:class:`Hypernetwork`), an optional closed-loop :class:`Feedback` and optional zero-channel
augmentation of the input. The four model families of the paper are one line each::

    NCODE.build("node",   field, data_shape)   # θ shared and constant
    NCODE.build("anode",  field, data_shape, augment=1)
    NCODE.build("open",   field, data_shape)   # θ(0) = γ(x(0)), dθ/dt = 0
    NCODE.build("closed", field, data_shape)   # θ(0) = θ̄,       dθ/dt = g(θ, x, t)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .control import Feedback, Hypernetwork, StaticInit, augment
from .dynamics import Dynamics, RunningCost
from .fields import VectorField
from .solve import Solution, solve
from .solving.options import SOLVE_CONFIG_FIELDS, SolveConfig

KINDS = ("node", "anode", "open", "closed", "open_closed")


@dataclass(frozen=True)
class NCODE:
    """Initial control + (optional) feedback + field, on inputs padded by ``augment`` channels."""

    field: VectorField
    initial: StaticInit | Hypernetwork
    feedback: Feedback | None = None
    augment: int = 0
    running_cost: RunningCost | None = None

    def __post_init__(self):
        if self.initial.layout != self.field.layout:
            raise ValueError("NCODE: the initial controller's layout does not match the field's")
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) or self.augment < 0:
            raise ValueError(f"NCODE: augment must be an integer >= 0, got {self.augment!r}")

    @classmethod
    def build(
        cls,
        kind: str,
        field: VectorField,
        data_shape: tuple[int, ...],
        *,
        augment: int = 0,
        hidden: tuple[int, ...] = (32,),
        feedback_hidden: tuple[int, ...] = (32,),
        running_cost: RunningCost | None = None,
    ) -> NCODE:
        """One of ``node``, ``anode``, ``open``, ``closed`` (static θ(0) + feedback, as in the
        paper's fig. 3) or ``open_closed`` (γ(x(0)) + feedback). ``data_shape`` is one input
        sample's shape before augmentation."""
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; choose one of {list(KINDS)}")
        if kind == "node" and augment:
            raise ValueError("a NODE has no augmentation; use kind='anode'")
        if not isinstance(data_shape, (tuple, list)) or not data_shape:
            raise ValueError(
                f"data_shape must be one input sample's shape, a non-empty tuple such as (2,) or "
                f"(28, 28, 1); got {data_shape!r}"
            )
        layout = field.layout
        if kind in ("open", "open_closed"):
            initial = Hypernetwork(layout, math.prod(data_shape), hidden)
        else:
            initial = StaticInit(layout)
        feedback = (
            Feedback(layout, math.prod(field.state_shape), feedback_hidden)
            if kind in ("closed", "open_closed")
            else None
        )
        model = cls(field, initial, feedback, augment, running_cost)
        model.check_data_shape(tuple(data_shape))
        return model

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        padded = (*data_shape[:-1], data_shape[-1] + self.augment) if data_shape else data_shape
        if tuple(padded) != tuple(self.field.state_shape):
            raise ValueError(
                f"inputs of shape {data_shape} padded by {self.augment} channel(s) give "
                f"{padded}, but the field's state shape is {self.field.state_shape}"
            )

    @property
    def dynamics(self) -> Dynamics:
        return Dynamics(self.field, self.feedback, self.running_cost)

    def with_running_cost(self, running_cost: RunningCost | None) -> NCODE:
        return replace(self, running_cost=running_cost)

    def init(self, key: PRNGKeyArray, dtype=jnp.float32) -> dict:
        k_init, k_fb = jax.random.split(key)
        params = {"initial": self.initial.init(k_init, dtype)}
        if self.feedback is not None:
            params["feedback"] = self.feedback.init(k_fb, dtype)
        return params

    def check_params(self, params) -> None:
        """``ValueError`` unless ``params`` has the parts this model needs (from :meth:`init`)."""
        need = ["initial"] + (["feedback"] if self.feedback is not None else [])
        if not isinstance(params, dict):
            raise ValueError(f"NCODE params must be the dict of model.init(key), got {type(params).__name__}")
        missing = [k for k in need if params.get(k) is None]
        if missing:
            kind = "closed-loop " if self.feedback is not None else ""
            raise ValueError(
                f"this {kind}NCODE needs params with keys {need} (from model.init(key)); "
                f"missing {missing}"
            )

    def initial_theta(self, params: dict, x0: Array) -> Array:
        """θ(0): ``(P,)`` for a static initial controller, ``(B, P)`` for a hypernetwork."""
        self.check_params(params)
        return self.initial(params["initial"], x0)

    def __call__(self, params: dict, x0: Array, *, cost_args=None, config: SolveConfig | None = None,
                 **options) -> Solution:
        """Solve from data ``x0`` of shape ``(B, *data_shape)`` with the solver settings ``config``
        (a :class:`~ncode_jax.SolveConfig`, or its fields as keyword arguments, which build one),
        the running cost's arguments ``cost_args``, and :func:`~ncode_jax.solve`'s other keyword
        arguments (``ts``, ``throw``, ``check_grads``) in ``options``.

        Raises:
          ValueError: ``x0`` not batched or of the wrong sample shape, ``params`` without the
            parts this model needs, and everything :func:`~ncode_jax.solve` raises.
        """
        x0 = jnp.asarray(x0) if isinstance(x0, (list, tuple, np.ndarray)) else x0
        if not isinstance(x0, jax.Array):
            raise TypeError(f"x0 must be an array of shape (batch, *data_shape), got {type(x0).__name__}")
        if x0.ndim < 2:
            raise ValueError(f"x0 must be batched, shape (batch, *data_shape); got {tuple(x0.shape)}")
        self.check_data_shape(tuple(x0.shape[1:]))
        theta0 = self.initial_theta(params, x0)
        return solve(self.dynamics, augment(x0, self.augment), theta0, feedback=params.get("feedback"),
                     cost_args=cost_args, config=config, **options)

    def inverse(self, params: dict, x_t1: Array, theta_t1: Array | None = None, *, t1: float,
                t0: float = 0.0, config: SolveConfig | None = None, **options) -> Solution:
        """Integrate the flow backwards from ``t1`` to ``t0``: recover ``x(t0)`` from ``x(t1)``.

        ``t1`` (required) must be the end time of the forward solve (e.g. ``float(sol.ts[-1])``).
        The flow of an ODE is invertible; N-CODE's is too once the weights at ``t1`` are known,
        since ``(x, θ)`` together follow one ODE. Pass ``x_t1`` (``(B, *state_shape)``, the
        *augmented* state, e.g. ``sol.x``) and ``theta_t1``: ``sol.theta`` for ``open``,
        ``closed`` and ``open_closed`` models (θ(t1), per sample); ``None`` for ``node`` and
        ``anode``, whose θ is the learned constant. Returns the :class:`Solution` of the
        backward solve, whose ``x`` is ``x(t0)`` (augmented channels included); a running cost
        is not integrated (``cost`` is None). The solver settings are ``config`` (or its fields
        as keyword arguments) with the interval replaced by ``[t1, t0]``.

        Accuracy: the backward solve is a new numerical solve, so ``x(t0)`` is recovered to the
        solver's accuracy (``tests/test_reverse_time.py``: 1e-6 with tight tolerances), not exactly.

        Raises:
          ValueError: a missing ``theta_t1`` for a model whose θ depends on the input, and
            everything :func:`~ncode_jax.solve.solve` raises.
        """
        if theta_t1 is None:
            if not isinstance(self.initial, StaticInit) or self.feedback is not None:
                raise ValueError(
                    "NCODE.inverse: this model's weights depend on the input or move in time; pass "
                    "theta_t1=sol.theta from the forward solve"
                )
            self.check_params(params)
            theta_t1 = params["initial"]["theta"]
        self.check_params(params)
        settings = {k: options.pop(k) for k in SOLVE_CONFIG_FIELDS if k in options}
        config = SolveConfig(**settings, t0=t1, t1=t0) if config is None else config.replace(t0=t1, t1=t0)
        dynamics = Dynamics(self.field, self.feedback)
        return solve(dynamics, x_t1, theta_t1, feedback=params.get("feedback"), config=config, **options)
