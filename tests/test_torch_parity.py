"""ncode_jax and the PyTorch baseline (benchmarks/torch_baseline) compute the same thing.

Toy N-CODE, conv-block image classifier (node/anode/open/closed, small 8×8 images here) and the
AutoN-CODE latent flow.

Same toy N-CODE (2-D state, 16-unit MLP field, γ/g with 32 hidden units), same weights (the JAX
init loaded into torch), fixed-step rk4 (the 3/8 rule on both sides), float32: x(T) and the
gradients of mean(x(T)²) w.r.t. every parameter (θ̄, γ, g) agree to 1e-4 relative. The JAX
reference is the checkpoint adjoint (the exact gradient of the discrete solve); torch's ``odeint``
(backprop through the solver) and ``odeint_adjoint`` (continuous adjoint re-solved on the same
reversed grid) are both checked against it. JAX's backsolve equals checkpoint to ~1e-7 with fixed
steps (tests/test_gradients.py), so it is not compiled again here: two JAX compilations keep this
module fast. Skipped without the ``torch`` extra (``pip install -e '.[torch]'``).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_rel_err

torch = pytest.importorskip(
    "torch", reason="PyTorch baseline not installed: pip install -e '.[torch]' (torch==2.13.0 CPU)"
)
pytest.importorskip(
    "torchdiffeq", reason="torchdiffeq not installed: pip install -e '.[torch]' (torchdiffeq==0.2.5)"
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.torch_baseline import (  # noqa: E402
    ConvNCODE,
    LatentFlow,
    ToyNCODE,
    grads_as_jax_tree,
    load_jax_params,
    per_sample_conv3x3,
)
from benchmarks.torch_baseline.conv import CONV_IMPLS  # noqa: E402
from ncode_jax import NCODE, Dynamics, MLPField, SparseLinearField, solve  # noqa: E402
from ncode_jax.models.image import image_classifier  # noqa: E402

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False  # float32 on both sides (see conftest)
RTOL = 1e-4
SOLVE = dict(t1=0.5, solver="rk4", dt=0.1)
JAX_ONLY = dict(throw=False)  # no runtime error checks: less to compile
TORCH_CALLS = {"odeint": False, "odeint_adjoint": True}  # name -> ToyNCODE(adjoint=...)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / max(np.linalg.norm(np.ravel(b)), 1e-30))


@pytest.fixture(scope="module")
def results():
    """Lazily computed results per kind: JAX (checkpoint) and torch (odeint, odeint_adjoint)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model = NCODE.build(kind, MLPField(2, 16), (2,))
            params = model.init(jax.random.key(0))
            x0 = jax.random.normal(jax.random.key(1), (32, 2))
            assert x0.dtype == jnp.float32

            def loss(p):
                sol = model(p, x0, adjoint="checkpoint", **SOLVE, **JAX_ONLY)
                return jnp.mean(sol.x**2), (sol.x, sol.stats["nfe"])

            (lj, (xj, nfe)), gj = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            out = {"jax": dict(x=np.asarray(xj), loss=float(lj), grads=jax.device_get(gj), nfe=int(nfe))}
            for name, adjoint in TORCH_CALLS.items():
                tm = load_jax_params(ToyNCODE(kind), jax.device_get(params))
                xt = tm(torch.as_tensor(np.array(x0)), adjoint=adjoint, **SOLVE)
                assert xt.dtype == torch.float32
                lt = (xt**2).mean()
                lt.backward()
                out[name] = dict(x=xt.detach().numpy(), loss=float(lt.detach()),
                                 grads=grads_as_jax_tree(tm), nfe=tm.last_nfe,
                                 nfe_total=tm.counter.nfe)
            cache[kind] = out
        return cache[kind]

    return get


@pytest.mark.parametrize("torch_call", list(TORCH_CALLS))
@pytest.mark.parametrize("kind", ["open", "closed"])
def test_outputs_and_gradients_match(results, kind, torch_call):
    r = results(kind)
    j, t = r["jax"], r[torch_call]
    assert j["nfe"] == t["nfe"] == 4 * 5  # identical steps: 5 rk4 steps, 4 evaluations each
    if torch_call == "odeint_adjoint":
        assert t["nfe_total"] == 2 * 4 * 5  # the adjoint re-solves the same grid backwards
    assert rel(t["x"], j["x"]) <= RTOL
    assert abs(t["loss"] - j["loss"]) <= RTOL * abs(j["loss"])
    assert jax.tree.structure(t["grads"]) == jax.tree.structure(j["grads"])
    # every parameter block: θ̄, γ's (open) or g's (closed) weights and biases
    assert tree_rel_err(t["grads"], j["grads"]) <= RTOL
    assert all(np.any(g != 0) for g in jax.tree.leaves(j["grads"]))


def test_node_forward_matches():
    model = NCODE.build("node", MLPField(2, 16), (2,))
    params = model.init(jax.random.key(2))
    x0 = jax.random.normal(jax.random.key(3), (8, 2))
    xj = model(params, x0, **SOLVE, **JAX_ONLY).x
    tm = load_jax_params(ToyNCODE("node"), jax.device_get(params))
    with torch.no_grad():
        xt = tm(torch.as_tensor(np.array(x0)), **SOLVE)
    assert rel(xt.numpy(), np.asarray(xj)) <= RTOL


def test_field_and_layout_match_ncode_jax():
    """Same flat-θ layout: the torch field equals MLPField sample by sample, θ shared or not."""
    field = MLPField(2, 16)
    theta = jax.random.normal(jax.random.key(4), (5, field.num_params)) * 0.5
    x = jax.random.normal(jax.random.key(5), (5, 2))
    tm = ToyNCODE("node")
    assert tm.P == field.num_params
    for th in (theta, theta[0]):
        ref = np.asarray(jax.jit(field)(0.0, x, th))
        got = tm.field(None, torch.as_tensor(np.array(x)), torch.as_tensor(np.array(th))).numpy()
        assert rel(got, ref) <= 1e-6


def test_load_rejects_wrong_params():
    params = NCODE.build("closed", MLPField(2, 16), (2,)).init(jax.random.key(0))
    with pytest.raises(ValueError, match="missing"):
        load_jax_params(ToyNCODE("open"), params)
    bad = jax.tree.map(lambda a: a, params)
    bad["initial"]["theta"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="shape"):
        load_jax_params(ToyNCODE("closed"), bad)


# ---------------------------------------------------------------------------------------------
# Conv-block N-CODE classifier (ncode_jax.models.image_classifier vs ConvNCODE)
# ---------------------------------------------------------------------------------------------

IMAGE = (8, 8, 1)
CONV_KW = dict(hidden=8, augment=2)  # γ and g keep the paper's 10 hidden units
CONV_SOLVE = dict(t1=0.5, solver="rk4", dt=0.25)


@pytest.fixture(scope="module")
def conv_results():
    """Per (kind, torch call): JAX and torch logits and the gradients of a fixed linear function
    of the logits w.r.t. every parameter. torch ``odeint`` (backprop through the solver) is
    compared with JAX's checkpoint adjoint (both: exact gradient of the discrete solve);
    ``odeint_adjoint`` with JAX's backsolve (both: the continuous adjoint re-solved backwards with
    rk4 on the same grid; with ReLU fields and dt = 0.25 that differs from the discrete gradient
    by ~2%, so the pairs must not be mixed)."""
    cache = {}

    def get(kind, torch_call):
        if (kind, torch_call) not in cache:
            model = image_classifier(kind, IMAGE, **CONV_KW)
            params = model.init(jax.random.key(0))
            images = jax.random.uniform(jax.random.key(1), (3, *IMAGE))
            r = jax.random.normal(jax.random.key(2), (3, 10))
            jax_adjoint = {"odeint": "checkpoint", "odeint_adjoint": "backsolve"}[torch_call]

            def loss(p):
                logits, sol = model(p, images, adjoint=jax_adjoint, **CONV_SOLVE, **JAX_ONLY)
                return jnp.sum(logits * r), (logits, sol.stats["nfe"])

            (_, (yj, nfe)), gj = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            tm = load_jax_params(ConvNCODE(kind, IMAGE, **CONV_KW), jax.device_get(params))
            yt = tm(torch.as_tensor(np.array(images)), adjoint=TORCH_CALLS[torch_call], **CONV_SOLVE)
            assert yt.dtype == torch.float32
            (yt * torch.as_tensor(np.array(r))).sum().backward()
            cache[kind, torch_call] = dict(
                jax=dict(y=np.asarray(yj), grads=jax.device_get(gj), nfe=int(nfe)),
                torch=dict(y=yt.detach().numpy(), grads=grads_as_jax_tree(tm), nfe=tm.last_nfe))
        return cache[kind, torch_call]

    return get


@pytest.mark.parametrize(
    "kind, torch_call",
    [("open", "odeint"), ("closed", "odeint"),
     pytest.param("node", "odeint", marks=pytest.mark.slow),
     pytest.param("anode", "odeint", marks=pytest.mark.slow),
     pytest.param("closed", "odeint_adjoint", marks=pytest.mark.slow)],
)
def test_conv_classifier_outputs_and_gradients_match(conv_results, kind, torch_call):
    r = conv_results(kind, torch_call)
    j, t = r["jax"], r["torch"]
    assert j["nfe"] == t["nfe"] == 4 * 2  # 2 rk4 steps of 4 evaluations on both sides
    assert rel(t["y"], j["y"]) <= RTOL
    assert jax.tree.structure(t["grads"]) == jax.tree.structure(j["grads"])
    assert tree_rel_err(t["grads"], j["grads"]) <= RTOL  # θ̄, γ (open), g (closed), read-out
    assert all(np.any(g != 0) for g in jax.tree.leaves(j["grads"]))


def test_torch_per_sample_conv_impls_agree():
    """Every per-sample 3×3 implementation: same output and same gradients w.r.t. u and w."""
    gen = torch.Generator().manual_seed(0)
    u0 = torch.randn(3, 4, 6, 5, generator=gen)
    w0 = torch.randn(3, 7, 4, 3, 3, generator=gen)
    g = torch.randn(3, 7, 6, 5, generator=gen)
    ref = None
    for impl in CONV_IMPLS:
        u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = per_sample_conv3x3(u, w, impl)
        (out * g).sum().backward()
        got = [t.detach().numpy() for t in (out, u.grad, w.grad)]
        ref = got if ref is None else ref
        assert all(rel(a, b) <= 1e-5 for a, b in zip(got, ref)), impl
    with pytest.raises(ValueError, match="conv impl"):
        per_sample_conv3x3(u0, w0, "fft")


# ---------------------------------------------------------------------------------------------
# AutoN-CODE latent flow (SparseLinearField, per-sample θ, x(0) constant, T = 10)
# ---------------------------------------------------------------------------------------------

LATENT_SOLVE = dict(t1=10.0, solver="rk4", dt=0.5)


def test_latent_flow_outputs_and_gradients_match():
    n, b = 6, 4
    field = SparseLinearField(n)
    theta = 0.15 * jax.random.normal(jax.random.key(3), (b, field.num_params))
    x0 = jnp.linspace(-1.0, 1.0, n)
    r = jax.random.normal(jax.random.key(4), (b, n))

    def loss(theta, x0):
        sol = solve(Dynamics(field), jnp.broadcast_to(x0, (b, n)), theta, adjoint="checkpoint",
                    **LATENT_SOLVE, **JAX_ONLY)
        return jnp.sum(sol.x * r), (sol.x, sol.stats["nfe"])

    (_, (xj, nfe)), gj = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(theta, x0)
    flow = LatentFlow(n)
    assert np.allclose(flow.matrix(torch.as_tensor(np.array(theta))).numpy(),
                       np.asarray(field.matrix(theta)))
    for adjoint in (False, True):
        th = torch.as_tensor(np.array(theta)).requires_grad_()
        x0t = torch.as_tensor(np.array(x0)).requires_grad_()
        xt = flow(th, x0t, adjoint=adjoint, **LATENT_SOLVE)
        (xt * torch.as_tensor(np.array(r))).sum().backward()
        assert flow.last_nfe == int(nfe) == 4 * 20
        assert rel(xt.detach().numpy(), np.asarray(xj)) <= RTOL
        assert rel(th.grad.numpy(), np.asarray(gj[0])) <= RTOL, adjoint
        assert rel(x0t.grad.numpy(), np.asarray(gj[1])) <= RTOL, adjoint
