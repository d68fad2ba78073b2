"""The stored-steps integrator (``adjoint="stored"``, or the checkpoint adjoint's default while
the stored states fit a bound): one
``lax.scan`` of the solver's own step instead of diffrax's checkpointed loop. It must give the same
solution, stats and gradients as the diffrax path, be taken under ``jax.jit`` (the times are
Python floats there too), and fall back to diffrax where it does not apply."""

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CountingMLPField, evaluations, tree_rel_err

import ncode_jax as nc

SOLVE = sys.modules["ncode_jax.solve"]
INTEGRATORS = importlib.import_module("ncode_jax.solving.integrators")
PLAN = importlib.import_module("ncode_jax.solving.plan")
X0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (6, 2)))


def _loss_and_grad(model, params, **opts):
    def loss(p):
        sol = model(p, X0, **opts)
        return jnp.sum(sol.x ** 2) + (0.0 if sol.cost is None else jnp.sum(sol.cost)), sol.stats

    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), {k: np.asarray(v).tolist() for k, v in stats.items()}, grads


@pytest.mark.parametrize("kind, solver, dt, t1, batch", [
    # open loop + rk4 also in test_stored_steps_take_diffrax_grid_for_any_dt (default run)
    pytest.param("open", "rk4", 0.25, 1.0, "system", marks=pytest.mark.slow),
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
    real = INTEGRATORS.stored_steps
    monkeypatch.setattr(INTEGRATORS, "stored_steps", lambda *a: taken.append(1) or real(*a))
    v_ref, s_ref, g_ref = _loss_and_grad(model, params, checkpoints=1, **opts)
    assert not taken  # checkpoints=1 < the steps: diffrax's checkpointed loop
    v, s, g = _loss_and_grad(model, params, **opts)
    assert taken  # the default (checkpoints=None) stores the steps; under jax.jit
    assert s == s_ref and v == pytest.approx(v_ref, rel=1e-12)
    assert tree_rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("dtype, dt, t1", [
    (jnp.float32, 0.33333333, 1.0),  # 3 steps in float32 (ceil(1 / 0.33333333) = 4 in float64)
    pytest.param(jnp.float64, 0.15, -0.8, marks=pytest.mark.slow),  # reverse time, an uneven grid
    pytest.param(jnp.float64, 0.3, 1.0, marks=pytest.mark.slow),  # diffrax's 0, 0.3, 0.5, 0.75, 1
    pytest.param(jnp.float32, 0.3, 1.0, marks=pytest.mark.slow),
])
def test_stored_steps_take_diffrax_grid_for_any_dt(dtype, dt, t1, monkeypatch):
    # the stored-steps path used to need dt to divide the interval to 1e-9 (in float64), so a dt
    # like 0.3, or 0.33333333 in float32, silently fell back to diffrax's recomputing loop
    # open loop, a time-dependent field: the grid's times enter the solution (closed loops take
    # the same path: test_stored_steps_equal_the_diffrax_path)
    model = nc.NCODE.build("open", nc.MLPField(2, 4, time_dependent=True), (2,), hidden=(4,))
    params = model.init(jax.random.key(0), dtype)
    x0 = X0.astype(dtype)
    taken = []
    real = INTEGRATORS.stored_steps
    monkeypatch.setattr(INTEGRATORS, "stored_steps", lambda *a: taken.append(a[2]) or real(*a))

    def run(**how):
        def loss(p):
            sol = model(p, x0, solver="rk4", dt=dt, t1=t1, **how)
            return jnp.sum(sol.x ** 2), sol.stats
        (v, stats), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return float(v), {k: np.asarray(v).tolist() for k, v in stats.items()}, g

    v_ref, s_ref, g_ref = run(adjoint="checkpoint", checkpoints=1)
    assert not taken
    v, s, g = run(adjoint="stored")
    assert len(taken) == 1
    assert len(taken[0]) - 1 == s_ref["num_steps"] == s["num_steps"]
    assert s == s_ref
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    assert v == pytest.approx(v_ref, rel=tol)
    assert tree_rel_err(g, g_ref) < tol


@pytest.mark.parametrize("dtype, t0, t1, dt", [
    # the solver's time is t - t0: t0 = 0 and t1 one float32 ULP beyond -0.2
    (np.float32, 0.0, -float(np.nextafter(np.float32(0.2), np.float32(1))), 0.2),
    pytest.param(np.float64, 0.1, 0.8, 0.7, marks=pytest.mark.slow),  # its grid: test_fixed_step_grid_...
])
def test_one_step_of_dt_just_short_of_t1_is_two_steps(dtype, t0, t1, dt):
    # t0 + dt rounds to just below t1: diffrax takes a second, tiny step; the budget was 1 step
    # (the solve raised "used all max_steps=1 steps") and the stored grid raised IndexError
    model = nc.NCODE.build("open", nc.MLPField(2, 4), (2,), hidden=(4,))
    params = model.init(jax.random.key(0), dtype)
    for how in ({}, {"adjoint": "stored"}, {"checkpoints": 4}):
        sol = model(params, X0.astype(dtype), solver="rk4", t0=t0, t1=t1, dt=dt, **how)
        assert int(sol.stats["num_steps"]) == 2 and bool(jnp.all(jnp.isfinite(sol.x)))


def test_stored_steps_gradient_matches_finite_differences():
    model = nc.NCODE.build("closed", nc.MLPField(2, 8), (2,), hidden=(8,), feedback_hidden=(8,))
    params = model.init(jax.random.key(1), jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    value = jax.jit(jax.value_and_grad(
        lambda v: jnp.sum(model(unravel(v), X0, solver="rk4", dt=0.25, adjoint="stored").x ** 2)))
    direction = jax.random.normal(jax.random.key(2), flat.shape, jnp.float64)
    eps = 1e-5
    fd = (value(flat + eps * direction)[0] - value(flat - eps * direction)[0]) / (2 * eps)
    assert float(value(flat)[1] @ direction) == pytest.approx(float(fd), rel=1e-7)


def test_default_stores_the_steps_while_they_fit_the_bound(monkeypatch):
    """``checkpoints=None`` (the default) takes the stored-steps path when
    ``stored_steps_bytes`` is within ``STORED_STEPS_MAX_BYTES``, diffrax's loop beyond it."""
    model = nc.NCODE.build("open", nc.MLPField(2, 8), (2,), hidden=(8,))
    params = model.init(jax.random.key(0), jnp.float64)
    taken = []
    real = INTEGRATORS.stored_steps
    monkeypatch.setattr(INTEGRATORS, "stored_steps", lambda *a: taken.append(1) or real(*a))
    need = SOLVE.stored_steps_bytes(4, 4, X0, jnp.zeros((6, model.field.num_params), X0.dtype))
    assert need == 4 * 4 * (X0.size + 6 * model.field.num_params) * 8
    first = model(params, X0, solver="rk4", dt=0.25)
    assert taken == [1]
    monkeypatch.setattr(PLAN, "STORED_STEPS_MAX_BYTES", need - 1)
    second = model(params, X0, solver="rk4", dt=0.25)
    assert taken == [1]  # beyond the bound: diffrax's checkpointed loop, the same solution
    np.testing.assert_allclose(first.x, second.x, rtol=1e-12)
    monkeypatch.setattr(PLAN, "STORED_STEPS_MAX_BYTES", need)
    model(params, X0, solver="rk4", dt=0.25)
    assert taken == [1, 1]


@pytest.mark.parametrize("opts", [
    dict(checkpoints=3),  # fewer checkpoints than the 4 steps
    dict(checkpoints=4, ts=jnp.linspace(0.0, 1.0, 3)),  # saved times: dense output
    dict(checkpoints=4, max_steps=3),  # a budget the solve exceeds: diffrax names it
])
def test_stored_steps_fall_back_where_they_do_not_apply(opts, monkeypatch):
    model = nc.NCODE.build("open", nc.MLPField(2, 8), (2,), hidden=(8,))
    params = model.init(jax.random.key(0), jnp.float64)
    taken = []
    real = INTEGRATORS.stored_steps
    monkeypatch.setattr(INTEGRATORS, "stored_steps", lambda *a: taken.append(1) or real(*a))
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
    opts = dict(solver=solver, dt=0.25, adjoint="stored")
    fwd = jax.jit(lambda p: model(p, X0, **opts).stats["nfe"])
    both = jax.jit(jax.grad(lambda p: jnp.sum(model(p, X0, **opts).x ** 2)))
    n_fwd = evaluations(fwd, params)
    assert n_fwd == int(fwd(params))  # the NFE the stats report
    assert evaluations(both, params) == n_fwd
