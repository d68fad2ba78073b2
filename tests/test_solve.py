"""`solve`: analytic references (expm for linear fields), NFE counts, errors that say what went
wrong, batch modes, and use under jax.jit / jax.grad / jax.vmap."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from helpers import CountingMLPField, counted

from ncode_jax import Dynamics, Feedback, LinearField, MLPField, SparseLinearField, solve

B, D, T = 4, 3, 1.0
TIGHT = dict(rtol=1e-8, atol=1e-8)

LIN = LinearField(D)
LIN_DYN = Dynamics(LIN)


def _normal(seed, shape, scale=1.0):
    # numpy test data: jax.random would compile a threefry kernel per shape
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


A_PER_SAMPLE = _normal(0, (B, D * D), 0.5)  # (B, P): every sample its own A
A_SHARED = A_PER_SAMPLE[0]  # (P,)
X0 = _normal(1, (B, D))


def expm_reference(field, theta, x0, t):
    """x(t) = expm(t A) x0 for every sample (theta shared (P,) or per sample (B, P))."""
    a = np.asarray(field.matrix(theta))
    a = np.broadcast_to(a, (x0.shape[0], *a.shape[-2:]))
    return np.stack([scipy.linalg.expm(t * a[i]) @ np.asarray(x0[i]) for i in range(len(a))])


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ---------------------------------------------------------------------------------------------
# Analytic references
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared"])
@pytest.mark.parametrize("solver,dt", [("tsit5", None), ("dopri5", None), ("rk4", 0.01)])
def test_linear_matches_expm(solver, dt, shared):
    theta = A_SHARED if shared else A_PER_SAMPLE
    sol = solve(LIN_DYN, X0, theta, t1=T, solver=solver, dt=dt, **TIGHT)
    ref = expm_reference(LIN, theta, X0, T)
    assert sol.x.shape == (B, D)
    assert rel_err(sol.x, ref) < 1e-6
    np.testing.assert_array_equal(sol.ts, [T])
    assert sol.cost is None
    np.testing.assert_array_equal(sol.theta, theta)  # open loop: θ is constant
    if dt is not None:
        assert int(sol.stats["num_steps"]) == round(T / dt)
    else:
        assert int(sol.stats["num_steps"]) > 1 and int(sol.stats["result"]) == 0


@pytest.mark.parametrize("solver,dt", [("tsit5", None), ("rk4", 0.01)])
def test_linear_save_points(solver, dt):
    ts = jnp.array([0.0, 0.1, 0.35, 0.8, T])
    sol = solve(LIN_DYN, X0, A_PER_SAMPLE, t1=T, ts=ts, solver=solver, dt=dt, **TIGHT)
    assert sol.x.shape == (len(ts), B, D)
    np.testing.assert_array_equal(sol.ts, ts)
    for i, t in enumerate(np.asarray(ts)):
        ref = expm_reference(LIN, A_PER_SAMPLE, X0, t)
        assert rel_err(sol.x[i], ref) < 1e-6, (i, t)


def test_sparse_linear_long_horizon():
    """AutoN-CODE's setting: sparse A, constant x(0), x(T=10)."""
    n = 6
    field = SparseLinearField(n)
    rng = np.random.default_rng(3)
    a = np.stack([-0.3 + 0.1 * rng.standard_normal((B, n)), 0.4 * rng.standard_normal((B, n))], -1)
    theta = jnp.asarray(a.reshape(B, 2 * n))
    x0 = jnp.ones((B, n))
    sol = solve(Dynamics(field), x0, theta, t1=10.0, solver="tsit5", **TIGHT)
    ref = expm_reference(field, theta, x0, 10.0)
    assert rel_err(sol.x, ref) < 1e-6
    assert np.abs(ref).max() > 1e-3  # the reference has not decayed to nothing


# ---------------------------------------------------------------------------------------------
# Number of function evaluations
# ---------------------------------------------------------------------------------------------



@pytest.mark.parametrize(
    "solver,dt",
    [("tsit5", None), ("dopri5", None), ("bosh3", None), ("heun", None),
     ("rk4", 0.1), ("euler", 0.1), ("tsit5", 0.1)],
)
def test_nfe_counts_field_evaluations(solver, dt):
    field = CountingMLPField(2, 8)
    # 3× the init scale: nonlinear enough that every adaptive solver rejects some steps at
    # rtol=atol=1e-4, so the count covers rejected steps too
    theta = 3.0 * field.layout.init(jax.random.PRNGKey(0), jnp.float64)
    x0 = _normal(5, (B, 2))
    opts = dict(rtol=1e-4, atol=1e-4)
    sol, calls = counted(lambda: solve(Dynamics(field), x0, theta, t1=2.0, solver=solver, dt=dt, **opts))
    assert calls > 0
    assert int(sol.stats["nfe"]) == calls
    assert int(sol.stats["num_steps"]) == int(sol.stats["num_accepted_steps"]) + int(
        sol.stats["num_rejected_steps"]
    )
    if dt is not None:
        assert int(sol.stats["num_steps"]) == 20
    else:
        assert int(sol.stats["num_rejected_steps"]) > 0


# ---------------------------------------------------------------------------------------------
# Errors that name the problem
# ---------------------------------------------------------------------------------------------

def test_bad_names_raise_value_error():
    with pytest.raises(ValueError, match=r"unknown solver 'rk45'.*tsit5"):
        solve(LIN_DYN, X0, A_SHARED, solver="rk45")
    with pytest.raises(ValueError, match=r"unknown adjoint 'adjoint'.*backsolve"):
        solve(LIN_DYN, X0, A_SHARED, adjoint="adjoint")
    with pytest.raises(ValueError, match=r"unknown batch mode 'pmap'.*vmap"):
        solve(LIN_DYN, X0, A_SHARED, batch="pmap")


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_adaptive_needs_error_estimate(solver):
    with pytest.raises(ValueError, match=rf"solver '{solver}' has no error estimate.*dt="):
        solve(LIN_DYN, X0, A_SHARED, solver=solver, dt=None)


def test_bad_shapes_and_options():
    with pytest.raises(ValueError, match="x0 has shape"):
        solve(LIN_DYN, X0[:, :2], A_SHARED)
    with pytest.raises(ValueError, match=f"theta0 .*P={D * D}"):
        solve(LIN_DYN, X0, A_SHARED[:-1])
    with pytest.raises(ValueError, match="dt must be a positive"):
        solve(LIN_DYN, X0, A_SHARED, solver="rk4", dt=-0.1)
    with pytest.raises(TypeError, match="dt must be a Python or NumPy number"):
        solve(LIN_DYN, X0, A_SHARED, solver="rk4", dt=jnp.asarray(0.1))
    # NumPy scalars are fine
    assert solve(LIN_DYN, X0, A_SHARED, solver="rk4", dt=np.float32(0.25)).stats["num_steps"] == 4
    with pytest.raises(ValueError, match="time interval is empty"):
        solve(LIN_DYN, X0, A_SHARED, t0=1.0, t1=1.0)
    fb = Feedback(LIN.layout, D, (4,))
    with pytest.raises(ValueError, match=r"params\['feedback'\]"):
        solve(Dynamics(LIN, fb), X0, A_SHARED)


def _nan_at(a, idx):
    return a.at[idx].set(jnp.nan)


def test_nan_in_x0_raises_eagerly_and_under_jit():
    x0 = _nan_at(X0, (1, 2))
    with pytest.raises(Exception, match="x0 contains NaN"):
        jax.block_until_ready(solve(LIN_DYN, x0, A_SHARED, solver="rk4", dt=0.01).x)

    @jax.jit
    def f(x0):
        return solve(LIN_DYN, x0, A_SHARED, solver="rk4", dt=0.01).x

    np.testing.assert_allclose(f(X0), expm_reference(LIN, A_SHARED, X0, T), rtol=1e-6)
    with pytest.raises(Exception, match="x0 contains NaN"):
        jax.block_until_ready(f(x0))


def test_nan_in_theta0_raises():
    theta = _nan_at(A_PER_SAMPLE, (2, 0))
    with pytest.raises(Exception, match="theta0 contains NaN"):
        jax.block_until_ready(solve(LIN_DYN, X0, theta, solver="rk4", dt=0.01).x)


def test_max_steps_error_and_throw_false():
    opts = dict(solver="tsit5", rtol=1e-12, atol=1e-12, max_steps=2)
    with pytest.raises(Exception, match=r"max_steps=2 .*solve\(\.\.\., max_steps=N\)"):
        jax.block_until_ready(solve(LIN_DYN, X0, A_PER_SAMPLE, **opts).x)
    sol = solve(LIN_DYN, X0, A_PER_SAMPLE, throw=False, **opts)
    assert int(sol.stats["result"]) != 0
    assert int(sol.stats["num_steps"]) == 2
    # with a sensible budget the same solve succeeds
    sol = solve(LIN_DYN, X0, A_PER_SAMPLE, throw=False, **{**opts, "max_steps": 4096})
    assert int(sol.stats["result"]) == 0
    # fixed steps: the advice is about dt, not tolerances
    with pytest.raises(Exception, match=r"max_steps=3 .*larger dt \(now 0.1; 3 steps cover 0.3"):
        jax.block_until_ready(solve(LIN_DYN, X0, A_SHARED, solver="rk4", dt=0.1, max_steps=3).x)


def test_diverging_fixed_step_raises():
    field = LinearField(1)
    theta = jnp.array([1e200])  # dx/dt = 1e200 x: explicit Euler overflows to inf in 2 steps
    x0 = jnp.ones((2, 1))
    with pytest.raises(Exception, match="NaN or inf"):
        jax.block_until_ready(solve(Dynamics(field), x0, theta, t1=2.0, solver="euler", dt=0.5).x)
    # what the check protects against: the unchecked solve really is non-finite
    sol = solve(Dynamics(field), x0, theta, t1=2.0, solver="euler", dt=0.5, throw=False)
    assert not np.all(np.isfinite(sol.x))


# ---------------------------------------------------------------------------------------------
# Batch modes
# ---------------------------------------------------------------------------------------------

def test_vmap_batch_mode_matches_system():
    field = MLPField(2, 8)
    fb = Feedback(field.layout, 2, (8,))
    dyn = Dynamics(field, fb)
    theta0 = field.layout.init(jax.random.PRNGKey(1), jnp.float64)[None] + _normal(
        6, (B, field.num_params), 0.3
    )
    params = {"feedback": fb.init(jax.random.PRNGKey(2), jnp.float64)}
    x0 = _normal(7, (B, 2))
    ts = jnp.array([0.0, 0.4, 1.0])
    opts = dict(t1=1.0, ts=ts, solver="tsit5", rtol=1e-10, atol=1e-10)
    sys_ = solve(dyn, x0, theta0, params, batch="system", **opts)
    per = solve(dyn, x0, theta0, params, batch="vmap", **opts)
    assert per.x.shape == sys_.x.shape == (3, B, 2)
    assert per.theta.shape == sys_.theta.shape == (3, B, field.num_params)
    np.testing.assert_allclose(per.x, sys_.x, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(per.theta, sys_.theta, rtol=1e-7, atol=1e-9)
    assert not np.allclose(sys_.theta[-1], sys_.theta[0])  # closed loop: θ moved
    for k in ("num_steps", "nfe", "result"):
        assert per.stats[k].shape == (B,), k
        assert sys_.stats[k].shape == (), k
    np.testing.assert_array_equal(per.stats["result"], 0)
    assert np.all(per.stats["nfe"] > 0)


# ---------------------------------------------------------------------------------------------
# Inside user transformations
# ---------------------------------------------------------------------------------------------

def test_under_jit_grad_vmap():
    opts = dict(solver="rk4", dt=0.01)

    @jax.jit
    def final(x0, theta):
        return solve(LIN_DYN, x0, theta, t1=T, **opts).x

    np.testing.assert_allclose(
        final(X0, A_PER_SAMPLE), expm_reference(LIN, A_PER_SAMPLE, X0, T), rtol=1e-7
    )

    # d/dx0 sum(c · x(T)) = expm(T A)^T c, sample by sample
    c = _normal(8, (B, D))
    g = jax.jit(jax.grad(lambda x0: jnp.sum(c * final(x0, A_PER_SAMPLE))))(X0)
    a = np.asarray(LIN.matrix(A_PER_SAMPLE))
    ref = np.stack([scipy.linalg.expm(T * a[i]).T @ np.asarray(c[i]) for i in range(B)])
    np.testing.assert_allclose(g, ref, rtol=1e-7)

    # vmap over different batches of initial states
    x0s = _normal(9, (3, B, D))
    out = jax.vmap(final, in_axes=(0, None))(x0s, A_PER_SAMPLE)
    for k in range(3):
        np.testing.assert_allclose(out[k], expm_reference(LIN, A_PER_SAMPLE, x0s[k], T), rtol=1e-7)


def test_vmap_over_end_time():
    t1s = jnp.array([0.5, 1.0, 2.0])

    def final(t1):
        sol = solve(LIN_DYN, X0, A_SHARED, t1=t1, solver="tsit5", **TIGHT)
        return sol.x, sol.stats["num_steps"]

    out, steps = jax.jit(jax.vmap(final))(t1s)
    for k, t in enumerate(np.asarray(t1s)):
        assert rel_err(out[k], expm_reference(LIN, A_SHARED, X0, t)) < 1e-6
    assert steps[0] < steps[2]  # a longer horizon took more adaptive steps
