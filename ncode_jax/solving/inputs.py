"""The solve's inputs, checked where they enter: shapes and dtypes at trace time
(:func:`check_inputs`), then values at run time (:func:`guard_inputs`: non-finite data, the rules
whose values are traced, derivatives the adjoint cannot give, and ``check_grads``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ..dynamics import Dynamics, DynamicsArgs
from .adjoints import guard_derivatives
from .guards import grad_check, guard, not_finite
from .options import CONFIG_RULES, SOLVE_RULES, enforce, is_concrete
from .plan import Plan


class Times(NamedTuple):
    """The solve's times in its time dtype: ``t0``, ``t1`` (scalars) and the save times ``ts``
    (or None); ``rtol``/``atol`` when they are traced (they then pass the run-time checks too)."""

    t0: Array
    t1: Array
    ts: Array | None
    rtol: Array | None = None
    atol: Array | None = None


def as_array(a, who: str):
    """Lists and NumPy arrays become JAX arrays; anything else that is not an array is refused."""
    if isinstance(a, (list, tuple, np.ndarray, np.generic)):
        return jnp.asarray(a)
    if not isinstance(a, jax.Array):
        raise TypeError(f"{who} must be an array, got {type(a).__name__}")
    return a


def check_batch(x0: Array) -> None:
    """Refuse a batch without samples."""
    if x0.shape[0] == 0:
        raise ValueError(f"x0 has an empty batch (shape {tuple(x0.shape)}): pass at least one sample")


def check_inputs(dynamics: Dynamics, x0, theta0, args: DynamicsArgs) -> tuple[Array, Array]:
    """``(x0, θ0)`` as arrays, after the trace-time checks of their shapes and dtypes and of the
    feedback parameters a closed loop needs.

    Raises:
      ValueError: shapes that do not fit the field, an empty batch, a closed loop without
        feedback parameters.
      TypeError: not arrays; ``x0`` and ``θ0`` not of one floating dtype, or feedback parameters
        of another.
    """
    x0, theta0 = as_array(x0, "x0"), as_array(theta0, "theta0")
    dynamics.field.check_x(x0, "x0")
    check_batch(x0)
    dynamics.field.check_theta(theta0, x0.shape[0], "theta0")
    if dynamics.closed_loop and args.feedback is None:
        raise ValueError(
            "closed-loop dynamics need params['feedback'] (the controller g's parameters, from "
            "model.init(...)['feedback']): pass solve(..., feedback=params['feedback'])")
    _check_dtypes(x0, theta0, args.feedback)
    return x0, theta0


def _check_dtypes(x0, theta0, feedback) -> None:
    if not jnp.issubdtype(theta0.dtype, jnp.floating):
        raise TypeError(f"theta0 must be a floating-point array, got dtype {theta0.dtype}")
    if theta0.dtype != x0.dtype:
        raise TypeError(
            f"x0 is {x0.dtype} but theta0 is {theta0.dtype}: the state and the weights must share one "
            "floating dtype (cast the data or initialise the model with that dtype)")
    for path, leaf in jax.tree_util.tree_leaves_with_path(feedback):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating) and dtype != x0.dtype:
            raise TypeError(
                f"feedback{jax.tree_util.keystr(path)} is {dtype} but x0 is {x0.dtype}: the controller g's "
                "parameters must share the state's dtype")


_NONFINITE = (
    "x0 contains NaN or inf",
    "theta0 contains NaN or inf (the initial weights θ(0) from the controller; during training this "
    "means the parameters became non-finite: check the learning rate and the gradients)",
    "feedback (the controller g's parameters) contains NaN or inf",
    "cost_args (the running cost's arguments) contains NaN or inf",
)


def guard_inputs(plan: Plan, x0, theta0, args: DynamicsArgs, *, throw: bool, check_grads: bool):
    """``(x0, θ0, args, times)`` passed through the run-time checks: derivatives the adjoint cannot
    give (at trace time), then, with ``throw``, one check of non-finite inputs and of every rule
    whose values are traced (everything the solve reads passes through it, so that it runs
    before diffrax's own checks and the first message names the real cause), and with
    ``check_grads`` a backward-pass check of each input's gradient."""
    cfg = plan.config
    times = Times(*(None if t is None else jnp.asarray(t, plan.tdtype) for t in (cfg.t0, cfg.t1, plan.ts)))
    if cfg.dt is None and not (is_concrete(cfg.rtol) and is_concrete(cfg.atol)):
        times = times._replace(rtol=cfg.rtol, atol=cfg.atol)
    (x0, theta0, args), (t0, t1, ts) = guard_derivatives(cfg.adjoint, check_grads, (x0, theta0, args),
                                                         (times.t0, times.t1, times.ts))
    times = times._replace(t0=t0, t1=t1, ts=ts)
    if throw:
        values = plan.values(t0=times.t0, t1=times.t1, ts=times.ts, rtol=cfg.rtol, atol=cfg.atol,
                             span=times.t1 - times.t0 if plan.span is None else plan.span)
        checks = [(not_finite(a), "ncode_jax.solve: " + msg)
                  for a, msg in zip((x0, theta0, args.feedback, args.cost_args), _NONFINITE)]
        checks += enforce(CONFIG_RULES, values, known=False) + enforce(SOLVE_RULES, values, known=False)
        x0, theta0, args, times = guard((x0, theta0, args, times), checks)
    if check_grads:
        x0, theta0, args = _check_gradients(cfg.adjoint, x0, theta0, args)
    return x0, theta0, args, times


def _check_gradients(adjoint: str, x0, theta0, args: DynamicsArgs):
    def check(tree, name):
        if tree is None:
            return None
        return grad_check(tree, f"ncode_jax.solve: the gradient with respect to {name} contains NaN or inf "
                                f"({adjoint} adjoint)")

    return (check(x0, "x0"), check(theta0, "theta0"),
            args._replace(feedback=check(args.feedback, "feedback"),
                          cost_args=check(args.cost_args, "cost_args")))
