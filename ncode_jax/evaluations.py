"""Count a vector field's evaluations as XLA runs them: the measured NFE.

:func:`ncode_jax.nfe_count` gives the NFE a solver's tableau implies (stages × steps); the
functions here count what actually runs, backward pass included, by a host callback inside the
field. The tests check the stored-steps integrator's evaluation counts with them, and the
benchmarks report them. A host callback per evaluation costs time: use these to count, not to
time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .conv import ConvBlockField
from .fields import MLPField

_EVALUATIONS = [0]


def _bump(_) -> None:
    _EVALUATIONS[0] += 1


def count_evaluation(x) -> None:
    """Inside a traced function (a vector field, a running cost): count one evaluation on the
    host each time XLA runs it. The callback reads one entry of ``x``, which must depend on the
    state: a callback without operands is loop-invariant, and JAX's partial evaluation of a
    differentiated ``lax.scan`` hoists it out of the loop, so it would run once, not once per step.
    Under ``jax.vmap`` (e.g. ``solve(batch="vmap")``) it runs once per mapped element, so divide
    such counts by the batch size."""
    jax.debug.callback(_bump, jnp.ravel(x)[0])


@dataclasses.dataclass(frozen=True)
class CountingMLPField(MLPField):
    """:class:`ncode_jax.MLPField` that counts its evaluations (:func:`count_evaluation`)."""

    def apply(self, t, x, w):
        count_evaluation(x)
        return super().apply(t, x, w)


@dataclasses.dataclass(frozen=True)
class CountingConvField(ConvBlockField):
    """:class:`ncode_jax.ConvBlockField` that counts its evaluations (:func:`count_evaluation`)."""

    def apply(self, t, x, w):
        count_evaluation(x)
        return super().apply(t, x, w)


def counted(fn: Callable, *args):
    """``(fn(*args), the evaluations counted during that call)`` (:func:`count_evaluation`)."""
    jax.effects_barrier()
    _EVALUATIONS[0] = 0
    out = jax.block_until_ready(fn(*args))
    jax.effects_barrier()
    return out, _EVALUATIONS[0]


def evaluations(fn: Callable, *args) -> int:
    """Evaluations counted during one call ``fn(*args)``, after a first call that compiles."""
    jax.block_until_ready(fn(*args))
    return counted(fn, *args)[1]
