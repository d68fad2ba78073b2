"""Theorem 1 (integrated loss): the running cost c, dc/dt = ℓ(t, x, θ, cost_args), carried as
one more state. c(T) must equal ∫₀ᵀ ℓ dt along the trajectory, and its gradient (w.r.t. the
model's parameters and the differentiable cost weights in ``cost_args``) must be right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from helpers import tree_rel_err
from jax.flatten_util import ravel_pytree

from ncode_jax import NCODE, Dynamics, LinearField, MLPField, solve

B, T = 6, 1.0
FIXED = dict(solver="rk4", dt=0.05)
X0 = jnp.asarray(np.random.default_rng(0).standard_normal((B, 2)))
COST_ARGS = {"w": jnp.asarray(1.3), "v": jnp.asarray(0.05)}


def running_cost(t, x, theta, cost_args):
    """ℓ = w·|x|² (+ v·|θ|², so that ℓ also sees the moving weights θ(t))."""
    return cost_args["w"] * jnp.sum(x**2, -1) + cost_args["v"] * jnp.sum(theta**2, -1)


def _model():
    model = NCODE.build(
        "open_closed", MLPField(2, 8), (2,), hidden=(8,), feedback_hidden=(8,),
        running_cost=running_cost,
    )
    params = model.init(jax.random.PRNGKey(1), jnp.float64)
    last = params["feedback"]["mlp"][-1]
    params["feedback"]["mlp"][-1] = {"w": 5.0 * last["w"], "b": last["b"] + 0.1}
    return model, params


MODEL, PARAMS = _model()


def total_cost(adjoint):
    def f(params, cost_args):
        sol = MODEL(params, X0, cost_args=cost_args, t1=T, adjoint=adjoint, **FIXED)
        return jnp.mean(sol.cost)

    return f


_FORWARD = jax.jit(total_cost("checkpoint"))  # compiled once, shared by the tests below


@pytest.fixture(scope="module")
def cost_grads():
    cache = {}

    def get(adjoint):
        if adjoint not in cache:
            f = jax.jit(jax.value_and_grad(total_cost(adjoint), argnums=(0, 1)))
            cache[adjoint] = f(PARAMS, COST_ARGS)
        return cache[adjoint]

    return get


def test_cost_equals_quadrature_of_running_cost():
    ts = jnp.linspace(0.0, T, 2001)
    sol = MODEL(PARAMS, X0, cost_args=COST_ARGS, t1=T, ts=ts, solver="tsit5", rtol=1e-10,
                atol=1e-10)
    assert sol.cost.shape == (len(ts), B)
    assert sol.theta.shape == (len(ts), B, MODEL.field.num_params)
    assert not np.allclose(sol.theta[-1], sol.theta[0])  # closed loop: θ(t) moves
    ell = np.asarray(running_cost(ts[:, None], sol.x, sol.theta, COST_ARGS))  # (len(ts), B)
    simpson = scipy.integrate.simpson(ell, x=np.asarray(ts), axis=0)
    np.testing.assert_allclose(sol.cost[-1], simpson, rtol=1e-9)
    # and at every save point (trapezoid on h = 5e-4: error ~ h²)
    cumtrapz = scipy.integrate.cumulative_trapezoid(ell, x=np.asarray(ts), axis=0, initial=0)
    np.testing.assert_allclose(sol.cost, cumtrapz, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(sol.cost[0], 0.0)
    # the θ term contributes: the check above would fail if ℓ saw a wrong θ
    assert float(np.min(np.sum(np.asarray(sol.theta) ** 2, -1))) * 0.05 > 1e-3


@pytest.mark.parametrize("batch", ["system", "vmap"])
def test_cost_through_solve_params_analytic(batch):
    """Scalar dx/dt = a x: ∫₀ᵀ w x² dt = w x0² (e^{2aT} - 1) / (2a), θ per sample in args."""
    a = jnp.array([[-0.7], [0.3], [1.1]])
    x0 = jnp.array([[1.0], [-2.0], [0.5]])
    dyn = Dynamics(LinearField(1), running_cost=lambda t, x, th, c: c["w"] * jnp.sum(x**2, -1))
    ts = jnp.array([0.5, 2.0])
    sol = solve(dyn, x0, a, {"cost": {"w": 0.7}}, t1=2.0, ts=ts, solver="tsit5", rtol=1e-10,
                atol=1e-10, batch=batch)
    assert sol.cost.shape == (2, 3)
    for i, t in enumerate(np.asarray(ts)):
        ref = 0.7 * x0[:, 0] ** 2 * np.expm1(2 * a[:, 0] * t) / (2 * a[:, 0])
        np.testing.assert_allclose(sol.cost[i], ref, rtol=1e-8)


def test_cost_gradient_wrt_weights_is_unit_cost(cost_grads):
    """c is linear in (w, v) and x, θ do not depend on them: ∂c/∂w = c(w=1, v=0)."""
    _, (_, g_args) = cost_grads("checkpoint")
    f = _FORWARD
    one = jnp.asarray(1.0)
    zero = jnp.asarray(0.0)
    np.testing.assert_allclose(g_args["w"], f(PARAMS, {"w": one, "v": zero}), rtol=1e-12)
    np.testing.assert_allclose(g_args["v"], f(PARAMS, {"w": zero, "v": one}), rtol=1e-12)
    assert float(g_args["w"]) > 0 and float(g_args["v"]) > 0


@pytest.mark.parametrize("group", [None, "initial", "feedback", "cost"])
def test_cost_gradient_matches_finite_differences(cost_grads, group):
    value, grad = cost_grads("checkpoint")
    f = _FORWARD
    both = {"initial": PARAMS["initial"], "feedback": PARAMS["feedback"], "cost": COST_ARGS}
    gboth = {"initial": grad[0]["initial"], "feedback": grad[0]["feedback"], "cost": grad[1]}
    flat, unravel = ravel_pytree(both)
    gflat = np.asarray(ravel_pytree(gboth)[0])
    mask = np.ones(flat.shape)
    if group is not None:
        mask = np.asarray(ravel_pytree({k: jax.tree.map(
            lambda a, on=(k == group): jnp.full_like(a, float(on)), v) for k, v in both.items()})[0])
    assert np.linalg.norm(gflat * mask) > 1e-6

    def loss(z):
        p = unravel(z)
        return f({"initial": p["initial"], "feedback": p["feedback"]}, p["cost"])

    np.testing.assert_allclose(loss(flat), value, rtol=1e-12)
    rng = np.random.default_rng({None: 0, "initial": 1, "feedback": 2, "cost": 3}[group])
    eps = 1e-6
    for _ in range(2):
        d = rng.standard_normal(flat.shape) * mask
        d /= np.linalg.norm(d)
        fd = float((loss(flat + eps * d) - loss(flat - eps * d)) / (2 * eps))
        exact = float(gflat @ d)
        scale = max(abs(exact), 1e-2 * np.linalg.norm(gflat * mask))
        assert abs(fd - exact) <= 1e-6 * scale, (group, fd, exact)


def test_cost_gradient_checkpoint_equals_backsolve(cost_grads):
    v_cp, g_cp = cost_grads("checkpoint")
    v_bs, g_bs = cost_grads("backsolve")
    np.testing.assert_allclose(v_bs, v_cp, rtol=1e-12)
    assert tree_rel_err(g_bs, g_cp) <= 1e-6
