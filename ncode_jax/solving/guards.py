"""Run-time checks that survive ``jit``, ``grad``, ``value_and_grad``, ``vmap`` and a device mesh.

A check is a predicate and a message; :func:`guard` passes a PyTree through a custom-JVP identity
that raises the message of the first true predicate (``equinox``'s ``branched_error_if``), in a way
that XLA cannot remove under ``jax.jit(jax.grad(...))`` and that every device of a mesh raises
together. :func:`grad_check` raises in the backward pass instead, for non-finite gradients.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array


def error_token(preds: Array, msgs: tuple[str, ...]) -> Array:
    """A scalar 0 that raises ``msgs[i]`` for the first true ``preds[i]`` (one conditional).

    Under a mesh of several devices (``jax.set_mesh``) the check runs on every device (in a
    ``shard_map`` over the mesh, on the predicates every device holds whole): left to XLA, the
    conditional is pinned to one device, which raises alone while the others wait in the next
    collective until XLA aborts the process. Inside a ``shard_map`` (a solve of each device's own
    rows) the predicates are first combined over the manual axes (``pmax``): every device then
    raises the same message, or none does."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.manual_axes:  # inside a shard_map: every device its own predicates
        agreed = jax.lax.pmax(preds.astype(jnp.int32), tuple(mesh.manual_axes)) > 0
        return _local_error_token(agreed, msgs)
    if not mesh.empty and mesh.size > 1:
        return jax.shard_map(lambda p: _local_error_token(p, msgs), mesh=mesh, in_specs=P(),
                             out_specs=P(), check_vma=False)(preds)
    return _local_error_token(preds, msgs)


def _local_error_token(preds: Array, msgs: tuple[str, ...]) -> Array:
    if len(msgs) == 1:
        return eqx.error_if(jnp.zeros(()), preds[0], msgs[0])
    index = jnp.argmax(preds)  # the first true check names the cause
    return eqx.branched_error_if(jnp.zeros(()), jnp.any(preds), index, msgs)


def _add_token(tree, token: Array):
    return jax.tree.map(lambda a: a + token.astype(a.dtype) if inexact(a) else a, tree)


def error_if(tree, pred: Array, msg: str):
    """``eqx.error_if(tree, pred, msg)``, but the check's conditional carries a scalar that is then
    added (as 0) to ``tree``: the conditional is pinned to one device, and carrying a batch-sharded
    array through it would gather the whole batch there in every data-parallel step."""
    return _add_token(tree, error_token(jnp.reshape(pred, (1,)), (msg,)))


def inexact(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _guard_impl(tree, preds: Array, msgs: tuple[str, ...]):
    return _add_token(tree, error_token(preds, msgs))


@_guard_impl.defjvp
def _guard_jvp(msgs, primals, tangents):
    tree, preds = primals
    tree_dot, _ = tangents
    token = error_token(preds, msgs)
    out_dot = jax.tree.map(
        lambda a, da: da * (1 + token.astype(da.dtype)) if inexact(a) else da, tree, tree_dot
    )
    return _add_token(tree, token), out_dot


def guard(tree, checks: list[tuple[Array, str]]):
    """Raise the message of the first failing ``(pred, msg)`` check, in one conditional; the
    check also survives every transformation.

    ``eqx.error_if`` passes tangents through untouched, so under ``jax.jit(jax.grad(f))``
    nothing that the gradient needs depends on the check and XLA removes it. Here the tangent is
    scaled by ``1 + token`` (``token`` is the check's output, 0): still linear in the tangent, so
    forward and reverse mode both work, and the backward pass needs ``token`` as a residual.
    """
    preds = jnp.stack([jnp.asarray(p, bool).reshape(()) for p, _ in checks])
    # only floating leaves go through the custom JVP: integer leaves (PRNG keys, seeds in a running
    # cost's args) must stay unperturbed for diffrax's checkpointed loop
    leaves, treedef = jax.tree.flatten(tree)
    floats = [i for i, a in enumerate(leaves) if inexact(a)]
    guarded = _guard_impl([leaves[i] for i in floats], preds, tuple(m for _, m in checks))
    for i, a in zip(floats, guarded):
        leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def grad_check(tree, msg: str):
    """Identity whose backward pass raises ``msg`` if the cotangent has NaN or inf."""
    return tree


def _grad_check_fwd(tree, msg):
    return tree, None


def _grad_check_bwd(msg, _, ct):
    return (error_if(ct, not_finite(ct), msg),)


grad_check.defvjp(_grad_check_fwd, _grad_check_bwd)


def not_finite(tree) -> Array:
    leaves = [a for a in jax.tree.leaves(tree) if inexact(a)]
    if not leaves:
        return jnp.asarray(False)
    return ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))
