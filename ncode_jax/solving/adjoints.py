"""The adjoints: which diffrax adjoint a solve uses, and which derivatives each one can give.

``checkpoint`` (diffrax's ``RecursiveCheckpointAdjoint``, or the stored-steps integrator) and
``backsolve`` (``BacksolveAdjoint``) give reverse-mode first derivatives; ``direct``
(``DirectAdjoint``) and ``stored`` (a plain ``lax.scan``) any derivative. :func:`guard_derivatives`
refuses the others with a ``TypeError`` that names the adjoint and the alternative.
"""

from __future__ import annotations

import functools

import diffrax
import jax

from .guards import inexact

#: adjoints whose solve JAX differentiates like any program (forward mode, any order)
ANY_ORDER = ("direct", "stored")

_FORWARD = ("ncode_jax.solve: adjoint={adjoint!r} supports reverse-mode derivatives only (jax.grad, "
            "jax.vjp, jax.jacrev); forward mode (jax.jvp, jax.jacfwd, jax.hessian, jax.linearize) needs "
            "adjoint='direct' (or 'stored', with fixed steps)")


def diffrax_adjoint(name: str, checkpoints: int | None, backward_controller, throw: bool):
    """The diffrax adjoint of ``name`` (``checkpoint``, ``backsolve``, ``direct``); the backsolve
    adjoint's backward solve takes ``backward_controller`` (None: the forward one's) and runs
    with ``throw=False``: with ``throw``, :func:`~ncode_jax.solving.integrators.integrate` gives it
    a :class:`~ncode_jax.solving.integrators.BackwardGuard` controller, which raises if it fails
    (a failed backward solve is a wrong gradient) on every device of a mesh together."""
    if name == "checkpoint":
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
    if name == "backsolve":
        kwargs = {"throw": False}
        if backward_controller is not None:
            kwargs["stepsize_controller"] = backward_controller
        return diffrax.BacksolveAdjoint(**kwargs)
    return diffrax.DirectAdjoint()


def forward_mode_error(adjoint: str) -> TypeError:
    """The error for forward-mode derivatives of a solve with ``adjoint``."""
    return TypeError(_FORWARD.format(adjoint=adjoint))


def _ad_modes(tree) -> tuple[bool, int]:
    """``(forward, reverse_levels)``: whether any leaf is being differentiated in forward mode
    (``jax.jvp``/``jacfwd``), and how many reverse-mode (``grad``/``vjp``) levels wrap it.

    Reads the tracer chain by class name; if JAX renames its tracers this finds nothing and
    diffrax's own error is raised instead."""
    forward, reverse = False, 0
    for leaf in jax.tree.leaves(tree):
        depth, x = 0, leaf
        while isinstance(x, jax.core.Tracer):
            name = type(x).__name__
            if name == "JVPTracer":
                forward = True
            elif name == "LinearizeTracer":
                depth += 1
            x = getattr(x, "primal", getattr(x, "val", None))
        reverse = max(reverse, depth)
    return forward, reverse


def _refusal(adjoint: str, check_grads: bool, inputs, times) -> TypeError | None:
    """The error for derivatives ``adjoint`` cannot give, or None."""
    forward, reverse = _ad_modes((inputs, times))
    if forward and check_grads:
        return TypeError("ncode_jax.solve: check_grads=True checks reverse-mode gradients only; "
                         "forward-mode derivatives (jax.jvp, jax.jacfwd, jax.hessian) need check_grads=False")
    if adjoint in ANY_ORDER:
        return None
    if forward:
        return forward_mode_error(adjoint)
    if adjoint == "backsolve" and any(_ad_modes(t) != (False, 0) for t in times):
        return TypeError(
            "ncode_jax.solve: adjoint='backsolve' gives no derivatives with respect to t0, t1 or ts; "
            "use adjoint='checkpoint' or 'direct' to differentiate the times")
    if reverse >= 2 and adjoint == "backsolve":  # diffrax's backsolve loop takes no outer tangents
        return TypeError(
            "ncode_jax.solve: adjoint='backsolve' works under one reverse-mode level only: jax.grad "
            "of a function that itself calls jax.grad needs adjoint='direct' (or adjoint='checkpoint' "
            "when the inner gradient is under stop_gradient: first-order meta-learning)")
    return None


def guard_derivatives(adjoint: str, check_grads: bool, inputs, times):
    """``inputs`` (a PyTree), after refusing the derivatives ``adjoint`` cannot give (forward mode;
    time derivatives and two reverse levels with backsolve; forward mode with ``check_grads``).
    Under two or more reverse-mode levels the floating leaves pass through
    :func:`_first_order_only`: a second reverse pass through the first one's gradient raises.

    Raises:
      TypeError: naming the adjoint and the alternative.
    """
    error = _refusal(adjoint, check_grads, inputs, times)
    if error is not None:
        raise error
    if adjoint in ANY_ORDER or _ad_modes(inputs)[1] < 2 and _ad_modes(times)[1] < 2:
        return inputs
    leaves, treedef = jax.tree.flatten(inputs)
    floats = [i for i, a in enumerate(leaves) if inexact(a)]  # integer leaves have no gradient
    for i, a in zip(floats, _first_order_only([leaves[i] for i in floats], adjoint)):
        leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)


def _second_order_message(adjoint: str) -> str:
    return (f"ncode_jax.solve: adjoint={adjoint!r} gives first derivatives only; second-order "
            "reverse mode (jax.grad of jax.grad) needs adjoint='direct'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _first_order_only(tree, adjoint: str):
    """Identity on a solve's inputs under two reverse-mode levels. Its backward pass (the inner
    gradient) passes the cotangents through :func:`_not_differentiated`, so a second reverse pass
    that differentiates the inner gradient (``grad`` of ``grad``: the adjoint's backward loop
    cannot be transposed) raises a clear ``TypeError`` before it reaches that loop, while one that
    does not (first-order meta-learning: ``stop_gradient`` of the inner gradient) never calls it."""
    return tree


def _first_order_only_fwd(tree, adjoint):
    return tree, None


def _first_order_only_bwd(adjoint, _, ct):
    return (_not_differentiated(ct, adjoint),)


_first_order_only.defvjp(_first_order_only_fwd, _first_order_only_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _not_differentiated(tree, adjoint: str):
    """Identity whose backward pass raises: a gradient that must not be differentiated again."""
    return tree


def _not_differentiated_fwd(tree, adjoint):
    return tree, None


def _not_differentiated_bwd(adjoint, _, ct):
    raise TypeError(_second_order_message(adjoint))


_not_differentiated.defvjp(_not_differentiated_fwd, _not_differentiated_bwd)

