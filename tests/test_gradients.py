"""Gradients of N-CODE losses: adjoint vs adjoint (fixed rk4 steps: backsolve's O(dt^4) gap is
below 1e-6 here, direct vs checkpoint agree to round-off; test_adjoint_order.py checks the rate),
checkpoint vs central finite differences, and the (documented) inexactness of BacksolveAdjoint
with adaptive steps (docs/design.md, "What each adjoint computes").

Each gradient program costs seconds to compile on 2 CPU cores, so every (model, adjoint, steps)
gradient is computed once per module by the ``grads`` fixture and shared between tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_rel_err
from jax.flatten_util import ravel_pytree

from ncode_jax import NCODE, MLPField

B, T = 8, 1.0
FIXED = dict(solver="rk4", dt=0.05)  # 20 classical RK4 steps
ADAPTIVE = dict(solver="tsit5")  # default rtol=1e-3, atol=1e-6

X0 = jnp.asarray(np.random.default_rng(0).standard_normal((B, 2)))


def make_model(kind):
    model = NCODE.build(kind, MLPField(2, 8), (2,), hidden=(8,), feedback_hidden=(8,))
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    if "feedback" in params:
        # the controller starts at 0.1× LeCun scale; make the feedback matter for the test
        last = params["feedback"]["mlp"][-1]
        params["feedback"]["mlp"][-1] = {"w": 5.0 * last["w"], "b": last["b"] + 0.1}
    return model, params


MODELS = {kind: make_model(kind) for kind in ("open", "closed", "open_closed")}


def loss_fn(kind, adjoint, steps):
    model, _ = MODELS[kind]

    def loss(params):
        sol = model(params, X0, t1=T, adjoint=adjoint, **steps)
        return jnp.mean(sol.x**2)

    return loss


@pytest.fixture(scope="module")
def grads():
    cache = {}

    def get(kind, adjoint, steps=FIXED):
        key = (kind, adjoint, tuple(sorted(steps.items())))
        if key not in cache:
            _, params = MODELS[kind]
            cache[key] = jax.jit(jax.value_and_grad(loss_fn(kind, adjoint, steps)))(params)
        return cache[key]

    return get


_LOSS_CACHE = {}  # jitted forward losses for finite differences, compiled once


def _jitted_loss(kind):
    if kind not in _LOSS_CACHE:
        _LOSS_CACHE[kind] = jax.jit(loss_fn(kind, "checkpoint", FIXED))
    return _LOSS_CACHE[kind]


def _nonzero_everywhere(g):
    """Every parameter group receives a real gradient (so agreement is not 0 == 0)."""
    for group, sub in g.items():
        assert float(ravel_pytree(sub)[0] @ ravel_pytree(sub)[0]) > 1e-12, group
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        if leaf.ndim == 2:  # weight matrices; biases of unused paths may legitimately be ~0
            assert float(jnp.linalg.norm(leaf)) > 1e-6, jax.tree_util.keystr(path)


@pytest.mark.slow  # open and closed are compared in the default run (test_checkpoint_and_backsolve_agree)
def test_open_closed_three_adjoints_agree(grads):
    v_cp, g_cp = grads("open_closed", "checkpoint")
    v_bs, g_bs = grads("open_closed", "backsolve")
    v_di, g_di = grads("open_closed", "direct")
    assert set(g_cp) == {"initial", "feedback"}  # hypernetwork γ and controller g
    _nonzero_everywhere(g_cp)
    np.testing.assert_allclose([v_bs, v_di], v_cp, rtol=1e-12)
    assert tree_rel_err(g_di, g_cp) <= 1e-9  # same discrete computation, differentiated twice
    assert tree_rel_err(g_bs, g_cp) <= 1e-6  # continuous adjoint re-solved on the same grid


@pytest.mark.parametrize("kind", ["open", "closed"])
def test_checkpoint_and_backsolve_agree(grads, kind):
    # "open": θ is constant and rides in diffrax's args (adjoint w.r.t. args);
    # "closed": θ(0) is one shared learned vector broadcast to the batch and integrated.
    _, g_cp = grads(kind, "checkpoint")
    _, g_bs = grads(kind, "backsolve")
    _nonzero_everywhere(g_cp)
    assert tree_rel_err(g_bs, g_cp) <= 1e-6


def _fd_check(loss, params, grad, subtree=None, n_dirs=2, eps=1e-6, rtol=1e-6, seed=0):
    """Central differences along random directions (restricted to ``params[subtree]``).

    float64, eps=1e-6: truncation ~eps² and round-off ~1e-16/eps; measured errors ~1e-9."""
    flat, unravel = ravel_pytree(params)
    gflat, _ = ravel_pytree(grad)
    mask = np.ones(flat.shape)
    if subtree is not None:
        on = {k: jax.tree.map(lambda a, on=(k == subtree): jnp.full_like(a, float(on)), v)
              for k, v in params.items()}
        mask = np.asarray(ravel_pytree(on)[0])
    rng = np.random.default_rng(seed)
    for _ in range(n_dirs):
        d = rng.standard_normal(flat.shape) * mask
        d /= np.linalg.norm(d)
        fd = (loss(unravel(flat + eps * d)) - loss(unravel(flat - eps * d))) / (2 * eps)
        exact = float(gflat @ d)
        scale = max(abs(exact), 1e-2 * float(np.linalg.norm(gflat * mask)))
        assert abs(float(fd) - exact) <= rtol * scale, (subtree, float(fd), exact)


@pytest.mark.parametrize("subtree", [None, "initial", "feedback"])
def test_checkpoint_matches_finite_differences(grads, subtree):
    _, params = MODELS["open_closed"]
    _, g = grads("open_closed", "checkpoint")
    loss = _jitted_loss("open_closed")
    _fd_check(loss, params, g, subtree, seed={None: 0, "initial": 1, "feedback": 2}[subtree])


def test_fd_check_detects_a_wrong_gradient(grads):
    """The finite-difference check above is able to fail."""
    _, params = MODELS["open_closed"]
    _, g = grads("open_closed", "checkpoint")
    wrong = jax.tree.map(lambda a: a * 1.001, g)
    with pytest.raises(AssertionError):
        _fd_check(_jitted_loss("open_closed"), params, wrong)


@pytest.mark.slow  # test_adjoint_order.py checks backsolve's inexactness in the default run
def test_backsolve_is_approximate_with_adaptive_steps(grads):
    """With adaptive steps BacksolveAdjoint re-solves backwards on its own
    grid, so its gradient differs from the checkpointed (exact-for-the-discrete-solve) one.
    Measured here (tsit5, rtol=1e-3, atol=1e-6): 8.6e-4 relative for "open" (5e-4 for
    "open_closed"); 3% on the closed-loop reflection toy of docs/design.md. The open model compiles
    fastest."""
    v_cp, g_cp = grads("open", "checkpoint", ADAPTIVE)
    v_bs, g_bs = grads("open", "backsolve", ADAPTIVE)
    np.testing.assert_allclose(v_bs, v_cp, rtol=1e-12)  # same forward solve
    gap = tree_rel_err(g_bs, g_cp)
    assert 1e-10 < gap < 0.1, gap
