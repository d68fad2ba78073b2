"""Loops over the batch that stay on each device's own rows under data parallelism.

Data-parallel training (``train/parallel.py``) jits a step with the batch sharded along the mesh
axis :data:`BATCH_AXIS`. Vectorised code partitions by itself, but a *loop over the batch axis*
(``lax.map``/``lax.scan``, used by the per-sample convolution kernels) does not: XLA's SPMD
partitioner all-gathers the whole batch onto every device and each device then runs every
iteration — the result is right, the work is not divided. The helpers here run the loop inside
``jax.shard_map`` over :data:`BATCH_AXIS` when a mesh with that axis is active
(``with jax.set_mesh(mesh):``, as ``DataParallel.jit`` does), so each device loops over its own
rows only; with no such mesh they are the plain ``lax`` loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"


def _data_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and BATCH_AXIS in mesh.axis_names


def data_parallel_devices() -> int:
    """How many devices the batch is split over: the size of the active mesh's
    :data:`BATCH_AXIS` (at trace time, under ``jax.set_mesh``), 1 without such a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names:
        return 1
    return int(dict(mesh.shape)[BATCH_AXIS])


def batch_map(f: Callable[[Any], Any], xs: Any) -> Any:
    """``lax.map(f, xs)`` over the leading (batch) axis of every leaf of ``xs``; under a mesh with
    a :data:`BATCH_AXIS` axis each device maps over its own rows (the batch must split evenly)."""
    if not _data_mesh():
        return lax.map(f, xs)
    return jax.shard_map(lambda local: lax.map(f, local), in_specs=P(BATCH_AXIS),
                         out_specs=P(BATCH_AXIS))(xs)


def batch_sum(f: Callable[[Any], Any], init: Any, xs: Any) -> Any:
    """``init + Σ_b f(xs[b])`` as a ``lax.scan`` over the leading axis of ``xs`` (one row at a time,
    so per-row intermediates stay small); under a :data:`BATCH_AXIS` mesh each device sums its own
    rows and the partial sums are added across devices (``psum``)."""

    def local_sum(acc, rows):
        out, _ = lax.scan(lambda a, row: (jax.tree.map(lambda u, v: u + v, a, f(row)), None), acc, rows)
        return out

    if not _data_mesh():
        return local_sum(init, xs)
    def per_device(zeros, rows):
        zeros = lax.pcast(zeros, (BATCH_AXIS,), to="varying")  # the carry differs per device
        return lax.psum(local_sum(zeros, rows), BATCH_AXIS)

    zeros = jax.tree.map(lambda a: a * 0, init)
    total = jax.shard_map(per_device, in_specs=(P(), P(BATCH_AXIS)), out_specs=P())(zeros, xs)
    return jax.tree.map(lambda a, b: a + b, init, total)
