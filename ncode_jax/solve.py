"""The one place that calls :func:`diffrax.diffeqsolve`.

:func:`solve` integrates a :class:`~ncode_jax.dynamics.Dynamics` from ``(x0, θ0)``. It picks the
solver and adjoint by name, uses fixed steps when ``dt`` is given and a PID controller
(``rtol``/``atol``) otherwise, solves the whole batch as one ODE system by default (DESIGN.md
fact 1), returns step and evaluation counts, and turns every failure into an error that says
what happened: NaN/inf inputs, a solve that ran out of ``max_steps``, a solution that diverged.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .dynamics import Dynamics, State
from .solvers import solver_info

ADJOINTS = ("checkpoint", "backsolve", "direct")
BATCH_MODES = ("system", "vmap")
DEFAULT_ADAPTIVE_MAX_STEPS = 4096


class Solution(NamedTuple):
    """Result of :func:`solve`.

    ``x``: ``(B, *S)`` at ``t1``, or ``(len(ts), B, *S)`` when ``ts`` was given.
    ``theta``: like ``x`` with trailing ``P`` in closed loop; the constant θ0 otherwise.
    ``cost``: running cost ``c`` — ``(B,)`` or ``(len(ts), B)`` — or None.
    ``stats``: ``num_steps`` (accepted + rejected), ``num_accepted_steps``,
    ``num_rejected_steps``, ``nfe`` (forward vector-field evaluations), ``result`` (diffrax code).
    """

    x: Array
    theta: Array
    cost: Array | None
    ts: Array
    stats: dict[str, Array]


def _adjoint(name: str) -> diffrax.AbstractAdjoint:
    if name == "checkpoint":
        return diffrax.RecursiveCheckpointAdjoint()
    if name == "backsolve":
        return diffrax.BacksolveAdjoint()
    if name == "direct":
        return diffrax.DirectAdjoint()
    raise ValueError(f"unknown adjoint {name!r}; choose one of {list(ADJOINTS)}")


def _is_static_number(v) -> bool:
    """A Python or NumPy real scalar (not a traced JAX value, not a bool)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _error_if(tree, pred: Array, msg: str):
    """``eqx.error_if(tree, pred, msg)``, but the check's conditional carries a scalar that is then
    added (as 0) to ``tree``: the conditional is pinned to one device, and carrying a batch-sharded
    array through it would gather the whole batch there in every data-parallel step."""
    token = eqx.error_if(jnp.zeros(()), pred, msg)
    return jax.tree.map(lambda a: a + token.astype(a.dtype), tree)


def _check_finite(a: Array, what: str) -> Array:
    return _error_if(a, ~jnp.all(jnp.isfinite(a)), f"ncode_jax.solve: {what} contains NaN or inf")


def nfe_count(solver: str, num_steps: Array) -> Array:
    """Forward vector-field evaluations for ``num_steps`` steps (accepted + rejected).

    Explicit RK: ``stages`` per step, minus one when first-same-as-last, plus one initial
    evaluation for FSAL methods. (diffrax 0.7's automatic initial step size adds no evaluation
    that reaches the field; ``tests/test_solve.py`` checks this formula against a counter.)
    """
    info = solver_info(solver)
    per_step = info.stages - int(info.fsal)
    return num_steps * per_step + int(info.fsal)


def solve(
    dynamics: Dynamics,
    x0: Array,
    theta0: Array,
    params: dict[str, Any] | None = None,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    ts: Array | None = None,
    solver: str = "tsit5",
    dt: float | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    max_steps: int | None = None,
    adjoint: Literal["checkpoint", "backsolve", "direct"] = "checkpoint",
    batch: Literal["system", "vmap"] = "system",
    throw: bool = True,
) -> Solution:
    """Solve ``dz/dt = h(t, z)`` on ``[t0, t1]`` from ``z(0) = (x0, θ0)``.

    Args:
      dynamics: the augmented field (field f, optional feedback g, optional running cost ℓ).
      x0: ``(B, *S)`` initial states, ``S = dynamics.field.state_shape``.
      theta0: ``(P,)`` shared or ``(B, P)`` per-sample initial weights.
      params: ``{"feedback": g's params, "cost": ℓ's args}`` as needed (differentiable).
      ts: optional save times in ``[t0, t1]``; outputs then gain a leading time axis.
      solver: ``euler``, ``midpoint``, ``heun``, ``rk4``, ``bosh3``, ``tsit5``, ``dopri5``,
        ``dopri8``.
      dt: fixed step size; ``None`` means adaptive steps controlled by ``rtol``/``atol``.
      max_steps: step budget; default 4096 (adaptive) or exactly the fixed-step count.
      adjoint: ``checkpoint`` (discretise-then-optimise, exact gradients of the discrete
        solve), ``backsolve`` (continuous adjoint, O(1) memory, approximate with adaptive steps),
        ``direct`` (differentiate through the loop; supports forward mode).
      batch: ``system`` solves the batch as one ODE (shared step sizes); ``vmap`` gives every
        sample its own adaptive steps (slower on CPU: lock-step while loops).
      throw: raise on failure (default). With ``False``, failures are reported only in
        ``stats["result"]``.
    """
    params = {} if params is None else params
    info = solver_info(solver)
    adj = _adjoint(adjoint)
    if batch not in BATCH_MODES:
        raise ValueError(f"unknown batch mode {batch!r}; choose one of {list(BATCH_MODES)}")
    field = dynamics.field
    field.check_x(x0, "x0")
    field.check_theta(theta0, x0.shape[0], "theta0")
    if dynamics.closed_loop and "feedback" not in params:
        raise ValueError("closed-loop dynamics need params['feedback'] (the controller g's parameters)")
    if dt is None and not info.adaptive:
        raise ValueError(
            f"solver {solver!r} has no error estimate, so it cannot choose its own steps: "
            "pass a fixed step size dt=..."
        )
    if dt is not None:
        if not _is_static_number(dt):
            raise TypeError(
                f"dt must be a Python or NumPy number (it fixes the step count at trace time), "
                f"got {type(dt).__name__} {dt!r}"
            )
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt!r}")
        dt = float(dt)
    if _is_static_number(t0) and _is_static_number(t1) and not t1 > t0:
        raise ValueError(f"need t1 > t0, got t0={t0}, t1={t1}")
    if max_steps is None:
        if dt is not None and _is_static_number(t0) and _is_static_number(t1):
            max_steps = max(1, math.ceil((t1 - t0) / dt - 1e-9))
        else:
            max_steps = DEFAULT_ADAPTIVE_MAX_STEPS
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if throw:
        x0 = _check_finite(x0, "x0")
        theta0 = _check_finite(theta0, "theta0")

    controller = (
        diffrax.ConstantStepSize() if dt is not None else diffrax.PIDController(rtol=rtol, atol=atol)
    )
    saveat = diffrax.SaveAt(t1=True) if ts is None else diffrax.SaveAt(ts=ts)
    term = diffrax.ODETerm(dynamics)

    def one_system(x0_, theta0_):
        z0, theta_const = dynamics.initial_state(x0_, theta0_)
        args = {"theta": theta_const, "feedback": params.get("feedback"), "cost": params.get("cost")}
        sol = diffrax.diffeqsolve(
            term,
            info.make(),
            t0,
            t1,
            dt,
            z0,
            args,
            saveat=saveat,
            stepsize_controller=controller,
            adjoint=adj,
            max_steps=max_steps,
            throw=False,
        )
        ys: State = sol.ys if ts is not None else jax.tree.map(lambda a: a[0], sol.ys)
        if throw:
            advice = (
                f"use a larger dt (now {dt}; {max_steps} steps cover {max_steps * dt:g} time units)"
                if dt is not None
                else f"loosen rtol/atol (now {rtol}/{atol}) or check the dynamics for stiffness/blow-up"
            )
            ys = _error_if(
                ys,
                sol.result == diffrax.RESULTS.max_steps_reached,
                f"ncode_jax.solve: the {solver} solver used all max_steps={max_steps} steps "
                f"before reaching t1; raise it with solve(..., max_steps=N) or {advice}",
            )
            ys = _error_if(
                ys,
                (sol.result != diffrax.RESULTS.successful)
                & (sol.result != diffrax.RESULTS.max_steps_reached),
                "ncode_jax.solve: diffrax could not finish the solve (step size collapsed or "
                "non-finite values in the dynamics)",
            )
            ys = _error_if(
                ys,
                ~jnp.all(jnp.isfinite(ys.x)),
                "ncode_jax.solve: the solution contains NaN or inf (the dynamics diverged; try a "
                "smaller dt, an adaptive solver, or smaller weights)",
            )
        n = sol.stats["num_steps"]
        stats = {
            "num_steps": n,
            "num_accepted_steps": sol.stats["num_accepted_steps"],
            "num_rejected_steps": sol.stats["num_rejected_steps"],
            "nfe": nfe_count(solver, n),
            "result": sol.result._value,
        }
        theta = ys.theta if dynamics.closed_loop else theta_const
        return ys.x, theta, ys.cost, stats

    if batch == "system":
        x, theta, cost, stats = one_system(x0, theta0)
    else:
        per_sample_theta = theta0.ndim == 2

        def single(x0_i, theta0_i):
            th = theta0_i[None] if per_sample_theta else theta0_i
            return one_system(x0_i[None], th)

        x, theta, cost, stats = jax.vmap(single, in_axes=(0, 0 if per_sample_theta else None))(
            x0, theta0
        )
        # vmap adds the sample axis in front; move it back behind the time axis and drop the
        # singleton batch axis of each inner solve.
        squeeze = (lambda a: a[:, 0]) if ts is None else (lambda a: jnp.swapaxes(a[:, :, 0], 0, 1))
        x = squeeze(x)
        cost = None if cost is None else squeeze(cost)
        if dynamics.closed_loop:
            theta = squeeze(theta)
        else:
            theta = theta0
    save_ts = jnp.asarray(t1)[None] if ts is None else jnp.asarray(ts)
    return Solution(x=x, theta=theta, cost=cost, ts=save_ts, stats=stats)
