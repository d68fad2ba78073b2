"""ModuleField: any Flax module / pure function as a controlled field.

Equality with the hand-written MLPField (float64, every adjoint, shared and per-sample θ, every
controller), finite differences, jit/grad/vmap, the reflection claim, construction errors.
"""

import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import doc_block

import ncode_jax as nc
from ncode_jax import ModuleField

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)

D, H, B = 2, 16, 6
TOL = 1e-10


class FlaxMLP(nn.Module):
    """Dense(16) → tanh → Dense(d): the same maths as MLPField(d, 16)."""

    hidden: int = H

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden)(x)
        return nn.Dense(x.shape[-1])(jnp.tanh(h))


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.fixture(scope="module")
def fields():
    mlp = nc.MLPField(D, H)
    mod = ModuleField.from_flax(FlaxMLP(), jnp.zeros((1, D)), jax.random.key(0))
    # θ_mod = θ_mlp[perm]: push the indices 0..P-1 through the weight mapping once.
    perm = np.asarray(_to_module(mlp, mod, jnp.arange(mlp.num_params, dtype=jnp.float64))).astype(int)
    return mlp, mod, perm


def _to_module(mlp, mod, theta):
    w = mlp.layout.unflatten(theta)
    tree = {"Dense_0": {"kernel": w["w1"], "bias": w["b1"]}, "Dense_1": {"kernel": w["w2"], "bias": w["b2"]}}
    return mod.flatten(tree)


def _close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
    assert err <= tol, err


def test_layout_and_init(fields):
    mlp, mod, perm = fields
    assert mod.state_shape == (D,) and mod.num_params == mlp.num_params == 2 * H + H + H * D + D
    assert mod.layout.names == ("Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel")
    assert sorted(perm) == list(range(mlp.num_params))
    # static and hashable: equal constructions are equal, usable as a jit static argument
    again = ModuleField.from_flax(FlaxMLP(), jnp.zeros((1, D)), jax.random.key(0))
    assert again == mod and hash(again) == hash(mod)
    assert ModuleField.from_flax(FlaxMLP(), jnp.zeros((1, D)), jax.random.key(1)) != mod
    # θ̄ re-draws Flax's own initialisers; init_std ≈ LeCun for kernels, 0 for zero biases
    th = mod.layout.init(jax.random.key(3), jnp.float64)
    assert th.shape == (mod.num_params,) and th.dtype == jnp.float64
    tree = mod.unflatten(th)
    np.testing.assert_array_equal(tree["Dense_0"]["bias"], 0.0)
    std = mod.unflatten(mod.layout.init_std(jnp.float64))
    np.testing.assert_array_equal(std["Dense_1"]["bias"], 0.0)
    np.testing.assert_allclose(std["Dense_0"]["kernel"], 1 / np.sqrt(D), rtol=0.15)
    np.testing.assert_allclose(std["Dense_1"]["kernel"], 1 / np.sqrt(H), rtol=0.15)
    # round trip θ → tree → θ, batched too
    thb = _normal(0, (3, mod.num_params))
    np.testing.assert_array_equal(mod.flatten(mod.unflatten(thb)), thb)


def test_eval_equals_mlpfield(fields):
    mlp, mod, _ = fields
    x = _normal(1, (B, D))
    for theta in (_normal(2, (mlp.num_params,)), _normal(3, (B, mlp.num_params))):
        out = mod(0.3, x, _to_module(mlp, mod, theta))
        assert out.dtype == jnp.float64
        _close(out, mlp(0.3, x, theta), 1e-13)


def test_jit_vmap_grad_of_field(fields):
    mlp, mod, _ = fields
    x, th = _normal(4, (B, D)), _normal(5, (3, B, mlp.num_params))
    thm = _to_module(mlp, mod, th)

    @jax.jit
    def per_problem(f_theta):  # vmap over 3 independent problems of per-sample θ
        return jax.vmap(lambda t_: mod(0.0, x, t_))(f_theta)

    _close(per_problem(thm), jnp.stack([mlp(0.0, x, t_) for t_ in th]), 1e-13)
    f = jax.jit(lambda fld, t_: jnp.sum(fld(0.0, x, t_) ** 2), static_argnums=0)
    g_mod = jax.grad(f, argnums=1)(mod, thm[0])
    g_mlp = jax.grad(f, argnums=1)(mlp, th[0])
    _close(g_mod, _to_module(mlp, mod, g_mlp), 1e-13)


# ---------------------------------------------------------------------------------------------
# Solves: every adjoint, shared and per-sample θ, finite differences
# ---------------------------------------------------------------------------------------------

SOLVE = {"solver": "rk4", "dt": 0.25, "t1": 1.0}


class QuadField(nc.VectorField):
    """Four decoupled systems in one fixed-step solve, so one compilation per adjoint compares all:
    MLPField and ModuleField with shared θ (the field receives θ[0], shape (P,)), then both with
    per-sample θ (B, P). State (B, 4D), θ (B, 4P) in blocks [mlp, mod, mlp, mod]. With fixed steps
    the blocks do not interact at all."""

    def __init__(self, mlp, mod):
        self.mlp, self.mod = mlp, mod
        self.state_shape = (4 * D,)
        P = mlp.num_params
        self.layout = nc.ParamLayout(tuple(nc.ParamSpec(f"p{i}", (P,)) for i in range(4)))

    def __hash__(self):
        return hash((self.mlp, self.mod))

    def __eq__(self, other):
        return isinstance(other, QuadField) and (self.mlp, self.mod) == (other.mlp, other.mod)

    def __call__(self, t, x, theta):
        P, out = self.mlp.num_params, []
        for i, f in enumerate([self.mlp, self.mod, self.mlp, self.mod]):
            th = theta[:, i * P : (i + 1) * P]
            out.append(f(t, x[:, i * D : (i + 1) * D], th[0] if i < 2 else th))
        return jnp.concatenate(out, -1)


@pytest.fixture(scope="module")
def solve_fns(fields):
    mlp, mod, _ = fields
    quad = QuadField(mlp, mod)
    weights = _normal(9, (B, D))
    fns = {}
    for adjoint in ("checkpoint", "backsolve", "direct"):

        def total(x0s, theta_shared, theta_sample, adjoint=adjoint):
            # shared θ enters the solve broadcast to (B, P): its gradient sums over the batch, as
            # a shared weight's should; the field itself sees θ[0] of shape (P,)
            th = [jnp.broadcast_to(a, (B, a.shape[-1])) for a in theta_shared] + list(theta_sample)
            x = nc.solve(nc.Dynamics(quad), jnp.concatenate(x0s, -1), jnp.concatenate(th, -1), **SOLVE,
                         adjoint=adjoint).x
            return jnp.sum(jnp.tanh(x.reshape(B, 4, D)) * weights[:, None]), x

        @jax.jit
        def run(x0, th_shared, th_sample, total=total):
            """θ in MLPField order; returns x(T) and gradients of each block."""
            shared = (th_shared, _to_module(mlp, mod, th_shared))
            sample = (th_sample, _to_module(mlp, mod, th_sample))
            (_, x), (gx, gsh, gsa) = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(
                (x0,) * 4, shared, sample)
            out = {}
            for j, which in enumerate(("shared", "sample")):
                g = gsh if which == "shared" else gsa
                for k, name in enumerate(("mlp", "mod")):
                    i = 2 * j + k
                    out[which, name] = {"x": x[:, i * D : (i + 1) * D], "gx": gx[i], "gth": g[k]}
            return out

        fns[adjoint] = run
    return fns


@pytest.fixture(scope="module")
def problem(fields):
    mlp = fields[0]
    return _normal(10, (B, D)), 0.7 * _normal(11, (mlp.num_params,)), 0.7 * _normal(12, (B, mlp.num_params))


class _Lazy(dict):
    def __init__(self, fns, problem):
        super().__init__()
        self.fns, self.problem = fns, problem

    def __missing__(self, adjoint):  # compile an adjoint only when a selected test needs it
        self[adjoint] = self.fns[adjoint](*self.problem)
        return self[adjoint]


@pytest.fixture(scope="module")
def solved(solve_fns, problem):
    return _Lazy(solve_fns, problem)


# One compilation per adjoint (~5-10 s on 2 cores): checkpoint (the default adjoint, exact gradient of
# the discrete solve) in the default run, backsolve and direct under -m slow.
ADJOINT_PARAMS = ["checkpoint", pytest.param("backsolve", marks=pytest.mark.slow),
                  pytest.param("direct", marks=pytest.mark.slow)]


@pytest.mark.parametrize("which", ["shared", "sample"])
@pytest.mark.parametrize("adjoint", ADJOINT_PARAMS)
def test_solve_and_gradients_equal_mlpfield(fields, solved, adjoint, which):
    """x(T), dL/dx0 and dL/dθ of ModuleField equal MLPField's to 1e-10 (float64)."""
    mlp, mod, _ = fields
    a, b = solved[adjoint][which, "mod"], solved[adjoint][which, "mlp"]
    _close(a["x"], b["x"])
    _close(a["gx"], b["gx"])
    _close(a["gth"], _to_module(mlp, mod, b["gth"]))
    assert np.max(np.abs(np.asarray(a["gth"]))) > 1e-3  # a real gradient, not zeros


@pytest.mark.parametrize("adjoint,tol", [("checkpoint", 1e-7),
                                         pytest.param("direct", 1e-7, marks=pytest.mark.slow),
                                         pytest.param("backsolve", 2e-2, marks=pytest.mark.slow)])
def test_gradients_match_finite_differences(fields, solve_fns, solved, problem, adjoint, tol):
    """Directional derivatives of the ModuleField loss (θ shared, θ per sample, x0) by central
    differences. backsolve is the continuous adjoint, not the exact gradient of the discrete solve:
    O(dt⁴) off for rk4, measured 3e-4 (θ) to 8e-3 (x0) relative at dt=0.25
    (docs/design.md, "What each adjoint computes")."""
    mlp, mod, _ = fields
    x0, th_sh, th_sa = problem
    fn, eps = solve_fns[adjoint], 1e-5
    weights = _normal(9, (B, D))

    def loss(which, *args):
        return float(jnp.sum(jnp.tanh(fn(*args)[which, "mod"]["x"]) * weights))

    for i, (which, arg) in enumerate([("shared", 1), ("sample", 2), ("sample", 0)]):
        args = list(problem)
        v = _normal(20 + i, args[arg].shape)
        plus, minus = list(args), list(args)
        plus[arg], minus[arg] = args[arg] + eps * v, args[arg] - eps * v
        fd = (loss(which, *plus) - loss(which, *minus)) / (2 * eps)
        g = solved[adjoint][which, "mod"]
        analytic = float(jnp.sum(g["gx"] * v) if arg == 0 else jnp.sum(g["gth"] * _to_module(mlp, mod, v)))
        assert abs(fd - analytic) <= tol * max(1.0, abs(fd)), (which, arg, fd, analytic)


# ---------------------------------------------------------------------------------------------
# Every controller: NCODE.build with a ModuleField equals the same model on MLPField
# ---------------------------------------------------------------------------------------------


def _map_params(kind, params, perm):
    """Rewrite an MLPField model's params for the ModuleField's θ order (also maps gradients)."""
    P = len(perm)
    out = jax.tree.map(lambda a: a, params)
    init = out["initial"]
    init["theta"] = init["theta"][..., perm]
    if "mlp" in init:  # hypernetwork: its output is θ
        init["mlp"][-1] = {"w": init["mlp"][-1]["w"][:, perm], "b": init["mlp"][-1]["b"][perm]}
    if "feedback" in out:  # g([θ, x, t]) → dθ
        layers = out["feedback"]["mlp"]
        w0 = layers[0]["w"]
        layers[0] = {"w": jnp.concatenate([w0[:P][perm], w0[P:]]), "b": layers[0]["b"]}
        layers[-1] = {"w": layers[-1]["w"][:, perm], "b": layers[-1]["b"][perm]}
    return out


# ~10-40 s each on 2 cores: under -m slow. node (StaticInit, shared θ) and open (Hypernetwork,
# per-sample θ) also train on a ModuleField in the default run (reflection test); closed loop
# through NCODEBlock in tests/test_block.py.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["node", "open", "closed"])
def test_every_controller_matches_mlpfield(fields, kind):
    mlp, mod, perm = fields
    m_mlp = nc.NCODE.build(kind, mlp, (D,), hidden=(8,), feedback_hidden=(8,))
    m_mod = nc.NCODE.build(kind, mod, (D,), hidden=(8,), feedback_hidden=(8,))
    p_mlp = m_mlp.init(jax.random.key(4), jnp.float64)
    p_mod = _map_params(kind, p_mlp, perm)
    x0 = _normal(13, (B, D))
    opts = {"solver": "tsit5", "rtol": 1e-6, "atol": 1e-8, "adjoint": "checkpoint"}

    @jax.jit
    def both(p_mlp, p_mod):
        def loss(model, p):
            sol = model(p, x0, **opts)
            return jnp.sum(sol.x**2), (sol.x, sol.stats["nfe"])

        return (jax.value_and_grad(loss, argnums=1, has_aux=True)(m_mlp, p_mlp),
                jax.value_and_grad(loss, argnums=1, has_aux=True)(m_mod, p_mod))

    ((_, (x_a, nfe_a)), g_a), ((_, (x_b, nfe_b)), g_b) = both(p_mlp, p_mod)
    assert int(nfe_a) == int(nfe_b)  # identical dynamics take identical adaptive steps
    _close(x_b, x_a)
    for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(_map_params(kind, g_a, perm))):
        _close(a, b)


@pytest.mark.slow  # one forward compile per solver (~2-5 s each on 2 cores)
@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4", "bosh3", "tsit5", "dopri5", "dopri8"])
def test_every_solver_and_vmapped_batch_mode(fields, solver):
    mlp, mod, _ = fields
    x0, th = _normal(16, (B, D)), 0.5 * _normal(17, (B, mlp.num_params))
    opts = {"solver": solver, "dt": 0.25} if solver in ("euler", "rk4") else {"solver": solver, "rtol": 1e-7}

    @jax.jit
    def run(x0, th):
        a = nc.solve(nc.Dynamics(mlp), x0, th, **opts).x
        b = nc.solve(nc.Dynamics(mod), x0, _to_module(mlp, mod, th), **opts).x
        c = nc.solve(nc.Dynamics(mod), x0, _to_module(mlp, mod, th), **opts, batch="vmap").x
        return a, b, c

    a, b, c = run(x0, th)
    _close(b, a)
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)  # per-sample steps: equal to tolerance


# ---------------------------------------------------------------------------------------------
# Pure functions (e.g. Equinox), time dependence
# ---------------------------------------------------------------------------------------------


def test_pure_function_from_equinox():
    net = eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(net, eqx.is_array)

    def apply_fn(p, t, x):
        return eqx.combine(p, static)(x)

    field = ModuleField(apply_fn, params, (3,))
    x = _normal(14, (B, 3))
    np.testing.assert_array_equal(field.layout.init(jax.random.key(9), jnp.float64),
                                  field.flatten(params).astype(jnp.float64))  # θ̄ = the given params
    theta = field.flatten(params)
    thetas = jnp.stack([theta * (1 + 0.1 * i) for i in range(B)])  # per sample: sample i uses net_i

    @jax.jit
    def run(x, theta, thetas):
        want = jax.vmap(lambda th, xi: eqx.combine(field.unflatten(th), static)(xi))(thetas, x)
        return field(0.0, x, theta), jax.vmap(net)(x), field(0.0, x, thetas), want

    shared, shared_want, sample, sample_want = run(x, theta, thetas)
    _close(shared, shared_want, 1e-12)
    _close(sample, sample_want, 1e-12)
    assert float(jnp.max(jnp.abs(sample - shared))) > 1e-3  # the samples really differ


def test_time_dependent_flax_module():
    class TimeField(nn.Module):
        @nn.compact
        def __call__(self, x, t):
            return nn.Dense(x.shape[-1])(x) * jnp.cos(t)

    field = ModuleField.from_flax(TimeField(), jnp.zeros((2, 3)), jax.random.key(0))
    theta = field.layout.init(jax.random.key(1), jnp.float64)
    x = _normal(15, (B, 3))
    run = jax.jit(lambda t, th: field(t, x, th))
    a, b = run(0.0, theta), run(1.0, theta)
    _close(b, a * np.cos(1.0), 1e-12)
    _close(run(1.0, jnp.broadcast_to(theta, (B, theta.size))), b, 1e-12)


# ---------------------------------------------------------------------------------------------
# Reflection: open-loop N-CODE on a ModuleField learns x ↦ -x, a NODE with the same field cannot
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reflection():
    """The guide's ModuleField example, run as written (fresh process, float32): a Flax MLP under
    open-loop control and a NODE with the same field, 200 Adam steps each on x ↦ -x."""
    code = doc_block("docs/custom-networks.md", "## A Flax module or a pure function as the field", 0)
    assert len([line for line in code.splitlines() if line.strip()]) <= 22
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    return {k: float(v) for k, v in re.findall(r"(\w+): held-out MSE ([0-9.e+-]+)", out.stdout)}


@pytest.mark.slow  # the guide's example in a subprocess (~15 s); test_toy.py keeps the claim for NCODE
def test_open_loop_module_field_learns_reflection(reflection):
    assert reflection["open"] < 1e-3, reflection


@pytest.mark.slow
def test_node_with_same_field_cannot_reflect(reflection):
    assert reflection["node"] >= 0.3, reflection  # a 1-D flow map is increasing: MSE ≥ 1/3


# ---------------------------------------------------------------------------------------------
# Construction errors
# ---------------------------------------------------------------------------------------------


def test_module_output_shape_must_match_input():
    class Wrong(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    with pytest.raises(ValueError, match=r"returns shape \(2, 3\) for x of shape \(2, 2\).*same shape"):
        ModuleField.from_flax(Wrong(), jnp.zeros((4, 2)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"returns shape \(3,\) for x of shape \(2,\)"):
        ModuleField(lambda p, t, x: x @ p["w"], {"w": jnp.zeros((2, 3))}, (2,))


def test_non_float_params_rejected():
    with pytest.raises(TypeError, match=r"leaf 'w' has dtype int32.*floating-point"):
        ModuleField(lambda p, t, x: x @ p["w"], {"w": jnp.zeros((2, 2), jnp.int32)}, (2,))

    class Counter(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.param("count", lambda k: jnp.zeros((), jnp.int32))
            return nn.Dense(x.shape[-1])(x)

    with pytest.raises(TypeError, match="count' has dtype int32"):
        ModuleField.from_flax(Counter(), jnp.zeros((1, 2)), jax.random.key(0))
    with pytest.raises(TypeError, match="not an array"):
        ModuleField(lambda p, t, x: x, {"w": jnp.zeros(2), "name": "abc"}, (2,))


def test_params_must_match_apply_fn():
    def apply_fn(p, t, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    with pytest.raises(ValueError, match="does not match the function.*KeyError"):
        ModuleField(apply_fn, {"w1": jnp.zeros((2, 4)), "w3": jnp.zeros((4, 2))}, (2,))
    with pytest.raises(ValueError, match="does not match the function"):
        ModuleField(apply_fn, {"w1": jnp.zeros((3, 4)), "w2": jnp.zeros((4, 2))}, (2,))
    with pytest.raises(ValueError, match="no array leaves"):
        ModuleField(apply_fn, {}, (2,))
    with pytest.raises(TypeError, match="callable"):
        ModuleField("apply", {"w": jnp.zeros(2)}, (2,))


def test_stateful_module_and_bad_example_rejected():
    class WithBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True)(nn.Dense(x.shape[-1])(x))

    with pytest.raises(ValueError, match=r"collections \['batch_stats'\].*stateless"):
        ModuleField.from_flax(WithBN(), jnp.zeros((1, 2)), jax.random.key(0))
    with pytest.raises(ValueError, match="batch of states"):
        ModuleField.from_flax(FlaxMLP(), jnp.zeros((2,)), jax.random.key(0))


def test_call_errors(fields):
    _, mod, _ = fields
    with pytest.raises(ValueError, match="P=82"):
        mod(0.0, jnp.zeros((B, D)), jnp.zeros((81,)))
    with pytest.raises(ValueError, match="batch 5 but x has batch 6"):
        mod(0.0, jnp.zeros((B, D)), jnp.zeros((5, 82)))
    with pytest.raises(ValueError, match=r"needs \(batch, 2\)"):
        mod(0.0, jnp.zeros((B, 3)), jnp.zeros((82,)))
