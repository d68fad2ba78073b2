"""How far the continuous adjoint (``backsolve``) is from the exact gradient of the discrete solve.

``checkpoint`` differentiates the discrete solve itself; ``backsolve`` re-solves the state
backwards and integrates the adjoint ODE with the same method, so their gap is O(dt^p) for a
method of order p (docs/design.md, "What each adjoint computes"). The model is that page's
closed-loop reflection,
``MLPField(1, 16)``, g with 32 hidden units, loss ``mean((x(1) + x0)²)``, float64 (32 points
instead of 128, to keep the test fast).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_rel_err

from ncode_jax import NCODE, MLPField

MODEL = NCODE.build("closed", MLPField(1, 16), (1,), hidden=(32,), feedback_hidden=(32,))
PARAMS = MODEL.init(jax.random.key(0), jnp.float64)
X0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (32, 1)))


def _grad(solver, dt, adjoint):
    def loss(p):
        return jnp.mean((MODEL(p, X0, t1=1.0, solver=solver, dt=dt, adjoint=adjoint).x + X0) ** 2)

    return jax.jit(jax.grad(loss))(PARAMS)


def _gap(solver, dt):
    return tree_rel_err(_grad(solver, dt, "backsolve"), _grad(solver, dt, "checkpoint"))


@pytest.mark.filterwarnings("ignore:adjoint='backsolve' with fixed-step")
@pytest.mark.parametrize("solver,order,dt", [
    # both slow (~35 s for rk4 on 2 cores): test_gradients keeps backsolve vs checkpoint in the default run
    pytest.param("heun", 2, 0.1, marks=pytest.mark.slow),
    pytest.param("rk4", 4, 0.2, marks=pytest.mark.slow)])
def test_backsolve_gap_falls_at_the_solver_order(solver, order, dt):
    coarse, fine = _gap(solver, dt), _gap(solver, dt / 2)
    observed = np.log2(coarse / fine)
    assert coarse > 1e-9, coarse  # a real gap, not float noise (the README once said "float precision")
    assert order - 0.6 < observed < order + 1.0, (coarse, fine, observed)


def test_checkpoint_gradient_matches_finite_differences():
    """The exact gradient of the discrete solve (euler, dt=0.1), in one random direction."""
    def loss(p):
        return jnp.mean((MODEL(p, X0, t1=1.0, solver="euler", dt=0.1, adjoint="checkpoint").x + X0) ** 2)

    g = jax.grad(loss)(PARAMS)
    flat, unravel = jax.flatten_util.ravel_pytree(PARAMS)
    v = jnp.asarray(np.random.default_rng(1).standard_normal(flat.shape))
    eps = 1e-6
    fd = (loss(unravel(flat + eps * v)) - loss(unravel(flat - eps * v))) / (2 * eps)
    np.testing.assert_allclose(jnp.dot(jax.flatten_util.ravel_pytree(g)[0], v), fd, rtol=1e-7)


def test_backsolve_with_fixed_euler_is_refused():
    with pytest.raises(ValueError, match=r"backsolve.*'euler'.*O\(dt\).*adjoint='checkpoint'"):
        MODEL(PARAMS, X0, solver="euler", dt=0.1, adjoint="backsolve")


def test_backsolve_with_fixed_low_order_warns():
    with pytest.warns(UserWarning, match=r"backsolve.*'heun' \(order 2\)"):
        MODEL(PARAMS, X0, solver="heun", dt=0.25, adjoint="backsolve")
