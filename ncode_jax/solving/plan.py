"""The plan of a solve: everything decided at trace time before a step is taken.

:func:`make_plan` fixes the state's and the solver's time dtype, the interval in that dtype (when
known at trace time), the fixed step grid and its step count, the step budget, and which
integrator runs (:data:`INTEGRATORS`), and refuses what the time dtype cannot represent
(:data:`~ncode_jax.solving.options.SOLVE_RULES` on known values).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Array

from ..solvers import SolverInfo, solver_info
from .options import DEFAULT_ADAPTIVE_MAX_STEPS, SOLVE_RULES, SolveConfig, enforce, is_concrete
from .timegrid import fixed_step_count, fixed_step_grid, time_dtype

#: the default ``checkpoints=None`` of a fixed-step ``checkpoint`` solve stores every step (the
#: stored-steps integrator) when :func:`stored_steps_bytes` is at most this, and otherwise leaves
#: the steps to diffrax's recursive checkpointing (O(log n) stored states, recomputation)
STORED_STEPS_MAX_BYTES = 512 * 2**20


def stored_steps_bytes(steps: int, stages: int, x0: Array, theta0: Array) -> int:
    """The memory the stored-steps path keeps for the backward pass, estimated as one copy of the
    state ``z = (x, θ)`` per stage of every step: ``steps · stages · (|x0| + |θ0|) · itemsize``
    bytes. A field's own residuals come on top (the conv block's are two hidden-width activations
    per pixel and stage, ~3× the state of the paper's classifier)."""
    size = int(np.prod(x0.shape)) + int(np.prod(theta0.shape))
    return steps * stages * size * np.dtype(x0.dtype).itemsize


#: ``stored_steps``: one ``lax.scan`` of written-out Runge–Kutta steps over diffrax's fixed grid,
#: every stage's residuals stored (``adjoint="stored"``; the ``checkpoint`` adjoint's default
#: when the fixed steps fit :data:`~ncode_jax.STORED_STEPS_MAX_BYTES`); ``diffrax``:
#: :func:`diffrax.diffeqsolve` with the adjoint of that name
INTEGRATORS = ("stored_steps", "diffrax")


@dataclass(frozen=True)
class Plan:
    """A planned solve. ``span`` is ``t1 - t0`` in the time dtype ``tdtype`` when both are known
    at trace time (None when traced); ``fixed_steps`` diffrax's number of fixed steps when known;
    ``grid`` their times relative to ``t0`` (stored-steps integrator only)."""

    config: SolveConfig
    info: SolverInfo
    dtype: np.dtype
    tdtype: np.dtype
    span: float | None
    fixed_steps: int | None
    max_steps: int
    integrator: str
    grid: np.ndarray | None
    ts: Any

    @property
    def known_times(self) -> bool:
        return self.span is not None

    def values(self, **traced) -> dict[str, Any]:
        """The values the rules read (:mod:`~ncode_jax.solving.options`), ``traced`` replacing
        the times by the arrays the solve carries."""
        return {**self.config.kwargs(), "ts": self.ts, "tdtype": self.tdtype, "span": self.span, **traced}

    @property
    def budget_advice(self) -> str:
        """How to give a solve that ran out of steps more room (worded before tolerances are traced)."""
        cfg = self.config
        if cfg.dt is not None:
            return (f"use a larger dt (now {cfg.dt}; {self.max_steps} steps cover "
                    f"{self.max_steps * cfg.dt:g} time units)")
        known = is_concrete(cfg.rtol) and is_concrete(cfg.atol)
        return "loosen rtol/atol" + (f" (now {cfg.rtol}/{cfg.atol})" if known else "")


def make_plan(config: SolveConfig, x0, theta0, ts) -> Plan:
    """Plan a solve of the state ``x0`` (and θ0, whose size counts in the stored steps' memory)
    under ``config``, saving at ``ts`` (or None).

    Raises:
      ValueError: what :data:`~ncode_jax.solving.options.SOLVE_RULES` refuses of known values (an
        interval empty in the time dtype, fixed steps it cannot hold, bad save times);
        ``adjoint='stored'`` where the stored-steps integrator cannot run.
    """
    info = solver_info(config.solver)
    tdtype = time_dtype(x0.dtype)  # at least float32: bfloat16 cannot hold a grid
    span = None
    if is_concrete(config.t0) and is_concrete(config.t1):  # the solver runs on s = t - t0, in float64 first
        span = float(np.asarray(float(config.t1) - float(config.t0), tdtype))
    plan = Plan(config, info, x0.dtype, tdtype, span, None, 0, "diffrax", None, ts)
    enforce(SOLVE_RULES, plan.values(span=_traced_marker(span)), traced=False)
    _warn_backsolve(config, info)
    fixed = None  # diffrax's number of fixed steps, when known at trace time
    if config.dt is not None and span is not None:
        fixed = fixed_step_count(0.0, span, config.dt, tdtype)
    max_steps = config.max_steps or (fixed if fixed is not None else DEFAULT_ADAPTIVE_MAX_STEPS)
    integrator = _integrator(config, info, fixed, max_steps, ts, x0, theta0)
    grid = fixed_step_grid(0.0, span, config.dt, tdtype) if integrator == "stored_steps" else None
    return Plan(config, info, x0.dtype, tdtype, span, fixed, max_steps, integrator, grid, ts)


class _Traced:
    """Stands for a value only known when the solve runs (so that the rules reading it wait)."""


def _traced_marker(span):
    return _Traced() if span is None else span


def _warn_backsolve(config: SolveConfig, info: SolverInfo) -> None:
    if config.adjoint == "backsolve" and config.dt is not None and info.order < 4:
        warnings.warn(
            f"adjoint='backsolve' with fixed-step {config.solver!r} (order {info.order}): the continuous "
            "adjoint's gradient error is O(dt^order) and may be far from the exact gradient of the "
            "discrete solve; prefer adjoint='checkpoint' or solver='rk4'",
            stacklevel=4,
        )


def _integrator(config: SolveConfig, info: SolverInfo, fixed: int | None, max_steps: int, ts, x0,
                theta0) -> str:
    """Which of :data:`INTEGRATORS` runs: ``stored_steps`` when asked for
    (``adjoint="stored"``), or by default for the ``checkpoint`` adjoint (``checkpoints=None``)
    with fixed steps known at trace time, no save times, a budget that covers them and stored
    states within :data:`~ncode_jax.STORED_STEPS_MAX_BYTES`; ``diffrax`` otherwise."""
    if config.adjoint == "stored":
        why = _stored_impossible(fixed, max_steps, ts)
        if why:
            raise ValueError(f"adjoint='stored' cannot run this solve: {why}")
        return "stored_steps"
    if config.adjoint != "checkpoint" or config.checkpoints is not None:
        return "diffrax"
    if _stored_impossible(fixed, max_steps, ts):
        return "diffrax"
    fits = stored_steps_bytes(fixed, info.stages, x0, theta0) <= STORED_STEPS_MAX_BYTES
    return "stored_steps" if fits else "diffrax"


def _stored_impossible(fixed: int | None, max_steps: int, ts) -> str:
    if fixed is None:
        return "its step grid needs t0 and t1 known at trace time (Python numbers, not traced values)"
    if ts is not None:
        return "it saves x(t1) only; for save times ts use adjoint='checkpoint' or 'direct'"
    if max_steps < fixed:
        return f"it takes all {fixed} fixed steps, more than max_steps={max_steps}"
    return ""
