"""The stages of :func:`ncode_jax.solve`, one module each.

* :mod:`~ncode_jax.solving.options` — :class:`SolveConfig`, the solver settings, and the one
  table of rules they obey (eagerly when known, as run-time checks when traced).
* :mod:`~ncode_jax.solving.timegrid` — the time dtype and the mirror of diffrax's fixed-step grid.
* :mod:`~ncode_jax.solving.plan` — what is decided at trace time: dtypes, interval, step grid,
  budget, which integrator runs.
* :mod:`~ncode_jax.solving.inputs` — checks of the inputs where they enter.
* :mod:`~ncode_jax.solving.adjoints` — the diffrax adjoints and the derivatives each can give.
* :mod:`~ncode_jax.solving.integrators` — the stored-steps integrator and diffrax's.
* :mod:`~ncode_jax.solving.diagnose` — the causes of failure, their codes and messages.
* :mod:`~ncode_jax.solving.guards` — run-time checks that survive jit, grad, vmap and a mesh.
"""
