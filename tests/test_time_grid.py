"""The mirror of diffrax's fixed-step grid (``fixed_step_grid``, ``fixed_step_count``), pinned
against ``diffeqsolve``'s own step times: the stored-steps integrator steps through the mirror's
times and the solve's step budget is the mirror's count, so a change in diffrax's arithmetic must
fail here, not shift a solve silently. Every state dtype a solve takes, in the time dtype the solve
then uses (float32 for bfloat16 and float16 states), forwards and backwards in time."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ncode_jax as nc
from ncode_jax.solving.timegrid import time_dtype

CASES = [(0.0, 1.0, 0.3), (0.0, 1.0, 1 / 3), (0.0, 1.0, 0.33333333), (0.0, 1.0, 0.999999),
         (0.0, 1.0, 1.5), (0.2, -0.5, 0.25), (1.0, 0.0, 0.3), (0.0, 0.7, 0.1),
         (0.1, 0.8, 0.7), (0.3, 0.1, 0.2), (1.0, 0.1, 0.9)]  # t0 + dt just short of t1: 2 steps


@pytest.mark.parametrize("state_dtype", [jnp.bfloat16, jnp.float16, np.float32, np.float64])
def test_fixed_step_grid_is_diffrax_grid(state_dtype):
    dtype = time_dtype(state_dtype)
    assert dtype == (np.float64 if state_dtype == np.float64 else np.float32)
    rng = np.random.default_rng(0)
    cases = CASES + list(zip(rng.uniform(-2, 2, 12), rng.uniform(-2, 2, 12), rng.uniform(0.02, 1.5, 12)))
    term = diffrax.ODETerm(lambda t, y, a: jnp.ones_like(y))
    steps = jax.jit(lambda t0, t1, dt0: diffrax.diffeqsolve(  # times traced: one compilation
        term, diffrax.Euler(), t0, t1, dt0, jnp.zeros(1, dtype), max_steps=256,
        saveat=diffrax.SaveAt(steps=True)).ts)
    for t0, t1, dt in cases:
        t0, t1, dt = (*(float(np.asarray(t, dtype)) for t in (t0, t1)), float(dt))  # solve's own types
        ts = np.asarray(steps(*(jnp.asarray(v, dtype) for v in (t0, t1, dt if t1 > t0 else -dt))))
        want = np.concatenate([[t0], ts[np.isfinite(ts)]]).astype(dtype)
        grid = nc.fixed_step_grid(t0, t1, dt, dtype)
        assert grid.dtype == dtype and grid.shape == want.shape, (t0, t1, dt, grid, want)
        assert nc.fixed_step_count(t0, t1, dt, dtype) == len(want) - 1
        np.testing.assert_array_max_ulp(grid, want, maxulp=1)  # rounding the fused multiply-add twice
