"""The checkpoint adjoint that stores every fixed step (``checkpoints >=`` the number of steps): one
``lax.scan`` of the solver's own step instead of diffrax's checkpointed loop. It must give the same
solution, stats and gradients as the diffrax path, be taken under ``jax.jit`` (the times are
Python floats there too), and fall back to diffrax where it does not apply."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_rel_err

import ncode_jax as nc
from benchmarks.common import CountingMLPField, evaluations

SOLVE = sys.modules["ncode_jax.solve"]
X0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (6, 2)))


def _loss_and_grad(model, params, **opts):
    def loss(p):
        sol = model(p, X0, **opts)
        return jnp.sum(sol.x ** 2) + (0.0 if sol.cost is None else jnp.sum(sol.cost)), sol.stats

    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), {k: np.asarray(v).tolist() for k, v in stats.items()}, grads


@pytest.mark.parametrize("kind, solver, dt, t1, batch", [
    ("open", "rk4", 0.25, 1.0, "system"),
    ("closed", "tsit5", 0.25, -0.5, "system"),  # reverse time, an FSAL solver
    pytest.param("closed", "heun", 0.1, 0.7, "vmap", marks=pytest.mark.slow),  # rounded grid, per sample
])
def test_stored_steps_equal_the_diffrax_path(kind, solver, dt, t1, batch, monkeypatch):
    # a time-dependent field: every stage's time enters the solution
    model = nc.NCODE.build(kind, nc.MLPField(2, 8, time_dependent=True), (2,), hidden=(8,),
                           feedback_hidden=(8,), running_cost=nc.kinetic_energy(0.1))
    params = model.init(jax.random.key(0), jnp.float64)
    opts = dict(solver=solver, dt=dt, t1=t1, batch=batch, adjoint="checkpoint")
    taken = []
    real = SOLVE._stored_steps
    monkeypatch.setattr(SOLVE, "_stored_steps", lambda *a: taken.append(1) or real(*a))
    v_ref, s_ref, g_ref = _loss_and_grad(model, params, **opts)
    assert not taken  # checkpoints=None: diffrax's checkpointed loop
    v, s, g = _loss_and_grad(model, params, checkpoints=100, **opts)
    assert taken  # under jax.jit
    assert s == s_ref and v == pytest.approx(v_ref, rel=1e-12)
    assert tree_rel_err(g, g_ref) < 1e-12


def test_stored_steps_gradient_matches_finite_differences():
    model = nc.NCODE.build("closed", nc.MLPField(2, 8), (2,), hidden=(8,), feedback_hidden=(8,))
    params = model.init(jax.random.key(1), jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    value = jax.jit(jax.value_and_grad(
        lambda v: jnp.sum(model(unravel(v), X0, solver="rk4", dt=0.25, checkpoints=4).x ** 2)))
    direction = jax.random.normal(jax.random.key(2), flat.shape, jnp.float64)
    eps = 1e-5
    fd = (value(flat + eps * direction)[0] - value(flat - eps * direction)[0]) / (2 * eps)
    assert float(value(flat)[1] @ direction) == pytest.approx(float(fd), rel=1e-7)


@pytest.mark.parametrize("opts", [
    dict(checkpoints=3),  # fewer checkpoints than the 4 steps
    dict(checkpoints=4, dt=0.3),  # 0.3 does not divide [0, 1]: diffrax shortens the grid its own way
    dict(checkpoints=4, ts=jnp.linspace(0.0, 1.0, 3)),  # saved times: dense output
    dict(checkpoints=4, max_steps=3),  # a budget the solve exceeds: diffrax names it
])
def test_stored_steps_fall_back_where_they_do_not_apply(opts, monkeypatch):
    model = nc.NCODE.build("open", nc.MLPField(2, 8), (2,), hidden=(8,))
    params = model.init(jax.random.key(0), jnp.float64)
    taken = []
    real = SOLVE._stored_steps
    monkeypatch.setattr(SOLVE, "_stored_steps", lambda *a: taken.append(1) or real(*a))
    try:
        model(params, X0, **{"solver": "rk4", "dt": 0.25, **opts})
    except Exception as e:  # noqa: BLE001 - only the budget case raises, and it names the budget
        assert "max_steps=3" in str(e), e
    assert not taken


@pytest.mark.parametrize("kind, solver", [("closed", "rk4"), ("open", "tsit5"), ("closed", "euler")])
def test_stored_steps_evaluate_the_field_once_per_stage(kind, solver):
    """The backward pass evaluates the field no more: every stage's residuals are stored.
    (diffrax's own ``step`` runs the stages in a checkpointed loop whose reverse pass evaluates
    each stage again: 2× the forward count.)"""
    model = nc.NCODE.build(kind, CountingMLPField(2, 8), (2,), hidden=(8,), feedback_hidden=(8,))
    params = model.init(jax.random.key(0), jnp.float64)
    opts = dict(solver=solver, dt=0.25, checkpoints=4)
    fwd = jax.jit(lambda p: model(p, X0, **opts).stats["nfe"])
    both = jax.jit(jax.grad(lambda p: jnp.sum(model(p, X0, **opts).x ** 2)))
    n_fwd = evaluations(fwd, params)
    assert n_fwd == int(fwd(params))  # the NFE the stats report
    assert evaluations(both, params) == n_fwd
