"""Integrating backwards in time (``t1 < t0``): every solver kind and adjoint, decreasing save
times, traced times under jit, and NCODE.inverse, against expm for a linear field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from helpers import tree_rel_err

from ncode_jax import NCODE, Dynamics, LinearField, MLPField, solve

D = 2
LIN = LinearField(D)
A = jnp.asarray([[-0.4, 0.9], [-0.7, 0.2]])
THETA = A.reshape(-1)
X1 = jnp.asarray(np.random.default_rng(0).standard_normal((3, D)))
TIGHT = dict(rtol=1e-9, atol=1e-9)


def _expm_back(t):
    """x(t) for the ODE passing through X1 at time 1: expm((t - 1) A) X1."""
    return np.asarray(X1) @ scipy.linalg.expm((t - 1.0) * np.asarray(A)).T


@pytest.mark.parametrize("solver,dt,adjoint", [
    (s, dt, a) if (s, a) != ("rk4", "direct") else pytest.param(s, dt, a, marks=pytest.mark.slow)
    for s, dt in (("tsit5", None), ("rk4", 0.05)) for a in ("checkpoint", "backsolve", "direct")])
def test_backwards_matches_expm_with_gradients(solver, dt, adjoint):
    def run(theta):
        return solve(Dynamics(LIN), X1, theta, t0=1.0, t1=0.0, solver=solver, dt=dt, adjoint=adjoint, **TIGHT)

    def loss(th):
        sol = run(th)
        return jnp.sum(sol.x), sol

    (_, sol), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(THETA)
    np.testing.assert_allclose(sol.x, _expm_back(0.0), rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(sol.ts, [0.0])
    # g = d/dθ of sum(x(0)), against central differences of the exact solution
    eps, fd = 1e-6, []
    for i in range(THETA.size):
        e = np.zeros(THETA.size)
        e[i] = eps
        a_p, a_m = (np.asarray(THETA) + e).reshape(D, D), (np.asarray(THETA) - e).reshape(D, D)
        fd.append((np.sum(np.asarray(X1) @ scipy.linalg.expm(-a_p).T)
                   - np.sum(np.asarray(X1) @ scipy.linalg.expm(-a_m).T)) / (2 * eps))
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("solver,dt", [("dopri5", None), ("euler", 0.001)])
def test_backwards_decreasing_save_times(solver, dt):
    ts = jnp.array([1.0, 0.6, 0.25, 0.0])
    sol = solve(Dynamics(LIN), X1, THETA, t0=1.0, t1=0.0, ts=ts, solver=solver, dt=dt, **TIGHT)
    assert sol.x.shape == (4, 3, D)
    tol = 1e-6 if dt is None else 5e-3
    for i, t in enumerate(np.asarray(ts)):
        np.testing.assert_allclose(sol.x[i], _expm_back(t), rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", [None, 0.05])
def test_backwards_with_traced_times(dt):
    run = jax.jit(lambda t0, t1: solve(Dynamics(LIN), X1, THETA, t0=t0, t1=t1, dt=dt,
                                       solver="tsit5" if dt is None else "rk4", max_steps=64, **TIGHT).x)
    np.testing.assert_allclose(run(1.0, 0.0), _expm_back(0.0), rtol=1e-6, atol=1e-8)
    # the same executable integrates forwards too
    np.testing.assert_allclose(run(0.0, 1.0), np.asarray(X1) @ scipy.linalg.expm(np.asarray(A)).T,
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["anode", "open", "closed"])
def test_ncode_inverse_recovers_the_input(kind):
    model = NCODE.build(kind, MLPField(2, 8), (1,) if kind == "anode" else (2,),
                        augment=1 if kind == "anode" else 0, hidden=(8,), feedback_hidden=(8,))
    params = model.init(jax.random.key(3), jnp.float64)
    x0 = X1[:, :1] if kind == "anode" else X1
    fwd = model(params, x0, **TIGHT)
    theta_t1 = None if kind == "anode" else fwd.theta
    back = model.inverse(params, fwd.x, theta_t1, t1=1.0, **TIGHT)
    x0_aug = jnp.pad(x0, ((0, 0), (0, 1))) if kind == "anode" else x0
    assert tree_rel_err(back.x, x0_aug) < 1e-6


def test_inverse_needs_theta_when_it_depends_on_the_input():
    model = NCODE.build("open", MLPField(2, 8), (2,), hidden=(8,))
    params = model.init(jax.random.key(0), jnp.float64)
    with pytest.raises(ValueError, match=r"pass theta_t1=sol.theta"):
        model.inverse(params, X1, t1=1.0)
