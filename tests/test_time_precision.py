"""Time grids in a precision that can hold them: bfloat16/float16 states solved with float32
times, times relative to ``t0`` (a grid far from t = 0 keeps every step), and fixed steps the time
dtype cannot represent refused with the dtype and the interval named.

diffrax rounds every step end within 100 ULP of ``t1`` up to ``t1``: in bfloat16 that swallowed
the last ~39% of [0, 1] (7 steps instead of 10), in float32 on [1e4, 1e4 + 1] 9 steps of 100."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncode_jax import Dynamics, LinearField, MLPField, solve

LIN1 = Dynamics(LinearField(1))
RK4_EXP = 9.3514e-4  # rk4, dt = 0.1, dx/dt = -7x from x = 1 over a unit interval


SLOW = pytest.mark.slow


@pytest.mark.parametrize("dtype", [jnp.bfloat16, *(pytest.param(d, marks=SLOW)
                                                    for d in (jnp.float16, jnp.float32, jnp.float64))])
def test_low_precision_states_take_every_fixed_step(dtype):
    sol = solve(LIN1, jnp.ones((1, 1), dtype), jnp.array([-7.0], dtype), solver="rk4", dt=0.1)
    assert int(sol.stats["num_steps"]) == 10
    assert sol.x.dtype == dtype
    assert float(sol.x[0, 0]) == pytest.approx(RK4_EXP, rel=1e-2)


@SLOW
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_adaptive_and_saved_times(dtype):
    ts = jnp.linspace(0.0, 1.0, 5)  # float64: the save times are not rounded to the state's dtype
    sol = solve(LIN1, jnp.ones((1, 1), dtype), jnp.array([-7.0], dtype), ts=ts, rtol=1e-2, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(sol.ts, np.float64), np.float32(ts))
    np.testing.assert_allclose(np.asarray(sol.x[:, 0, 0], np.float64), np.exp(-7.0 * np.float32(ts)),
                               rtol=3e-2, atol=1e-3)


@pytest.fixture(scope="module")
def traced_rk4():
    return jax.jit(lambda t0, t1: solve(LIN1, jnp.ones((1, 1), jnp.float32), jnp.array([-7.0], jnp.float32),
                                        t0=t0, t1=t1, solver="rk4", dt=0.01))


@pytest.mark.parametrize("traced", [False, pytest.param(True, marks=SLOW)])
@pytest.mark.parametrize("t0, t1", [(1e4, 1e4 + 1), *(pytest.param(*t, marks=SLOW) for t in
                                                       ((1e4 + 1, 1e4), (-3e5, -3e5 + 1), (0.0, 1.0)))])
def test_float32_grid_far_from_zero_keeps_every_step(t0, t1, traced, traced_rk4):
    want = np.exp(-7.0) if t1 > t0 else np.exp(7.0)
    if traced:
        sol = traced_rk4(jnp.float32(t0), jnp.float32(t1))
    else:
        sol = solve(LIN1, jnp.ones((1, 1), jnp.float32), jnp.array([-7.0], jnp.float32), t0=t0, t1=t1,
                    solver="rk4", dt=0.01)
    assert int(sol.stats["num_steps"]) == 100
    assert float(sol.x[0, 0]) == pytest.approx(want, rel=1e-5)


@SLOW
def test_field_sees_the_absolute_time():
    field = MLPField(2, 4, time_dependent=True)
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)))
    theta = jnp.asarray(np.random.default_rng(1).standard_normal(field.layout.size))
    ref = solve(Dynamics(field), x0, theta, t0=10.0, t1=11.5, solver="rk4", dt=0.05).x
    got = solve(Dynamics(field), x0.astype(jnp.float32), theta.astype(jnp.float32), t0=10.0, t1=11.5,
                solver="rk4", dt=0.05).x
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_steps_the_time_dtype_cannot_hold_are_refused():
    x, th = jnp.ones((1, 1), jnp.float32), jnp.array([-7.0], jnp.float32)
    with pytest.raises(ValueError, match=r"dt=1e-06 is too small for the interval \[0.0, 1.0\] in float32"):
        solve(LIN1, x, th, solver="rk4", dt=1e-6)
    with pytest.raises(ValueError, match=r"interval \[1000.0, 1010.0\] in float32"):
        solve(LIN1, x, th, solver="euler", dt=5e-5, t0=1e3, t1=1010.0)
    with pytest.raises(Exception, match=r"dt=1e-06 is too small for the interval \[t0, t1\] in float32"):
        jax.jit(lambda t1: solve(LIN1, x, th, solver="rk4", dt=1e-6, t1=t1).x)(jnp.float32(1.0))
