"""Why a solve failed: one enumeration of causes, each with its public code and its message.

The integrators report what they saw (:class:`~ncode_jax.solving.integrators.Outcome`);
:func:`diagnose` turns that into one flag per :class:`Failure`, in the order of the enumeration
(the first true one names the cause), and the ``stats["result"]`` code of that cause.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp
from jaxtyping import Array

#: ``stats["result"]`` codes (ours, stable; diffrax's own enumeration is private): 0 successful,
#: 1 ``max_steps`` reached, 2 any other failure (the codes the :class:`Failure` members carry)
RESULT_CODES = {"successful": 0, "max_steps_reached": 1, "failed": 2}

# A step-size controller whose last attempted step is this much smaller than the mean accepted
# step so far has collapsed (it keeps rejecting steps at one time), rather than run out of budget.
COLLAPSE_RATIO = 1e-3


class Failure(enum.Enum):
    """The causes of a failed solve, most specific first. ``code`` is the ``stats["result"]``
    value it reports (:data:`RESULT_CODES`); :meth:`message` the error :func:`~ncode_jax.solve`
    raises (``{solver}``, ``{max_steps}`` and ``{budget}`` filled from the solve)."""

    NONFINITE_DYNAMICS = (
        RESULT_CODES["failed"],
        "the dynamics produced NaN or inf from finite inputs: the vector field is undefined or "
        "overflows at a state the solver tried (e.g. sqrt/log of a negative value, exp overflow) — "
        "fix the field or its weights; more steps will not help")
    STEP_SIZE_COLLAPSED = (
        RESULT_CODES["failed"],
        "the step size collapsed: the {solver} solver kept rejecting steps at one time (stiff or "
        "non-smooth dynamics, or a solution that blows up in finite time); more max_steps will not "
        "help — use a solver suited to the dynamics, looser tolerances, or smoother dynamics")
    MAX_STEPS_REACHED = (
        RESULT_CODES["max_steps_reached"],
        "the {solver} solver used all max_steps={max_steps} steps before reaching t1 while still "
        "making progress; raise it with solve(..., max_steps=N) or {budget} (if the steps are tiny "
        "because the dynamics are stiff, an explicit solver will need very many)")
    SOLVER_FAILED = (RESULT_CODES["failed"], "diffrax could not finish the solve")
    NONFINITE_SOLUTION = (RESULT_CODES["failed"], "the solution contains NaN or inf")
    # raised in the backward pass by backsolve's own guard (integrators.BackwardGuard), never
    # flagged by diagnose(): the backward solve has no Solution to report a code in
    BACKWARD_MAX_STEPS_REACHED = (
        RESULT_CODES["max_steps_reached"],
        "the backward solve of adjoint='backsolve' used all max_steps={max_steps} steps before "
        "reaching t0, so the gradient would be wrong: the adjoint state is NaN or inf (a "
        "non-finite loss or gradient reaching x(T)), or the backward dynamics are stiffer than the "
        "forward ones — check the loss, raise solve(..., max_steps=N) or {budget}, or use "
        "adjoint='checkpoint'")

    def __init__(self, code: int, template: str):
        self.code = code
        self.template = template

    def message(self, **context) -> str:
        """The error text, ``ncode_jax.solve: …``."""
        return "ncode_jax.solve: " + self.template.format(**context)


def diagnose(outcome) -> tuple[dict[Failure, Array], Array]:
    """One boolean per :class:`Failure` (in the enumeration's order, each excluding the ones
    before it where the causes overlap) and the ``int32`` result code, from an integrator's
    :class:`~ncode_jax.solving.integrators.Outcome`."""
    ok, bad_ys = outcome.ok, outcome.nonfinite_solution
    # a rejected non-finite candidate the solver recovered from is no failure
    nonfinite = outcome.nonfinite_seen & (~ok | bad_ys)
    accepted = jnp.maximum(outcome.stats["num_accepted_steps"], 1).astype(outcome.t_now.dtype)
    mean_step = jnp.abs(outcome.t_now) / accepted
    collapsed = ~ok & ~nonfinite & (jnp.abs(outcome.last_dt) < COLLAPSE_RATIO * mean_step)
    budget_out = outcome.max_steps_reached & ~nonfinite & ~collapsed
    flags = {
        Failure.NONFINITE_DYNAMICS: nonfinite,
        Failure.STEP_SIZE_COLLAPSED: collapsed,
        Failure.MAX_STEPS_REACHED: budget_out,
        Failure.SOLVER_FAILED: ~ok,
        Failure.NONFINITE_SOLUTION: bad_ys,
        Failure.BACKWARD_MAX_STEPS_REACHED: jnp.asarray(False),  # raised in the backward pass
    }
    code = jnp.asarray(RESULT_CODES["successful"])
    for failure in reversed(Failure):  # the first true flag's code wins
        code = jnp.where(flags[failure], failure.code, code)
    return flags, code.astype(jnp.int32)
