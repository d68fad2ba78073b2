"""The integrators: what runs the steps once the solve is planned.

* :func:`integrate_stored` — the stored-steps integrator (``adjoint="stored"``, and the
  ``checkpoint`` adjoint's default with fixed steps that fit :data:`~ncode_jax.STORED_STEPS_MAX_BYTES`): one
  ``lax.scan`` over diffrax's own fixed step times of explicit Runge–Kutta steps written out stage
  by stage, differentiated by JAX with every stage's residuals stored.
* :func:`integrate_diffrax` — :func:`diffrax.diffeqsolve` with the planned controller and adjoint,
  its step-size controller wrapped in a monitor that records why a solve failed.

Both return an :class:`Outcome`, which :mod:`~ncode_jax.solving.diagnose` reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ..dynamics import Dynamics, DynamicsArgs, State
from .adjoints import diffrax_adjoint
from .diagnose import Failure
from .guards import error_if, not_finite


class Outcome(NamedTuple):
    """What an integrator saw: the state ``ys`` (in the state's dtype; at ``t1`` or at the save
    times), diffrax-style step counts ``stats``, whether the solver reported success (``ok``) or
    ran out of steps (``max_steps_reached``), whether any attempted step was non-finite
    (``nonfinite_seen``) or the solution is (``nonfinite_solution``), the time reached ``t_now``
    and the last attempted step ``last_dt``."""

    ys: State
    stats: dict[str, Array]
    ok: Array
    max_steps_reached: Array
    nonfinite_seen: Array
    nonfinite_solution: Array
    t_now: Array
    last_dt: Any


def stored_steps(term, solver, grid: np.ndarray, z0, args) -> tuple[State, dict]:
    """The fixed steps ``grid[k] -> grid[k + 1]`` of ``solver`` (:func:`~ncode_jax.fixed_step_grid`) as one
    ``lax.scan``: the state at ``grid[-1]`` and diffrax-style stats. Reverse mode stores every
    stage's residuals (memory O(steps)); nothing is recomputed.

    An explicit Runge–Kutta solver's step is written out stage by stage from its Butcher tableau
    (:func:`_erk_step`): diffrax's own ``step`` runs the stages in a checkpointed loop, whose
    reverse pass evaluates every stage's field a second time. Other solvers (Euler) take their own
    ``step``."""
    tableau = getattr(solver, "tableau", None)
    erk = isinstance(tableau, diffrax.ButcherTableau) and isinstance(solver, diffrax.AbstractERK)
    t0 = jnp.asarray(grid[0])
    if erk:
        f0 = term.vf(t0, z0, args) if tableau.fsal else None
        carry0 = (z0, f0)
    else:
        carry0 = (z0, solver.init(term, t0, jnp.asarray(grid[1]), z0, args))

    def body(carry, times):
        z, aux = carry
        ta, tb = times
        if erk:
            z, aux = _erk_step(tableau, term, ta, tb, z, args, aux)
        else:
            z, _, _, aux, _ = solver.step(term, ta, tb, z, args, aux, made_jump=False)
        return (z, aux), None

    (z, _), _ = jax.lax.scan(body, carry0, (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])))
    steps = jnp.asarray(len(grid) - 1, jnp.int32)
    return z, {"num_steps": steps, "num_accepted_steps": steps, "num_rejected_steps": jnp.zeros_like(steps)}


def _erk_step(tableau: diffrax.ButcherTableau, term, ta, tb, z, args, f0):
    """One explicit Runge–Kutta step from ``ta`` to ``tb`` with every stage written out:
    ``k_i = f(ta + c_i h, z + h Σ_j a_ij k_j)``, ``z₁ = z + h Σ_i b_i k_i`` (Butcher tableau
    ``(a, b, c)``; zero coefficients are skipped). First-same-as-last tableaux (last row of ``a``
    equal to ``b``) take ``k_1 = f0``, the previous step's last stage, and return their last
    stage for the next step; others take and return ``None``. Returns ``(z₁, f0_next)``."""
    h = tb - ta

    def combine(coeffs):  # z + h Σ_j coeffs[j] k_j over the nonzero coefficients
        terms = [(float(a), k) for a, k in zip(coeffs, ks) if a != 0]
        if not terms:
            return z
        return jax.tree.map(lambda y, *kk: y + h * sum(a * ki for (a, _), ki in zip(terms, kk)),
                            z, *(k for _, k in terms))

    ks = [f0 if tableau.fsal else term.vf(ta, z, args)]
    for c, a_row in zip(tableau.c, tableau.a_lower):
        z_stage = combine(a_row)
        t_stage = tb if c == 1 else ta + float(c) * h  # exactly tb, as diffrax evaluates it
        ks.append(term.vf(t_stage, z_stage, args))
    if tableau.fsal:  # the last stage was evaluated at (tb, z₁)
        return z_stage, ks[-1]
    return combine(tableau.b_sol), None



def integrate_stored(term, solver, grid: np.ndarray, z0, args, dtype, s1, dt0) -> Outcome:
    """The stored-steps integrator over ``grid`` (:func:`~ncode_jax.fixed_step_grid` of the
    solver's time), the state cast back to ``dtype``."""
    ys, stats = stored_steps(term, solver, grid, z0, args)
    ys = jax.tree.map(lambda a: a.astype(dtype), ys)
    bad = not_finite(ys)  # a NaN state is named through nonfinite_seen and nonfinite_solution
    return Outcome(ys, stats, ~bad, jnp.asarray(False), bad, bad, s1, dt0)


def integrate_diffrax(term, solver, s1, dt0, z0, args, *, dtype, saveat, controller, adjoint,
                      max_steps: int, saves: bool) -> Outcome:
    """:func:`diffrax.diffeqsolve` from solver time 0 to ``s1`` (``throw=False``: the diagnosis
    raises), the state cast back to ``dtype``; ``saves``: ``saveat`` has save times."""
    sol = diffrax.diffeqsolve(
        term, solver, jnp.zeros((), jnp.result_type(s1)), s1, dt0, z0, args, saveat=saveat,
        stepsize_controller=_Monitor(controller), adjoint=adjoint, max_steps=max_steps, throw=False)
    ys = sol.ys if saves else jax.tree.map(lambda a: a[0], sol.ys)
    ys = jax.tree.map(lambda a: a.astype(dtype), ys)
    _, nonfinite, t_now, last_dt = sol.controller_state
    return Outcome(ys, sol.stats, sol.result == diffrax.RESULTS.successful,
                   sol.result == diffrax.RESULTS.max_steps_reached, nonfinite, not_finite(ys),
                   t_now * jnp.sign(s1),  # the monitor sees diffrax's direction-normalised times
                   last_dt)


def _as_before(new_state, old_state):
    """A wrapped controller's new state in the dtypes of its old one: diffrax's PID controller
    computes part of its state in the default float dtype, and the loop carry's dtypes must stay
    fixed (float32 times under ``jax_enable_x64`` would otherwise change them)."""
    return jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), new_state, old_state)


class _Monitor(diffrax.AbstractStepSizeController):
    """Delegates to ``inner`` and records, in its state: whether any attempted step produced a
    non-finite candidate, the current time and the last attempted step size. :func:`integrate_diffrax`
    returns it to name the cause of a failure."""

    inner: diffrax.AbstractStepSizeController

    def wrap(self, direction):
        return _Monitor(self.inner.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, inner_state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
        t = jnp.asarray(t0)
        return t_next, (inner_state, jnp.asarray(False), t, t_next - t)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner_state, bad, t_now, _ = controller_state
        keep, next_t0, next_t1, jump, new_inner, result = self.inner.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
        )
        inner_state = _as_before(new_inner, inner_state)
        now_bad = not_finite(y1_candidate) | not_finite(y_error)
        state = (inner_state, bad | now_bad, jnp.asarray(next_t0, t_now.dtype),
                 jnp.asarray(next_t1 - next_t0, t_now.dtype))
        return keep, next_t0, next_t1, jump, state, result


class BackwardGuard(diffrax.AbstractStepSizeController):
    """The step-size controller of backsolve's backward solve: delegates to ``inner`` and raises
    ``message`` once the solve has attempted ``max_steps`` steps without reaching its end.

    diffrax's own check of the backward solve (``BacksolveAdjoint(throw=True)``) raises from a
    conditional that XLA pins to one device: under a mesh of several devices that device raises
    alone while the others wait in the next collective, until XLA aborts the process. This check
    goes through :func:`~ncode_jax.solving.guards.error_if`, which every device of a mesh raises
    together; the backward solve itself then runs with ``throw=False``. It counts every attempted
    step, accepted or rejected, as diffrax's ``max_steps`` does."""

    inner: diffrax.AbstractStepSizeController
    max_steps: int = eqx.field(static=True)
    message: str = eqx.field(static=True)

    def wrap(self, direction):
        return BackwardGuard(self.inner.wrap(direction), self.max_steps, self.message)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, inner_state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
        # diffrax hands the controller direction-normalised times: the solve ends at t1 > t0
        return t_next, (inner_state, jnp.zeros((), jnp.int32), jnp.asarray(t1))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner_state, attempts, t_end = controller_state
        keep, next_t0, next_t1, jump, new_inner, result = self.inner.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
        )
        new_inner = _as_before(new_inner, inner_state)
        attempts = attempts + 1
        next_t1 = error_if(next_t1, (attempts >= self.max_steps) & (next_t0 < t_end), self.message)
        return keep, next_t0, next_t1, jump, (new_inner, attempts, t_end), result


class SolverTimeField(eqx.Module):
    """The dynamics on the solver's time ``s = t - t0`` (``t0`` None: 0) and state: the field
    sees ``t0 + s`` and, when the solver carries a wider dtype than the state's (bfloat16 and
    float16 states are solved with float32 times, to which diffrax promotes the state), the state
    and time in the state's ``dtype``; its output is cast back to the solver's."""

    dynamics: Dynamics  # a leaf, as when diffrax.ODETerm held it directly
    t0: Array | None
    dtype: Any = eqx.field(static=True)

    def __call__(self, s, z, args):
        t = s if self.t0 is None else self.t0 + s
        if self.dtype is None:
            return self.dynamics(t, z, args)
        narrow = jax.tree.map(lambda a: a.astype(self.dtype), z)
        out = self.dynamics(jnp.asarray(t).astype(self.dtype), narrow, args)
        return jax.tree.map(lambda a, c: a.astype(c.dtype), out, z)



def integrate(plan, dynamics: Dynamics, x0: Array, theta0: Array, args: DynamicsArgs, times,
              throw: bool) -> tuple[Outcome, Array | None]:
    """Run ``plan``'s integrator for one system from ``(x0, θ0)``: the :class:`Outcome` and the
    constant θ of an open loop (None in closed loop). ``times`` are the solve's checked times
    (:class:`~ncode_jax.solving.inputs.Times`)."""
    cfg, tdtype = plan.config, plan.tdtype
    z0, theta_const = dynamics.initial_state(x0, theta0)
    z0 = jax.tree.map(lambda a: a.astype(tdtype), z0)  # as diffrax promotes it to the time dtype
    args = args._replace(theta=theta_const)
    # the solver's time is s = t - t0, from 0 to s1 = t1 - t0 (the field sees t0 + s): a grid far
    # from t = 0 keeps the precision of its length, not of its position
    shifted = not (plan.known_times and float(cfg.t0) == 0)
    s1 = jnp.asarray(plan.span, tdtype) if plan.known_times else times.t1 - times.t0
    term = diffrax.ODETerm(SolverTimeField(dynamics, times.t0 if shifted else None,
                                           None if tdtype == plan.dtype else plan.dtype))
    dt0 = _first_step(plan, times)
    if plan.integrator == "stored_steps":
        return integrate_stored(term, plan.info.make(), plan.grid, z0, args, plan.dtype, s1, dt0), theta_const
    s_ts = None
    if times.ts is not None:
        s_ts = times.ts
        if shifted:
            s_ts = jnp.clip(times.ts - times.t0, jnp.minimum(s1, 0), jnp.maximum(s1, 0))
    if cfg.adjoint == "backsolve":
        # backsolve differentiates no time (refused before), and takes them as non-differentiable
        # arguments: the zero tangents the checks give them under jax.checkpoint/nn.remat must go
        s1, s_ts = jax.lax.stop_gradient((s1, s_ts))
    controller, backward = _controllers(cfg, times)
    if cfg.adjoint == "backsolve" and throw:
        failure = Failure.BACKWARD_MAX_STEPS_REACHED
        message = failure.message(max_steps=plan.max_steps, budget=plan.budget_advice)
        backward = BackwardGuard(controller if backward is None else backward, plan.max_steps, message)
    outcome = integrate_diffrax(
        term, plan.info.make(), s1, dt0, z0, args, dtype=plan.dtype,
        saveat=diffrax.SaveAt(t1=s_ts is None, ts=s_ts, controller_state=True), controller=controller,
        adjoint=diffrax_adjoint(cfg.adjoint, cfg.checkpoints, backward, throw), max_steps=plan.max_steps,
        saves=s_ts is not None)
    return outcome, theta_const


def _first_step(plan, times):
    """The signed fixed step (a Python float when the direction is known: times in the time
    dtype, as in the grid), or None for adaptive steps."""
    dt = plan.config.dt
    if dt is None:
        return None
    if not plan.known_times:
        return jnp.where(times.t1 > times.t0, dt, -dt).astype(plan.tdtype)
    return float(dt) if plan.span > 0 else -float(dt)


def _controllers(cfg, times):
    """The step-size controller of the forward solve and, with ``seminorm``, of backsolve's
    backward solve (None: the forward one's)."""
    if cfg.dt is not None:
        return diffrax.ConstantStepSize(), None
    rtol = cfg.rtol if times.rtol is None else times.rtol
    atol = cfg.atol if times.atol is None else times.atol
    backward = None
    if cfg.seminorm:
        backward = diffrax.PIDController(rtol=rtol, atol=atol, norm=diffrax.adjoint_rms_seminorm)
    return diffrax.PIDController(rtol=rtol, atol=atol), backward
