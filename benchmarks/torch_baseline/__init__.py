"""PyTorch + torchdiffeq baseline for the benchmarks (needs the ``torch`` extra).

:mod:`benchmarks.torch_baseline.toy` mirrors ``ncode_jax.NCODE.build(kind, MLPField(dim, hidden),
(dim,))`` for ``kind`` in ``node``/``open``/``closed`` with the same flat-θ layout, so that the
JAX parameters load into it unchanged (:func:`~benchmarks.torch_baseline.toy.load_jax_params`).
"""

from .toy import (
    ToyNCODE,
    grads_as_jax_tree,
    load_jax_params,
    solve_toy,
)

__all__ = ["ToyNCODE", "grads_as_jax_tree", "load_jax_params", "solve_toy"]
