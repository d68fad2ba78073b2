"""The adjoints: which diffrax adjoint a solve uses, and which derivatives each one can give.

``checkpoint`` (diffrax's ``RecursiveCheckpointAdjoint``, or the stored-steps integrator) and
``backsolve`` (``BacksolveAdjoint``) give reverse-mode first derivatives; ``direct``
(``DirectAdjoint``) and ``stored`` (a plain ``lax.scan``) any derivative. :func:`guard_derivatives`
refuses the others with a ``TypeError`` that names the adjoint and the alternative.

How a refused derivative is recognised, without looking at JAX's tracers: the solve's inputs pass
through identities whose JVP sends the tangent through a linear primitive,
``ncode_jax_reverse_only``. Reverse mode (``grad``, ``vjp``) only ever *transposes* that
primitive, and its transpose is the identity on the cotangent; forward mode (``jvp``, ``jacfwd``,
``linearize``) *evaluates* it, and evaluating it raises (eagerly, or when ``jit`` lowers it).
Each identity's JVP returns its primal wrapped again, so every level of differentiation meets it
in turn. The higher orders: with ``checkpoint`` the input cotangents pass through an identity
whose tangent may be neither evaluated nor transposed (a second derivative through the first
one's backward loop raises; an inner gradient under ``stop_gradient``, first-order
meta-learning, never differentiates it); with ``backsolve`` a second level that differentiates
the inputs raises at trace time, before diffrax's backward solve would see its tangents. The
primitive is defined with JAX's documented extension API (``jax.extend.core.Primitive`` and the
``jax.interpreters`` rule tables).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from .guards import inexact
from .options import is_concrete

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


_CHECK_GRADS_FORWARD = ("ncode_jax.solve: check_grads=True checks reverse-mode gradients only; "
                        "forward-mode derivatives (jax.jvp, jax.jacfwd, jax.hessian) need check_grads=False")
_BACKSOLVE_TIMES = ("ncode_jax.solve: adjoint='backsolve' gives no derivatives with respect to t0, t1 or "
                    "ts; use adjoint='checkpoint' or 'direct' to differentiate the times")
_BACKSOLVE_LEVELS = ("ncode_jax.solve: adjoint='backsolve' works under one reverse-mode level only: "
                     "jax.grad of a function that itself calls jax.grad needs adjoint='direct' (or "
                     "adjoint='checkpoint' when the inner gradient is under stop_gradient: first-order "
                     "meta-learning)")


def _second_order_message(adjoint: str) -> str:
    return (f"ncode_jax.solve: adjoint={adjoint!r} gives first derivatives only; second-order "
            "reverse mode (jax.grad of jax.grad) needs adjoint='direct'")


def _raise(message: str):
    raise TypeError(message)


# --- the primitive: a linear identity that may be transposed but not evaluated --------------------

_reverse_only_p = Primitive("ncode_jax_reverse_only")
_reverse_only_p.def_impl(lambda t, *, forward, then: _raise(forward))
_reverse_only_p.def_abstract_eval(lambda t, *, forward, then: t)
mlir.register_lowering(_reverse_only_p, lambda ctx, t, *, forward, then: _raise(forward))
ad.deflinear2(_reverse_only_p, lambda ct, t, *, forward, then: [then(ct)])
batching.primitive_batchers[_reverse_only_p] = (
    lambda args, dims, **params: (_reverse_only_p.bind(args[0], **params), dims[0]))


class _Levels:
    """Records, at trace time, that a second level of differentiation met a solve's inputs (the
    inputs themselves are differentiated twice, as in ``grad`` of ``grad`` with respect to θ, not
    only the first gradient's cotangent). Hashed by identity: one per solve call."""

    __slots__ = ("second",)

    def __init__(self):
        self.second = False


class _Refuse(NamedTuple):
    """What :func:`_reverse_only` refuses: ``forward`` is raised when forward mode evaluates the
    tangent; ``then`` (a hashable function) receives the cotangent in reverse mode; with
    ``levels``, a differentiation at a level deeper than ``levels`` (any mode) raises ``deeper``
    at trace time. ``depth`` counts the levels already met; ``seen`` (a :class:`_Levels`, or
    None) is told when a second level arrives."""

    forward: str
    then: Callable
    levels: int | None = None
    deeper: str = ""
    depth: int = 0
    seen: _Levels | None = None


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _reverse_only(x, refuse: _Refuse):
    """Identity on ``x`` that refuses what ``refuse`` says. Its JVP returns the primal wrapped
    again (one level deeper), so that every level of differentiation meets it, each in turn."""
    return x


@_reverse_only.defjvp
def _reverse_only_jvp(refuse, primals, tangents):
    if refuse.levels is not None and refuse.depth >= refuse.levels:
        raise TypeError(refuse.deeper)
    if refuse.depth >= 1 and refuse.seen is not None:
        refuse.seen.second = True
    deeper = refuse._replace(depth=refuse.depth + 1)
    tangent = _reverse_only_p.bind(tangents[0], forward=refuse.forward, then=refuse.then)
    return _reverse_only(primals[0], deeper), tangent


def _identity(ct):
    return ct


def _no_transpose(message: str, ct):
    raise TypeError(message)


def _first_order_only(seen: _Levels, message: str, ct):
    """The first gradient's cotangent ``ct``, made non-differentiable when the inputs are
    differentiated at a second level too (``seen``). A second level that only differentiates the
    cotangent (a weight of the loss, say) goes on to the adjoint's own backward pass, as JAX
    would take it."""
    return _not_differentiated(ct, message) if seen.second else ct


def _not_differentiated(x, message: str):
    """Identity that no derivative may go through: forward mode evaluates the primitive and raises,
    reverse mode transposes it and raises. Untouched when ``x``'s tangent is zero (not
    differentiated, or under ``stop_gradient``)."""
    return _reverse_only(x, _Refuse(message, functools.partial(_no_transpose, message)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _no_derivative(x, message: str):
    """Identity whose JVP rule raises at trace time: any differentiation of ``x`` (forward or
    reverse, any level) is refused before the next operation sees the tangent."""
    return x


@_no_derivative.defjvp
def _no_derivative_jvp(message, primals, tangents):
    raise TypeError(message)


def _apply_to_floats(tree, fn):
    """``fn`` on each floating leaf of ``tree`` (integer leaves have no derivative)."""
    return jax.tree.map(lambda a: fn(a) if inexact(a) else a, tree)


def guard_derivatives(adjoint: str, check_grads: bool, inputs, times):
    """``(inputs, times)`` passed through the identities that refuse, when a derivative reaches
    them, what ``adjoint`` cannot give: forward mode (every adjoint with ``check_grads``; all but
    ``direct`` and ``stored`` otherwise); second derivatives through ``checkpoint``'s backward
    loop; derivatives with respect to the times with ``backsolve``. Nothing is refused for a
    derivative that is not taken. ``times`` is ``(t0, t1, ts)``; those known at trace time are
    returned as they are.

    Raises (when the derivative is taken):
      TypeError: naming the adjoint and the alternative.
    """
    if adjoint in ANY_ORDER:
        if check_grads:
            refuse = _Refuse(_CHECK_GRADS_FORWARD, _identity)
            inputs = _apply_to_floats(inputs, lambda a: _reverse_only(a, refuse))
        return inputs, times
    forward = _CHECK_GRADS_FORWARD if check_grads else _FORWARD.format(adjoint=adjoint)
    if adjoint == "backsolve":  # diffrax's backsolve loop cannot trace inputs with outer tangents
        refuse = _Refuse(forward, _identity, levels=1, deeper=_BACKSOLVE_LEVELS)
    else:
        seen = _Levels()
        refuse = _Refuse(forward, functools.partial(_first_order_only, seen, _second_order_message(adjoint)),
                         seen=seen)
    inputs = _apply_to_floats(inputs, lambda a: _reverse_only(a, refuse))
    if adjoint == "backsolve":
        times = tuple(t if is_concrete(t) else _no_derivative(t, _BACKSOLVE_TIMES) for t in times)
    return inputs, times
