"""The one place that calls :func:`diffrax.diffeqsolve`, as a short orchestrator of named stages.

:func:`solve` integrates a :class:`~ncode_jax.dynamics.Dynamics` from ``(x0, θ0)``:

1. **settings** — one :class:`~ncode_jax.solving.options.SolveConfig`, validated where it was
   built (loose keyword arguments build it once);
2. **check inputs** — shapes and dtypes at trace time (:mod:`~ncode_jax.solving.inputs`);
3. **plan** — time dtype, interval, fixed step grid, step budget and which integrator runs
   (:mod:`~ncode_jax.solving.plan`);
4. **guard inputs** — derivatives the adjoint cannot give, and run-time checks of every value
   that was traced (:mod:`~ncode_jax.solving.inputs`, :mod:`~ncode_jax.solving.guards`);
5. **integrate** — the stored-steps integrator or diffrax (:mod:`~ncode_jax.solving.integrators`),
   once for the whole batch or once per sample;
6. **diagnose** — one :class:`~ncode_jax.solving.diagnose.Failure` per cause, one check that
   raises the first, and the ``stats["result"]`` code (:mod:`~ncode_jax.solving.diagnose`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .dynamics import Dynamics, DynamicsArgs
from .solvers import nfe_count
from .solving.diagnose import RESULT_CODES, diagnose
from .solving.guards import guard
from .solving.inputs import check_inputs, guard_inputs
from .solving.integrators import integrate
from .solving.options import SolveConfig, as_config, check_options
from .solving.plan import STORED_STEPS_MAX_BYTES, make_plan, stored_steps_bytes
from .solving.timegrid import fixed_step_count, fixed_step_grid, time_dtype

__all__ = ["RESULT_CODES", "STORED_STEPS_MAX_BYTES", "Solution", "SolveConfig", "check_options",
           "fixed_step_count", "fixed_step_grid", "nfe_count", "solve", "stored_steps_bytes", "time_dtype"]


class Solution(NamedTuple):
    """Result of :func:`solve`.

    ``x``: ``(B, *S)`` at ``t1``, or ``(len(ts), B, *S)`` when ``ts`` was given.
    ``theta``: like ``x`` with trailing ``P`` in closed loop; the constant θ0 otherwise.
    ``cost``: running cost ``c`` — ``(B,)`` or ``(len(ts), B)`` — or None.
    ``ts``: the save times, ``(1,)`` (``t1``) or ``(len(ts),)``, in :func:`time_dtype`.
    ``stats``: ``num_steps`` (accepted + rejected), ``num_accepted_steps``,
    ``num_rejected_steps``, ``nfe`` (forward vector-field evaluations), ``result``
    (:data:`RESULT_CODES`: 0 successful, 1 ``max_steps`` reached, 2 other failure).
    """

    x: Array
    theta: Array
    cost: Array | None
    ts: Array
    stats: dict[str, Array]


def solve(
    dynamics: Dynamics,
    x0: Array,
    theta0: Array,
    params: dict[str, Any] | None = None,
    *,
    feedback: Any = None,
    cost_args: Any = None,
    config: SolveConfig | None = None,
    ts: Array | None = None,
    throw: bool = True,
    check_grads: bool = False,
    **options,
) -> Solution:
    """Solve ``dz/dt = h(t, z)`` from ``z(t0) = (x0, θ0)`` to ``t1``.

    ``t1 < t0`` integrates backwards in time (e.g. to recover ``x(0)`` from ``x(T)``, see
    :meth:`~ncode_jax.NCODE.inverse`): with fixed steps the solver steps by ``-dt``; ``ts`` must
    then decrease. ``x``, ``theta`` and ``cost`` keep the dtype of ``x0`` and ``θ0`` (a float32
    model stays float32 under ``jax_enable_x64``). The solver's times are in :func:`time_dtype`
    (the state's dtype, but float32 for bfloat16 and float16 states, whose state the solver then
    carries in float32 while the field sees its own dtype) and relative to ``t0`` (it steps
    ``s = t - t0`` from 0 to ``t1 - t0``, the field sees ``t0 + s``), so the step grid of
    ``[1e4, 1e4 + 1]`` is that of ``[0, 1]``; fixed steps that the time dtype still cannot
    represent (diffrax merges every step that ends within 100 ULP of ``t1`` into the last) are
    refused.

    Args:
      dynamics: the augmented field (field f, optional feedback g, optional running cost ℓ).
      x0: ``(B, *S)`` initial states, ``S = dynamics.field.state_shape``; ``B >= 1``.
      theta0: ``(P,)`` shared or ``(B, P)`` per-sample initial weights, same dtype as ``x0``.
      params: the older spelling ``{"feedback": ..., "cost": ...}`` of ``feedback`` and
        ``cost_args`` (kept for existing code; not together with them).
      feedback: the controller g's parameters (closed-loop dynamics; differentiable).
      cost_args: the running cost's arguments (any PyTree; differentiable).
      config: the solver settings, a :class:`SolveConfig`. Instead, its fields may be given as
        keyword arguments (``solver=``, ``dt=``, ``rtol=``, ``atol=``, ``adjoint=``, ``t0=``,
        ``t1=``, ``max_steps=``, ``checkpoints=``, ``seminorm=``, ``batch=``), which build one
        ``SolveConfig``. Their meaning:

        * ``t0``, ``t1``: the time interval (``t1 != t0``; either order).
        * ``solver``: ``euler`` (order 1), ``midpoint``, ``heun`` (2), ``bosh3`` (3), ``rk4``
          (4, the 3/8 rule), ``tsit5``, ``dopri5`` (5), ``dopri8`` (8).
        * ``dt``: fixed step size (> 0, the sign follows ``t1 - t0``); ``None`` means adaptive
          steps controlled by ``rtol``/``atol`` (finite, >= 0).
        * ``max_steps``: step budget; default 4096 (adaptive) or exactly the fixed-step count.
        * ``adjoint``: how gradients are computed (docs/adjoints.md) —

          - ``checkpoint`` (discretise-then-optimise, diffrax's ``RecursiveCheckpointAdjoint``):
            the exact gradient of the discrete solve (it matches central finite differences to
            ~1e-9 in float64, ``tests/test_gradients.py``). Memory grows with the number of steps
            (O(log n) checkpoints, recomputing the rest); ``checkpoints=n`` stores ``n`` states
            instead. By default (``checkpoints=None``), fixed steps known at trace time, no
            ``ts`` and stored states within :data:`STORED_STEPS_MAX_BYTES`
            (:func:`stored_steps_bytes`) run the stored-steps integrator of ``stored`` instead:
            the same gradient, without recomputation.
          - ``stored``: the stored-steps integrator, asked for by name: one ``lax.scan`` over
            diffrax's own step times (:func:`fixed_step_grid`) of explicit Runge–Kutta steps
            written out stage by stage from the solver's Butcher tableau, which stores every
            stage's residuals and evaluates the field once per stage, backward pass included
            (memory O(steps); diffrax's checkpointed loop evaluates the field 3.5× per stage in
            a training step; ``tests/test_stored_steps.py`` counts them; docs/design.md,
            "Stored steps", has the timings). Fixed steps, times known at trace time and no
            ``ts`` only (a ``ValueError`` otherwise); JAX differentiates it like any program,
            so forward mode and higher orders work too.
          - ``backsolve`` (optimise-then-discretise, the continuous adjoint of Chen et al. 2018,
            used by the paper): O(1) memory in the number of steps, but it re-solves the state
            backwards and integrates the adjoint ODE with the same method, so its gradient is an
            approximation with error O(dt^p) for a method of order p (or of the order of the
            tolerances with adaptive steps). Measured on the closed-loop reflection toy
            (float64): Euler dt=0.1 1.6% from the exact gradient, rk4 4e-8 to 7e-6, tsit5
            rtol=1e-3 about 3% (docs/design.md, "What each adjoint computes";
            ``tests/test_adjoint_order.py`` checks the O(dt^p) rate). Fixed-step Euler with
            backsolve is refused (the 1.6% made training diverge: loss 9.5e2 vs 1.3e-5 with
            checkpoint); fixed order-2 and order-3 methods warn. ``seminorm=True`` (adaptive
            steps only) lets the backward step-size control ignore the parameter-gradient
            channels (Kidger et al. 2021, ``diffrax.adjoint_rms_seminorm``): fewer backward
            steps, same tolerance on the state and its adjoint.
          - ``direct`` (differentiate through the loop): supports forward mode (``jax.jvp``,
            ``jax.jacfwd``, ``jax.hessian``) as well as reverse mode; most memory.

          Forward-mode derivatives and second-order reverse mode need ``direct`` (or
          ``stored``): with ``checkpoint`` or ``backsolve`` they raise a ``TypeError`` that
          names the adjoint and the alternative (``checkpoint`` raises it when the outer
          gradient reaches the inner one, so first-order meta-learning, an inner gradient under
          ``stop_gradient``, is computed; ``backsolve`` works under one reverse-mode level
          only). Under ``jax.checkpoint``/``nn.remat`` every adjoint works.
        * ``batch``: ``system`` solves the batch as one ODE (shared step sizes); ``vmap`` gives
          every sample its own adaptive steps (slower on CPU: lock-step while loops).
      ts: optional 1-D save times between ``t0`` and ``t1``, in the direction of integration;
        outputs then gain a leading time axis.
      throw: raise on failure (default). With ``False``, failures are reported only in
        ``stats["result"]`` (:data:`RESULT_CODES`) and outputs may hold NaN/inf.
      check_grads: also raise, in the backward pass, if the gradient reaching ``x0``, ``θ0``,
        ``feedback`` or ``cost_args`` contains NaN or inf (it names which). Off by default: a
        finite forward solve can still give a non-finite gradient (e.g. ``sqrt`` at 0 in the
        field). Reverse mode only (with forward mode it raises ``TypeError``).

    Returns:
      A :class:`Solution`.

    Raises:
      ValueError, TypeError: at trace time, for bad settings (:class:`SolveConfig`), fixed steps
        too small for the interval in the time dtype (naming dtype and interval), shapes or
        dtypes (``x0`` and ``θ0`` must share a floating dtype), a closed-loop dynamics without
        ``feedback``, an empty interval, ``ts`` not 1-D, outside ``[t0, t1]`` or not monotone
        in the direction of integration, derivatives the adjoint cannot give.
      equinox.EquinoxRuntimeError: (``throw=True``; under ``jax.jit`` too, and again in the
        backward pass of ``jax.grad``): with a message that names the cause, one of —
        non-finite inputs (``x0``, ``θ0``, ``feedback``, ``cost_args``, times, ``ts``,
        tolerances) or another rule broken by a traced value; the causes of
        :class:`~ncode_jax.solving.diagnose.Failure` (the dynamics produced NaN/inf, the step
        size collapsed, the step budget ran out, with how to raise it); and, with
        ``check_grads``, a non-finite gradient.
    """
    cfg = as_config(config, options, "solve")
    args = _dynamics_args(params, feedback, cost_args)
    x0, theta0 = check_inputs(dynamics, x0, theta0, args)
    plan = make_plan(cfg, x0, theta0, ts)
    x0, theta0, args, times = guard_inputs(plan, x0, theta0, args, throw=throw, check_grads=check_grads)
    system = functools.partial(_solve_system, plan, dynamics, args, times, throw)
    if cfg.batch == "system":
        x, theta, cost, stats = system(x0, theta0)
    else:
        x, theta, cost, stats = _per_sample(system, x0, theta0, saves=ts is not None,
                                            closed_loop=dynamics.closed_loop)
    return Solution(x=x, theta=theta, cost=cost, ts=times.t1[None] if ts is None else times.ts, stats=stats)


def _dynamics_args(params: dict | None, feedback, cost_args) -> DynamicsArgs:
    """The dynamics' arguments from ``feedback``/``cost_args`` or the older ``params`` dict."""
    if params is None:
        return DynamicsArgs(None, feedback, cost_args)
    if feedback is not None or cost_args is not None:
        raise TypeError("solve: pass feedback= and cost_args=, or the older params={'feedback': ..., "
                        "'cost': ...}, not both")
    unknown = sorted(set(params) - {"feedback", "cost"})
    if unknown:
        raise ValueError(f"solve: params takes the keys 'feedback' and 'cost' only, got {unknown}")
    return DynamicsArgs(None, params.get("feedback"), params.get("cost"))


def _solve_system(plan, dynamics: Dynamics, args: DynamicsArgs, times, throw: bool, x0, theta0):
    """Integrate and diagnose one ODE system: ``(x, θ, cost, stats)``."""
    outcome, theta_const = integrate(plan, dynamics, x0, theta0, args, times, throw)
    flags, code = diagnose(outcome)
    ys = outcome.ys
    if throw:
        context = {"solver": plan.config.solver, "max_steps": plan.max_steps, "budget": plan.budget_advice}
        ys = guard(ys, [(flag, failure.message(**context)) for failure, flag in flags.items()])
    n = outcome.stats["num_steps"]
    stats = {
        "num_steps": n,
        "num_accepted_steps": outcome.stats["num_accepted_steps"],
        "num_rejected_steps": outcome.stats["num_rejected_steps"],
        "nfe": nfe_count(plan.config.solver, n),
        "result": code,
    }
    theta = ys.theta if dynamics.closed_loop else theta_const
    return ys.x, theta, ys.cost, stats


def _per_sample(system, x0, theta0, *, saves: bool, closed_loop: bool):
    """``system`` once per sample (``batch="vmap"``), the sample axis put back behind the time axis."""
    per_sample_theta = theta0.ndim == 2

    def single(x0_i, theta0_i):
        return system(x0_i[None], theta0_i[None] if per_sample_theta else theta0_i)

    x, theta, cost, stats = jax.vmap(single, in_axes=(0, 0 if per_sample_theta else None))(x0, theta0)
    # vmap adds the sample axis in front; drop the singleton batch axis of each inner solve
    squeeze = (lambda a: jnp.swapaxes(a[:, :, 0], 0, 1)) if saves else (lambda a: a[:, 0])
    return (squeeze(x), squeeze(theta) if closed_loop else theta0, None if cost is None else squeeze(cost),
            stats)
