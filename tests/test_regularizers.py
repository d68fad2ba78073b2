"""Flow regularisers as running costs (ncode_jax.regularizers) and the seminorm backsolve adjoint.

* kinetic energy: sol.cost equals a fine quadrature of weight·‖f‖² along the saved trajectory;
* Jacobian Frobenius norm: the Hutchinson estimate is unbiased (batch mean within 3 standard
  errors of ‖A‖²_F for a linear field), its probes are fixed within a solve and replayed by seed;
* gradients of both agree with finite differences under checkpoint and backsolve;
* every controller kind runs them under jit(grad); reverse-mode-only fields (ConvBlockField) work;
* the seminorm backsolve gradient agrees with checkpoint and with the expm gradient;
* bad input raises clear errors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from helpers import tree_rel_err
from jax.flatten_util import ravel_pytree

import ncode_jax as nc
from ncode_jax.regularizers import probe_key

B, T = 5, 1.0
FIXED = dict(solver="rk4", dt=0.1)
X0 = jnp.asarray(np.random.default_rng(0).standard_normal((B, 2)))
KEY = jax.random.key(7)


def user_cost(t, x, theta, cost_args):
    """A user running cost (module-level, so hashable): w·|x|²."""
    return cost_args["w"] * jnp.sum(x**2, -1)


COST = nc.kinetic_energy(0.3) + nc.jacobian_frobenius(0.2, num_probes=2)


def _closed_model(cost):
    model = nc.NCODE.build("closed", nc.MLPField(2, 6), (2,), feedback_hidden=(6,), running_cost=cost)
    params = model.init(jax.random.key(1), jnp.float64)
    last = params["feedback"]["mlp"][-1]
    params["feedback"]["mlp"][-1] = {"w": 5.0 * last["w"], "b": last["b"] + 0.1}  # θ(t) moves
    return model, params


MODEL, PARAMS = _closed_model(COST)
CARGS = nc.regularizer_args(COST, KEY)


def _loss(model, adjoint, solve_kw=FIXED):
    def f(params, cost_args):
        sol = model(params, X0, cost_args=cost_args, t1=T, adjoint=adjoint, **solve_kw)
        return jnp.mean(sol.x[:, 0]) + jnp.mean(sol.cost)

    return f


_VG = {a: jax.jit(jax.value_and_grad(_loss(MODEL, a))) for a in ("checkpoint", "backsolve")}  # lazy


@pytest.fixture(scope="module")
def grads():
    cache = {}

    def get(adjoint):
        if adjoint not in cache:
            # the backsolve adjoint of this float64 model meets a float32 leaf inside diffrax
            with jax.numpy_dtype_promotion("standard"):
                cache[adjoint] = _VG[adjoint](PARAMS, CARGS)
        return cache[adjoint]

    return get


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def test_kinetic_energy_and_user_cost_equal_quadrature_along_trajectory():
    """ANODE (shared θ, state padded by one zero dimension), kinetic energy + a user cost."""
    weight = 0.7
    cost = nc.kinetic_energy(weight) + user_cost  # composition with a user cost, via +
    model = nc.NCODE.build("anode", nc.MLPField(3, 6), (2,), augment=1, running_cost=cost)
    params = model.init(jax.random.key(1), jnp.float64)
    params["initial"]["theta"] = 2.0 * params["initial"]["theta"]
    ts = jnp.linspace(0.0, T, 401)
    sol = model(params, X0, cost_args={"w": 0.4}, t1=T, ts=ts, solver="tsit5", rtol=1e-10, atol=1e-10)
    assert sol.cost.shape == (len(ts), B)
    f = jax.vmap(lambda t, x: model.field(t, x, sol.theta))(ts, sol.x)  # (len(ts), B, 3)
    kinetic = weight * np.sum(np.asarray(f) ** 2, -1)
    user = 0.4 * np.sum(np.asarray(sol.x) ** 2, -1)
    simpson = scipy.integrate.simpson(kinetic + user, x=np.asarray(ts), axis=0)
    np.testing.assert_allclose(sol.cost[-1], simpson, rtol=1e-9)
    # the kinetic part is not negligible against the user part (the check would see a wrong f)
    assert np.all(scipy.integrate.simpson(kinetic, x=np.asarray(ts), axis=0) > 0.1 * simpson)


def test_hutchinson_unbiased_and_probes_fixed_within_a_solve(probe="rademacher"):
    """Linear field f = A x: ∂f/∂x = A, so per sample c(T) = T·‖A ε_b‖² with ε_b drawn once per
    solve; E‖A ε‖² = ‖A‖²_F."""
    n, d, t1 = 4000, 3, 2.0
    a = jnp.asarray(np.random.default_rng(1).standard_normal((d, d)))
    jf = nc.jacobian_frobenius(1.0, probe=probe)
    dyn = nc.Dynamics(nc.LinearField(d), running_cost=jf)
    x0 = jnp.asarray(np.random.default_rng(2).standard_normal((n, d)))
    cargs = nc.regularizer_args(jf, jax.random.key(3))
    sol = nc.solve(dyn, x0, a.ravel(), {"cost": cargs}, t1=t1, solver="rk4", dt=0.5)
    est = np.asarray(sol.cost) / t1
    exact = float(jnp.sum(a**2))
    se = est.std(ddof=1) / np.sqrt(n)
    assert abs(est.mean() - exact) <= 3 * se, (est.mean(), exact, se)
    assert se < 0.1 * exact  # the test has power
    # the same probes at every evaluation: c(T)/T is exactly ‖A ε_b‖² for the probes of the seed
    eps = jf.probes(probe_key(cargs["jacobian_key"]), (n, d), x0.dtype)[0]
    np.testing.assert_allclose(est, np.sum(np.asarray(eps @ a.T) ** 2, -1), rtol=1e-10)
    # replay: same key, same probes; another key, other probes
    again = nc.solve(dyn, x0, a.ravel(), {"cost": nc.regularizer_args(jf, jax.random.key(3))}, t1=t1,
                     solver="rk4", dt=0.5)
    np.testing.assert_array_equal(again.cost, sol.cost)
    other = nc.solve(dyn, x0, a.ravel(), {"cost": nc.regularizer_args(jf, jax.random.key(4))}, t1=t1,
                     solver="rk4", dt=0.5)
    assert not np.allclose(other.cost, sol.cost)


def test_num_probes_averages_and_vjp_mode_and_gaussian_probes_unbiased():
    """M probes average M single-probe estimates; εᵀJ (vjp) and Jε (jvp), Rademacher and
    Gaussian probes all have mean ‖A‖²_F."""
    n, d = 3000, 3
    a = jnp.asarray(np.random.default_rng(5).standard_normal((d, d)))
    field = nc.LinearField(d)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((n, d)))
    seed = nc.regularizer_args(nc.jacobian_frobenius(), jax.random.key(0))
    exact = float(jnp.sum(a**2))

    def run(cost):
        return np.asarray(cost(0.0, x, a.ravel(), seed, dx=field(0.0, x, a.ravel()),
                               field_fn=lambda x_: field(0.0, x_, a.ravel())))

    four = run(nc.jacobian_frobenius(1.0, num_probes=4))
    eps = nc.jacobian_frobenius(1.0, num_probes=4).probes(probe_key(seed["jacobian_key"]), (n, d), x.dtype)
    np.testing.assert_allclose(four, np.mean(np.sum(np.asarray(eps @ a.T) ** 2, -1), 0), rtol=1e-12)
    for est in (four, run(nc.jacobian_frobenius(1.0, mode="vjp")),
                run(nc.jacobian_frobenius(1.0, probe="gaussian"))):
        assert abs(est.mean() - exact) <= 3 * est.std(ddof=1) / np.sqrt(n)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def test_gradient_matches_finite_differences_checkpoint(grads):
    value, g = grads("checkpoint")
    flat, unravel = ravel_pytree(PARAMS)
    gflat = np.asarray(ravel_pytree(g)[0])
    assert np.linalg.norm(gflat) > 1e-3

    def loss(z):  # the fixture's compiled function (its gradient output is not used here)
        return _VG["checkpoint"](unravel(z), CARGS)[0]

    np.testing.assert_allclose(loss(flat), value, rtol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(3):
        d = rng.standard_normal(flat.shape)
        d /= np.linalg.norm(d)
        eps = 1e-6
        fd = float((loss(flat + eps * d) - loss(flat - eps * d)) / (2 * eps))
        exact = float(gflat @ d)
        assert abs(fd - exact) <= 1e-6 * max(abs(exact), 1e-2 * np.linalg.norm(gflat)), (fd, exact)


def test_gradient_backsolve_matches_checkpoint(grads):
    """Backsolve (continuous adjoint, rk4 dt=0.1) vs the exact discrete gradient: O(dt⁴) apart."""
    v_cp, g_cp = grads("checkpoint")
    v_bs, g_bs = grads("backsolve")
    np.testing.assert_allclose(v_bs, v_cp, rtol=1e-12)
    assert tree_rel_err(g_bs, g_cp) <= 1e-4


@pytest.mark.slow
def test_open_loop_under_jit_vmap_grad_adaptive_backsolve():
    """Per-sample θ(0) = γ(x(0)), dopri5, backsolve, vmapped over two batches with two keys.
    (Closed loop: the finite-difference tests; shared θ with padding (anode): the quadrature
    test.)"""
    solve_kw = dict(solver="dopri5", rtol=1e-5, atol=1e-5, adjoint="backsolve")
    model = nc.NCODE.build("open", nc.MLPField(2, 4), (2,), hidden=(4,), running_cost=COST)
    params = model.init(jax.random.key(2), jnp.float64)

    def loss(p, cargs, x):
        sol = model(p, x, cost_args=cargs, t1=T, **solve_kw)
        return jnp.mean(sol.cost)

    xs = jnp.stack([X0, 0.5 * X0])
    keys = jax.random.split(KEY, 2)
    cargs = jax.vmap(lambda k: nc.regularizer_args(COST, k))(keys)
    vals, g = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0, 0)))(params, cargs, xs)
    assert vals.shape == (2,) and np.all(np.asarray(vals) > 0)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


def test_reverse_mode_only_conv_field_uses_vjp():
    """ConvBlockField's fast path has a custom VJP (no jax.jvp): mode='auto' falls back to εᵀJ;
    it equals mode='vjp' on the plain-autodiff reference implementation, with the same probes."""
    fast = nc.ConvBlockField(channels=2, height=4, width=4, hidden=3)
    ref = dataclasses.replace(fast, impl="reference")
    theta = jax.vmap(lambda k: fast.layout.init(k, jnp.float64))(jax.random.split(jax.random.key(0), 3))
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2), jnp.float64)
    seed = nc.regularizer_args(nc.jacobian_frobenius(), KEY)

    def value(field, mode, th):
        jf = nc.jacobian_frobenius(1.0, num_probes=2, mode=mode)
        return jf(0.0, x, th, seed, dx=field(0.0, x, th), field_fn=lambda x_: field(0.0, x_, th))

    def both(field, mode):
        return jax.jit(jax.value_and_grad(lambda th: jnp.sum(value(field, mode, th))))(theta)

    (v_fast, g_fast), (v_ref, g_ref) = both(fast, "auto"), both(ref, "vjp")
    np.testing.assert_allclose(v_fast, v_ref, rtol=1e-10)
    assert tree_rel_err(g_fast, g_ref) <= 1e-10
    with pytest.raises(TypeError, match="reverse-mode only.*mode='vjp'"):
        jax.eval_shape(lambda th: value(fast, "jvp", th), theta)


# ---------------------------------------------------------------------------------------------
# Seminorm backsolve
# ---------------------------------------------------------------------------------------------


def test_seminorm_backsolve_gradient_matches_checkpoint_and_expm():
    """dx/dt = A_b x per sample (A_b in args, so its adjoint is a parameter channel the seminorm
    leaves out of step-size control); L = Σ_b c_b·x_b(T) with x(T) = expm(T A_b) x0_b."""
    d, n, t1 = 3, 4, 1.5
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((n, d, d)) * 0.7)
    x0 = jnp.asarray(rng.standard_normal((n, d)))
    c = jnp.asarray(rng.standard_normal((n, d)))
    dyn = nc.Dynamics(nc.LinearField(d))

    def exact(a_):
        xt = jax.vmap(lambda ab, xb: jax.scipy.linalg.expm(t1 * ab) @ xb)(a_, x0)
        return jnp.sum(c * xt)

    ref = np.asarray(jax.grad(exact)(a)).reshape(n, -1)
    tol = dict(solver="dopri5", rtol=1e-9, atol=1e-9, t1=t1)

    def grad(adjoint, seminorm=False):
        f = lambda th: jnp.sum(c * nc.solve(dyn, x0, th, {}, adjoint=adjoint, seminorm=seminorm, **tol).x)  # noqa: E731
        return np.asarray(jax.jit(jax.grad(f))(a.reshape(n, -1)))

    g_semi, g_cp = grad("backsolve", True), grad("checkpoint")
    rel = lambda u, v: np.linalg.norm(u - v) / np.linalg.norm(v)  # noqa: E731
    assert rel(g_cp, ref) <= 1e-7
    assert rel(g_semi, ref) <= 1e-7
    assert rel(g_semi, g_cp) <= 1e-7


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrozenField(nc.MLPField):
    """A field that is not differentiable in x (stop_gradient on the state)."""

    def apply(self, t, x, w):
        return super().apply(t, jax.lax.stop_gradient(x), w)


@pytest.mark.parametrize("make", [nc.kinetic_energy, nc.jacobian_frobenius])
def test_bad_weights(make):
    for w in (-1.0, -1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
            make(w)
    for w in (True, "0.1", jnp.asarray(0.1), None):
        with pytest.raises(TypeError, match="weight must be a Python or NumPy real number"):
            make(w)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        nc.regularization(kinetic=-0.1 if make is nc.kinetic_energy else 0.0,
                          jacobian=-0.1 if make is nc.jacobian_frobenius else 0.0)


def test_bad_probe_options():
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        nc.jacobian_frobenius(num_probes=0)
    with pytest.raises(TypeError, match="num_probes must be an integer"):
        nc.jacobian_frobenius(num_probes=1.5)
    with pytest.raises(ValueError, match="unknown probe"):
        nc.jacobian_frobenius(probe="normal")
    with pytest.raises(ValueError, match="unknown mode"):
        nc.jacobian_frobenius(mode="fwd")


def test_non_differentiable_field_and_state_are_refused():
    field = FrozenField(2, 4)
    theta = field.layout.init(jax.random.key(0), jnp.float64)
    dyn = nc.Dynamics(field, running_cost=nc.jacobian_frobenius())
    cargs = nc.regularizer_args(dyn.running_cost, KEY)
    with pytest.raises(ValueError, match="not differentiable in x"):
        nc.solve(dyn, X0, theta, {"cost": cargs}, **FIXED)
    for mode in ("jvp", "vjp"):
        jf = nc.jacobian_frobenius(mode=mode)
        with pytest.raises(ValueError, match="not differentiable in x"):
            jf(0.0, X0, theta, cargs, dx=field(0.0, X0, theta), field_fn=lambda x: field(0.0, x, theta))
    xi = jnp.ones((3, 2), jnp.int32)
    for cost in (nc.jacobian_frobenius(), nc.kinetic_energy()):
        with pytest.raises(TypeError, match="floating-point state"):
            cost(0.0, xi, theta, cargs, dx=xi, field_fn=lambda x: x)


def test_missing_key_and_composition_errors():
    jf = nc.jacobian_frobenius()
    dyn = nc.Dynamics(nc.LinearField(2), running_cost=jf)
    theta = jnp.eye(2).ravel()
    with pytest.raises(ValueError, match="cost_args must be a dict holding a probe seed"):
        nc.solve(dyn, X0, theta, {"cost": None}, **FIXED)
    with pytest.raises(ValueError, match="pass a PRNG key"):
        nc.regularizer_args(jf, None)
    with pytest.raises(TypeError, match="cost_args must be a dict"):
        nc.regularizer_args(jf, KEY, jnp.ones(2))
    with pytest.raises(ValueError, match="already has the key name"):
        nc.regularizer_args(jf, KEY, {"jacobian_key": 1.0})
    with pytest.raises(TypeError, match="must be hashable"):
        nc.combine(jf, _Unhashable())
    with pytest.raises(TypeError, match="must be callable"):
        nc.combine(jf, 3)


class _Unhashable:
    __hash__ = None

    def __call__(self, t, x, theta, cost_args):
        return 0.0


def test_config_mapping_and_key_pass_through():
    assert nc.regularization() is None
    assert nc.regularization(kinetic=0.1) == nc.kinetic_energy(0.1)
    both = nc.regularization(kinetic=0.1, jacobian=0.2, running_cost=user_cost)
    assert both == nc.combine(user_cost, nc.kinetic_energy(0.1), nc.jacobian_frobenius(0.2))
    assert hash(both) == hash(nc.combine(user_cost, nc.kinetic_energy(0.1), nc.jacobian_frobenius(0.2)))
    assert both.key_names() == ("jacobian_key",)
    assert nc.regularizer_args(nc.kinetic_energy(), None, {"w": 1.0}) == {"w": 1.0}
    args = nc.regularizer_args(both, KEY, {"w": 1.0})
    assert set(args) == {"w", "jacobian_key"} and args["jacobian_key"].dtype == jnp.float32
    assert sum([nc.kinetic_energy(0.1), nc.jacobian_frobenius(0.2)]) == nc.combine(
        nc.kinetic_energy(0.1), nc.jacobian_frobenius(0.2))
