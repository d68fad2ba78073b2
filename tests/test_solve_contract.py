"""`solve` and `NCODE`: a correct answer or a clear refusal, for every case users hit.

One test (or group) per fault users hit: dtypes under x64, errors that name their cause,
checks that survive every composition of jit/grad/vmap, bad inputs refused eagerly and under
jit alike, derivatives an adjoint cannot give, degenerate sizes, stable activations.
(Adjoint accuracy against the solver's order: test_adjoint_order.py; reverse time:
test_reverse_time.py.)
"""

import inspect
import re
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ncode_jax as nc
from ncode_jax import NCODE, Dynamics, LinearField, MLPField, solve

LIN = LinearField(1)
ONES = jnp.ones((2, 1))


def _raises(match, fn, *args, exc=Exception):
    """``fn(*args)`` (results blocked on) must raise ``exc`` whose text matches ``match``."""
    with pytest.raises(exc) as info:
        jax.block_until_ready(fn(*args))
    assert re.search(match, str(info.value)), str(info.value)[:2000]


@dataclass(frozen=True)
class SqrtField(nc.VectorField):
    """``dx/dt = -k sqrt(x)`` (``abs_=True``: ``k sqrt(|x|)``), one state entry, θ = (k,)."""

    abs_: bool = False
    state_shape = (1,)
    layout = nc.ParamLayout((nc.ParamSpec("k", (1,)),))

    def apply(self, t, x, w):
        k = jnp.broadcast_to(w["k"], x.shape)  # θ shared (1,) or per sample (B, 1)
        return k * jnp.sqrt(jnp.abs(x)) if self.abs_ else -k * jnp.sqrt(x)


@dataclass(frozen=True)
class SquareField(nc.VectorField):
    """``dx/dt = k x²``: blows up at ``t = 1/(k x0)``."""

    state_shape = (1,)
    layout = nc.ParamLayout((nc.ParamSpec("k", (1,)),))

    def apply(self, t, x, w):
        return jnp.broadcast_to(w["k"], x.shape) * x**2


# --- 2. dtypes under jax_enable_x64 ------------------------------------------------------------


@pytest.mark.parametrize("adjoint,x64", [
    ("checkpoint", True),
    pytest.param("backsolve", True, marks=pytest.mark.slow),
    pytest.param("direct", True, marks=pytest.mark.slow),
    ("backsolve", False),
])
def test_float32_model_stays_float32(adjoint, x64):
    """Outputs and the adjoint's own cotangents (before JAX casts them to the parameters' dtype)
    keep float32, under every adjoint, with x64 on and off (Python-float t0/t1 once made the
    state and backsolve's gradients float64)."""
    with jax.enable_x64(x64):
        model = NCODE.build("open_closed", MLPField(3, 4), (3,), hidden=(4,), feedback_hidden=(4,),
                            running_cost=lambda t, x, th, c: jnp.sum(x**2, -1))
        params = model.init(jax.random.key(0), jnp.float32)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)

        @jax.jit
        def run(p):
            sol, vjp = jax.vjp(lambda p_: model(p_, x, adjoint=adjoint, solver="tsit5"), p)
            return sol, vjp(jax.tree.map(jnp.ones_like, sol))[0]

        sol, ct = run(params)
        for name, a in (("x", sol.x), ("theta", sol.theta), ("cost", sol.cost), ("ts", sol.ts)):
            assert a.dtype == jnp.float32, (name, a.dtype)
        assert {str(g.dtype) for g in jax.tree.leaves(ct) if g.dtype != jax.dtypes.float0} == {"float32"}


def test_mixed_dtypes_refused():
    theta = jnp.zeros((1,), jnp.float32)
    _raises(r"x0 is float64 but theta0 is float32", solve, Dynamics(LIN), jnp.ones((2, 1)), theta,
            exc=TypeError)


# --- 3. errors that name their cause -----------------------------------------------------------


@pytest.mark.parametrize("max_steps", [4096, 100_000])
def test_nan_from_the_dynamics_is_named(max_steps):
    """dx/dt = -2 sqrt(x), x0 = 1/4: x reaches 0 at t = 1/2, and steps past it give sqrt(<0)."""
    _raises(r"dynamics produced NaN or inf from finite inputs.*more steps will not help", lambda: solve(
        Dynamics(SqrtField()), jnp.full((1, 1), 0.25), jnp.array([2.0]), max_steps=max_steps).x)


def test_nan_from_the_dynamics_fixed_steps():
    _raises(r"dynamics produced NaN or inf", lambda: solve(
        Dynamics(SqrtField()), jnp.full((1, 1), 0.25), jnp.array([2.0]), solver="rk4", dt=0.1).x)


def test_collapsed_step_size_is_named():
    """dx/dt = x², x0 = 1 blows up at t = 1: the steps shrink to nothing, nothing is NaN yet."""
    _raises(r"step size collapsed.*more max_steps will not help", lambda: solve(
        Dynamics(SquareField()), jnp.ones((1, 1)), jnp.array([1.0]), t1=2.0).x)


def test_exhausted_budget_is_named():
    _raises(r"used all max_steps=2 steps .*still making progress.*max_steps=N", lambda: solve(
        Dynamics(LIN), ONES, jnp.array([-1.0]), rtol=1e-12, atol=1e-12, max_steps=2).x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(t1=float("inf")), r"t1 must be a finite number"),
    (dict(t0=float("nan")), r"t0 must be a finite number"),
    (dict(rtol=float("nan")), r"rtol must be a finite number >= 0"),
    (dict(atol=float("inf")), r"atol must be a finite number >= 0"),
    (dict(ts=jnp.array([0.0, jnp.nan, 1.0])), r"ts contains NaN or inf"),
])
def test_non_finite_inputs_are_named(kwargs, match):
    _raises(match, lambda: solve(Dynamics(LIN), ONES, jnp.array([-1.0]), **kwargs).x, exc=ValueError)


def test_non_finite_weights_point_at_training():
    model = NCODE.build("open", MLPField(1, 4), (1,), hidden=(4,))
    params = model.init(jax.random.key(0))
    params["initial"]["theta"] = params["initial"]["theta"].at[0].set(jnp.inf)  # e.g. after lr=inf
    with jax.numpy_dtype_promotion("standard"):  # float32 parameters, a float64 input
        _raises(r"theta0 contains NaN or inf .*learning rate", lambda: model(params, ONES).x)


# --- 4. checks survive every composition; NaN gradients can be made errors --------------------


def _diverging_loss(theta, x0):
    return jnp.sum(solve(Dynamics(LIN), x0, theta, t1=2.0, solver="euler", dt=0.5).x)


@pytest.mark.parametrize("wrap", [  # the compositions that lost the check on the old code stay default
    pytest.param("grad", marks=pytest.mark.slow), "jit_grad", "jit_value_and_grad",
    pytest.param("vmap_grad", marks=pytest.mark.slow), "jit_vmap_grad",
    pytest.param("eager", marks=pytest.mark.slow)])
def test_checks_survive_transformations(wrap):
    g = jax.grad(_diverging_loss)
    fn, x0 = {
        "eager": (_diverging_loss, ONES),
        "grad": (g, ONES),
        "jit_grad": (jax.jit(g), ONES),
        "jit_value_and_grad": (jax.jit(jax.value_and_grad(_diverging_loss)), ONES),
        "vmap_grad": (jax.vmap(g, in_axes=(None, 0)), jnp.ones((3, 2, 1))),
        "jit_vmap_grad": (jax.jit(jax.vmap(g, in_axes=(None, 0))), jnp.ones((3, 2, 1))),
    }[wrap]
    _raises(r"NaN or inf", fn, jnp.array([1e200]), x0)  # euler overflows to inf in 2 steps


def test_check_grads_reports_a_nan_gradient_of_a_finite_solve():
    """dx/dt = k sqrt(|x|) from x0 = 0, k = 0: x stays 0, but d/dx sqrt(|x|) is inf at 0."""
    def loss(x0, check):
        return jnp.sum(solve(Dynamics(SqrtField(abs_=True)), x0, jnp.array([0.0]), solver="rk4",
                             dt=0.1, check_grads=check).x)

    x0 = jnp.zeros((1, 1))
    assert np.isfinite(loss(x0, False))
    assert not np.all(np.isfinite(jax.grad(loss)(x0, False)))  # silent without the option
    _raises(r"gradient with respect to x0 contains NaN or inf \(checkpoint adjoint\)",
            jax.jit(jax.grad(loss), static_argnums=1), x0, True)


# --- 5. inputs accepted that should not be: same answer eagerly and under jit ------------------


@pytest.mark.parametrize("name,value,match", [
    ("rtol", -1.0, r"rtol must be a finite number >= 0"),
    ("rtol", float("nan"), r"rtol must be a finite number >= 0"),
    ("atol", -1e-6, r"atol must be a finite number >= 0"),
])
def test_bad_tolerances_eager_and_jit(name, value, match):
    def run(v):
        return solve(Dynamics(LIN), ONES, jnp.array([-1.0]), **{name: v}).x

    _raises(match, run, value, exc=ValueError)  # eager: at trace time
    _raises(match, jax.jit(run), value)  # traced: at run time, same words


@pytest.mark.parametrize("kwargs,match,exc", [
    (dict(solver="rk4", dt=float("inf")), r"dt must be a positive finite number", ValueError),
    (dict(solver="rk4", dt=float("nan")), r"dt must be a positive finite number", ValueError),
    (dict(solver="rk4", dt=0.0), r"dt must be a positive finite number", ValueError),
    (dict(ts=jnp.zeros((2, 2))), r"ts must be a 1-D array", ValueError),
    (dict(ts=jnp.array([0.5, 0.2])), r"ts must run in the direction of integration", ValueError),
    (dict(ts=jnp.array([0.5, 2.0])), r"ts must lie in \[t0, t1\]", ValueError),
    (dict(max_steps=0), r"max_steps must be >= 1", ValueError),
    (dict(max_steps=2.5), r"max_steps must be an integer", TypeError),
    (dict(checkpoints=4, adjoint="backsolve"), r"checkpoints=4 applies to adjoint='checkpoint' only",
     ValueError),
    (dict(seminorm=True), r"seminorm=True .* needs adjoint='backsolve'", ValueError),
    (dict(adjoint="adjoint"), r"unknown adjoint 'adjoint'", ValueError),
])
def test_bad_options_refused(kwargs, match, exc):
    _raises(match, lambda: solve(Dynamics(LIN), ONES, jnp.array([-1.0]), **kwargs).x, exc=exc)


def test_traced_ts_checked_at_run_time():
    run = jax.jit(lambda ts: solve(Dynamics(LIN), ONES, jnp.array([-1.0]), ts=ts).x)
    assert run(jnp.array([0.2, 0.5])).shape == (2, 2, 1)
    _raises(r"ts must run in the direction of integration", run, jnp.array([0.5, 0.2]))
    _raises(r"ts contains NaN or inf", run, jnp.array([0.5, jnp.nan]))


def test_closed_loop_without_feedback_params():
    model = NCODE.build("closed", MLPField(1, 4), (1,), feedback_hidden=(4,))
    params = model.init(jax.random.key(0))
    _raises(r"closed-loop NCODE needs params with keys \['initial', 'feedback'\].*missing \['feedback'\]",
            lambda: model({"initial": params["initial"]}, ONES).x, exc=ValueError)
    fb = nc.Feedback(LIN.layout, 1, (4,))
    _raises(r"closed-loop dynamics need params\['feedback'\]",
            lambda: solve(Dynamics(LIN, fb), ONES, jnp.array([-1.0]), {"feedback": None}).x, exc=ValueError)


def test_solve_config_validates_and_round_trips():
    cfg = nc.SolveConfig(solver="rk4", dt=0.25, adjoint="checkpoint", checkpoints=4)
    sol = solve(Dynamics(LIN), ONES, jnp.array([-1.0]), **cfg.kwargs())
    assert int(sol.stats["num_steps"]) == 4
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        nc.SolveConfig(rtol=-1.0)
    with pytest.raises(ValueError, match="has no error estimate"):
        nc.SolveConfig(solver="rk4")
    with pytest.raises(ValueError, match="unknown solver"):
        cfg.replace(solver="rk5")


# --- 7. derivatives an adjoint cannot provide ---------------------------------------------------


def _x1(theta, adjoint):
    return solve(Dynamics(LIN), jnp.ones((1, 1)), theta, adjoint=adjoint, solver="rk4", dt=0.1).x


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
@pytest.mark.parametrize("how", ["jvp", "jacfwd", "hessian", "grad_of_grad", "jit_jvp", "linearize",
                                 "jit_linearize", "jit_hessian", "jit_grad_of_grad"])
def test_derivatives_the_adjoint_cannot_give(adjoint, how):
    """Refused with the adjoint's own message, eagerly and under jit (found by what JAX does with
    the solve's guard identities, not by looking at its tracers)."""
    theta = jnp.array([0.3])
    f = lambda th: jnp.sum(_x1(th, adjoint))  # noqa: E731
    grad_of_grad = lambda th: jax.grad(lambda t: jax.grad(f)(t)[0])(th)  # noqa: E731
    run = {
        "jvp": lambda: jax.jvp(f, (theta,), (jnp.ones(1),)),
        "jacfwd": lambda: jax.jacfwd(f)(theta),
        "hessian": lambda: jax.hessian(f)(theta),
        "grad_of_grad": lambda: grad_of_grad(theta),
        "jit_jvp": lambda: jax.jit(lambda th: jax.jvp(f, (th,), (jnp.ones(1),)))(theta),
        "linearize": lambda: jax.linearize(f, theta)[1](theta),
        "jit_linearize": lambda: jax.jit(lambda th: jax.linearize(f, th)[1](th))(theta),
        "jit_hessian": lambda: jax.jit(jax.hessian(f))(theta),
        "jit_grad_of_grad": lambda: jax.jit(grad_of_grad)(theta),
    }[how]
    _raises(rf"adjoint='{adjoint}' .*needs adjoint='direct'", run, exc=TypeError)


@pytest.mark.parametrize("adjoint", ["checkpoint", "direct"])
def test_derivative_with_respect_to_t1_with_fixed_steps(adjoint):
    """rk4 of dx/dt = θx from 1: d x(t1)/d t1 = θ e^{θ t1}. The check that fixed steps do not merge
    near t1 took a derivative of nextafter (NotImplementedError) when t1 was differentiated."""
    f = lambda t1: jnp.sum(solve(Dynamics(LIN), ONES[:1], jnp.array([0.3]), adjoint=adjoint,  # noqa: E731
                                 solver="rk4", dt=0.1, t1=t1).x)
    np.testing.assert_allclose(jax.grad(f)(1.0), 0.3 * np.exp(0.3), rtol=1e-6)


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_second_level_through_the_cotangent_only_is_computed(adjoint):
    """An outer derivative with respect to a weight of the loss differentiates the first gradient
    through its cotangent only, never the solve's inputs: not a second derivative of the solve,
    so not refused. rk4 of dx/dt = θx from 1: d/dw of d/dθ [w x(1)²] = 2 x ∂x/∂θ ≈ 2 e^{2θ}."""
    def inner_gradient(w):
        f = lambda th: w * jnp.sum(_x1(th, adjoint) ** 2)  # noqa: E731
        return jax.grad(f)(jnp.array([0.3]))[0]

    np.testing.assert_allclose(jax.grad(inner_gradient)(2.0), 2 * np.exp(0.6), rtol=1e-5)


def test_reverse_mode_through_the_guards_under_vmap_and_remat():
    """The identities that refuse forward mode are transparent to every reverse-mode form."""
    f = lambda th: jnp.sum(_x1(th, "checkpoint"))  # noqa: E731
    want = np.exp(0.3)  # rk4 of dx/dt = θx: x(1) ≈ e^θ, d/dθ ≈ e^θ
    thetas = jnp.array([[0.3], [0.3]])
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(thetas), [[want]] * 2, rtol=1e-6)
    summed = lambda ths: jnp.sum(jax.vmap(f)(ths))  # noqa: E731
    np.testing.assert_allclose(jax.grad(summed)(thetas), [[want]] * 2, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(jax.checkpoint(f)))(thetas[0]), [want], rtol=1e-6)
    np.testing.assert_allclose(jax.jacrev(f)(thetas[0]), [want], rtol=1e-6)


def test_direct_adjoint_gives_forward_and_second_order():
    theta = jnp.array([0.3])
    f = lambda th: jnp.sum(_x1(th, "direct"))  # noqa: E731  rk4 of dx/dt = θx: x(1) ≈ e^θ
    _, tangent = jax.jvp(f, (theta,), (jnp.ones(1),))
    np.testing.assert_allclose(tangent, np.exp(0.3), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda th: jax.grad(f)(th)[0])(theta), [np.exp(0.3)], rtol=1e-6)


def test_first_order_meta_learning_is_computed():
    """An inner gradient step under ``stop_gradient``, then an outer gradient (first-order MAML):
    two reverse levels, but the inner gradient is never differentiated; it was refused as
    second-order. rk4 of dx/dt = θx from 1: inner(θ) = x(1)² ≈ e^{2θ}, so the outer gradient is
    2 e^{2s} at the inner step's end s = θ - 0.1 · 2e^{2θ}."""
    def outer(th, adj):
        inner = lambda t: jnp.sum(_x1(t, adj) ** 2)  # noqa: E731
        step = th - 0.1 * jax.lax.stop_gradient(jax.grad(inner)(th))
        return inner(step)

    s = 0.3 - 0.2 * np.exp(0.6)
    grad = jax.jit(jax.grad(outer), static_argnums=1)
    np.testing.assert_allclose(grad(jnp.array([0.3]), "checkpoint"), [2 * np.exp(2 * s)], rtol=1e-5)
    _raises(r"adjoint='backsolve' works under one reverse-mode level only", grad, jnp.array([0.3]),
            "backsolve", exc=TypeError)  # diffrax's backsolve cannot compute it


@pytest.mark.slow  # ~4 s of compilation; the default run's budget is spent
def test_backsolve_under_rematerialisation():
    """``jax.checkpoint`` around a backsolve solve with save times or traced times ended in
    diffrax's "Unexpected tangent": the run-time checks gave the times zero tangents. rk4 of
    dx/dt = θx from 1 saved at 0, 1/2, 1: d/dθ (1 + e^{θ/2} + e^θ)."""
    f = lambda th, t1: jnp.sum(solve(Dynamics(LIN), ONES[:1], th, adjoint="backsolve", solver="rk4",  # noqa: E731
                                     dt=0.1, t1=t1, ts=jnp.linspace(0.0, 1.0, 3)).x)
    remat = jax.jit(jax.grad(jax.checkpoint(f)))(jnp.array([0.3]), 1.0)
    np.testing.assert_allclose(remat, [0.5 * np.exp(0.15) + np.exp(0.3)], rtol=1e-6)


# --- 8. degenerate sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("build,match", [
    (lambda: MLPField(0), r"MLPField: dim must be a positive integer"),
    (lambda: MLPField(2, 0), r"MLPField: hidden must be a positive integer"),
    (lambda: LinearField(0), r"LinearField: dim must be a positive integer"),
    (lambda: nc.SparseLinearField(0), r"SparseLinearField: dim must be a positive integer"),
    (lambda: nc.SparseLinearField(3, ()), r"at least one offset"),
    (lambda: NCODE.build("open", MLPField(2), (2,), hidden=(0,)), r"Hypernetwork: hidden widths"),
    (lambda: NCODE.build("closed", MLPField(2), (2,), feedback_hidden=(4, -1)), r"Feedback: hidden widths"),
    (lambda: NCODE.build("open", MLPField(2), ()), r"data_shape must be one input sample's shape"),
    (lambda: NCODE(MLPField(2), nc.StaticInit(MLPField(2).layout), augment=-1),
     r"augment must be an integer >= 0"),
])
def test_degenerate_sizes_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_degenerate_sizes_at_solve():
    _raises(r"x0 has an empty batch", lambda: solve(Dynamics(LIN), jnp.ones((0, 1)), jnp.array([-1.0])),
            exc=ValueError)
    _raises(r"time interval is empty", lambda: solve(Dynamics(LIN), ONES, jnp.array([-1.0]), t1=0.0),
            exc=ValueError)
    _raises(r"ts is empty", lambda: solve(Dynamics(LIN), ONES, jnp.array([-1.0]), ts=jnp.zeros((0,))),
            exc=ValueError)
    # the smallest real sizes work: one sample, one state entry, one hidden unit, no hidden layer
    model = NCODE.build("open_closed", MLPField(1, 1), (1,), hidden=(), feedback_hidden=())
    sol = model(model.init(jax.random.key(0), jnp.float64), jnp.ones((1, 1)), solver="rk4", dt=0.5)
    assert sol.x.shape == (1, 1) and np.all(np.isfinite(sol.x))


# --- 9. activations from jax.nn; diffrax through its public names -------------------------------


def test_sigmoid_gradient_is_finite_for_large_negative_inputs():
    sigma = nc.fields.activation("sigmoid")
    with jax.enable_x64(False):
        g = jax.grad(lambda u: sigma(u))(jnp.float32(-100.0))
    assert np.isfinite(g) and g >= 0


def test_only_public_diffrax_names():
    import importlib
    import pkgutil

    import ncode_jax.solving

    stages = [importlib.import_module(f"ncode_jax.solving.{m.name}")
              for m in pkgutil.iter_modules(ncode_jax.solving.__path__)]
    for module in (sys.modules["ncode_jax.solve"], sys.modules["ncode_jax.solvers"], *stages):
        src = inspect.getsource(module)
        assert "diffrax._" not in src and "._value" not in src, module.__name__


# --- found by a second reader -------------------------------------------------------------------


def test_throw_does_not_change_the_solve_bfloat16():
    """The checks must not turn Python-float tolerances into float32 arrays (bfloat16 state)."""
    x, th = jnp.ones((1, 1), jnp.bfloat16), jnp.array([-1.0], jnp.bfloat16)
    loose = solve(Dynamics(LIN), x, th, throw=False)
    checked = solve(Dynamics(LIN), x, th)
    assert int(loose.stats["result"]) == 0
    assert int(checked.stats["num_steps"]) == int(loose.stats["num_steps"])


def test_result_codes_match_the_named_cause():
    nan_field = solve(Dynamics(SqrtField()), jnp.full((1, 1), 0.25), jnp.array([2.0]), throw=False)
    blow_up = solve(Dynamics(SquareField()), jnp.ones((1, 1)), jnp.array([1.0]), t1=2.0, throw=False)
    budget = solve(Dynamics(LIN), ONES, jnp.array([-1.0]), rtol=1e-12, atol=1e-12, max_steps=2, throw=False)
    assert [int(s.stats["result"]) for s in (nan_field, blow_up, budget)] == [2, 2, 1]


def test_traced_zero_tolerances_and_string_tolerances():
    run = jax.jit(lambda r, a: solve(Dynamics(LIN), ONES, jnp.array([-1.0]), rtol=r, atol=a).x)
    _raises(r"rtol and atol are both 0", run, 0.0, 0.0)
    _raises(r"rtol must be a real number", lambda: solve(Dynamics(LIN), ONES, jnp.array([-1.0]), rtol="1e-3"),
            exc=TypeError)
    with pytest.raises(TypeError, match="rtol must be a real number"):
        nc.SolveConfig(rtol="1e-3")


def test_time_gradient_with_backsolve_is_refused():
    def f(t1, adjoint):
        return jnp.sum(solve(Dynamics(LIN), ONES, jnp.array([-1.0]), t1=t1, adjoint=adjoint).x)

    _raises(r"backsolve' gives no derivatives with respect to t0, t1 or ts.*'checkpoint' or 'direct'",
            jax.grad(f), 1.0, "backsolve", exc=TypeError)
    np.testing.assert_allclose(jax.grad(f)(1.0, "checkpoint"), -2 * np.exp(-1.0), rtol=1e-2)


def test_empty_batch_and_list_inputs_through_ncode():
    model = NCODE.build("open", MLPField(2, 4), (2,), hidden=(4,))
    params = model.init(jax.random.key(0), jnp.float64)
    _raises(r"x0 has an empty batch", lambda: model(params, jnp.zeros((0, 2))), exc=ValueError)
    np.testing.assert_allclose(model(params, [[0.1, 0.2]]).x, model(params, jnp.array([[0.1, 0.2]])).x)
    _raises(r"x0 must be an array", lambda: model(params, "x"), exc=TypeError)


def test_recovered_nan_candidate_is_no_failure():
    """dx/dt = -sqrt(x) from x0 = 1 on [0, 0.5]: the solution (1 - t/2)² stays positive, a big first
    step may try x < 0 (NaN) and be rejected; the solve must still succeed."""
    sol = solve(Dynamics(SqrtField()), jnp.ones((1, 1)), jnp.array([1.0]), t1=0.5, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sol.x, [[0.75**2]], rtol=1e-6)
