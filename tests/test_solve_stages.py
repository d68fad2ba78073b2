"""The solve's stages as users meet them: the stored-steps integrator asked for by name, the
running cost's arguments and the feedback parameters under one name at every level, the failure
causes as one enumeration, one rule table for eager and traced values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ncode_jax as nc
from ncode_jax.solving.diagnose import RESULT_CODES, Failure
from ncode_jax.solving.options import CONFIG_RULES, SOLVE_RULES

LIN = nc.LinearField(1)
ONES = jnp.ones((2, 1))


def test_stored_adjoint_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match=r"adjoint='stored' stores every fixed step: it needs a fixed step"):
        nc.SolveConfig(adjoint="stored")
    with pytest.raises(ValueError, match=r"checkpoints=4 applies to adjoint='checkpoint' only, not 'stored'"):
        nc.SolveConfig(solver="rk4", dt=0.25, adjoint="stored", checkpoints=4)
    run = dict(solver="rk4", dt=0.25, adjoint="stored")
    with pytest.raises(ValueError, match=r"adjoint='stored' cannot run this solve: it saves x\(t1\) only"):
        nc.solve(nc.Dynamics(LIN), ONES, jnp.array([-1.0]), ts=jnp.array([0.5, 1.0]), **run)
    with pytest.raises(ValueError, match=r"all 4 fixed steps, more than max_steps=3"):
        nc.solve(nc.Dynamics(LIN), ONES, jnp.array([-1.0]), max_steps=3, **run)
    with pytest.raises(ValueError, match=r"needs t0 and t1 known at trace time"):
        jax.jit(lambda t1: nc.solve(nc.Dynamics(LIN), ONES, jnp.array([-1.0]), t1=t1, **run).x)(1.0)


def test_stored_adjoint_gives_forward_mode():
    """A plain lax.scan: JAX's forward mode works (checkpoint and backsolve refuse it)."""
    f = lambda th: jnp.sum(nc.solve(nc.Dynamics(LIN), ONES[:1], th, solver="rk4", dt=0.1,  # noqa: E731
                                    adjoint="stored").x)
    _, tangent = jax.jvp(f, (jnp.array([0.3]),), (jnp.ones(1),))
    np.testing.assert_allclose(tangent, np.exp(0.3), rtol=1e-6)  # rk4 of dx/dt = θx: x(1) ≈ e^θ


def test_one_name_for_the_running_cost_arguments_and_the_old_params_dict():
    cost = lambda t, x, theta, cost_args: cost_args["w"] * jnp.sum(x**2, -1)  # noqa: E731
    dyn = nc.Dynamics(LIN, running_cost=cost)
    opts = dict(solver="rk4", dt=0.25)
    new = nc.solve(dyn, ONES, jnp.array([-1.0]), cost_args={"w": 2.0}, **opts)
    old = nc.solve(dyn, ONES, jnp.array([-1.0]), {"cost": {"w": 2.0}}, **opts)
    np.testing.assert_array_equal(new.cost, old.cost)
    assert float(new.cost[0]) > 0
    with pytest.raises(TypeError, match="not both"):
        nc.solve(dyn, ONES, jnp.array([-1.0]), {"cost": {"w": 2.0}}, cost_args={"w": 2.0}, **opts)
    with pytest.raises(ValueError, match=r"keys 'feedback' and 'cost' only, got \['costs'\]"):
        nc.solve(dyn, ONES, jnp.array([-1.0]), {"costs": {"w": 2.0}}, **opts)
    with pytest.raises(TypeError, match="either as config=SolveConfig"):
        nc.solve(dyn, ONES, jnp.array([-1.0]), cost_args={"w": 2.0}, config=nc.SolveConfig(), **opts)


def test_failure_causes_carry_code_and_message():
    assert [f.code for f in Failure] == [2, 2, 1, 2, 2, 1]  # the last: backsolve's backward solve
    assert {f.code for f in Failure} | {0} == set(RESULT_CODES.values())
    text = Failure.MAX_STEPS_REACHED.message(solver="tsit5", max_steps=7, budget="loosen rtol/atol")
    assert text.startswith("ncode_jax.solve: the tsit5 solver used all max_steps=7 steps")


def test_every_rule_has_one_wording_eager_and_traced():
    """A rule's message is one text; the traced one lacks only the values (it starts the same)."""
    values = {**nc.SolveConfig().kwargs(), "ts": None, "tdtype": np.dtype(np.float32), "span": 1.0}
    for rule in CONFIG_RULES + SOLVE_RULES:
        if rule.reads and rule.traced and rule.applies(values):
            known, traced = rule.message(values, True), rule.message(values, False)
            assert known.split()[:3] == traced.split()[:3] and len(known) >= len(traced), (known, traced)


def test_failed_backward_solve_names_its_cause_and_finished_ones_pass():
    """backsolve's backward solve out of ``max_steps`` (a NaN cotangent keeps its steps rejected)
    raises the solve's own message, on one device too; one that finishes within the budget — even
    when it takes all of it, as the fixed-step solve here does — does not."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import ncode_jax as nc

    field = nc.LinearField(2)
    dyn = nc.Dynamics(field)
    x = jnp.ones((2, 2), jnp.float32)
    theta = jnp.full((2, field.num_params), 0.1, jnp.float32)

    def loss(theta, weight, **options):
        return jnp.sum(nc.solve(dyn, x, theta, adjoint="backsolve", **options).x * weight)

    adaptive = dict(solver="tsit5", dt=None, max_steps=64)
    # raised inside the backward solve's loop: JAX reports it as the callback's runtime error
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError),
                       match=r"backward solve of adjoint='backsolve' used all max_steps=64 steps before "
                             r"reaching t0"):
        jax.block_until_ready(jax.jit(jax.grad(lambda th: loss(th, jnp.nan, **adaptive)))(theta))
    assert jnp.all(jnp.isfinite(jax.grad(lambda th: loss(th, 1.0, **adaptive))(theta)))
    exact = dict(solver="rk4", dt=0.25, max_steps=4)  # 4 steps forward, 4 backward: the whole budget
    assert jnp.all(jnp.isfinite(jax.grad(lambda th: loss(th, 1.0, **exact))(theta)))
    quiet = jax.grad(lambda th: loss(th, jnp.nan, throw=False, **adaptive))(theta)  # throw=False: no check
    assert quiet.shape == theta.shape
