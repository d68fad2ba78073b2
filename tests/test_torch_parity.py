"""ncode_jax and the PyTorch baseline (benchmarks/torch_baseline) compute the same thing.

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
from conftest import tree_rel_err

torch = pytest.importorskip(
    "torch", reason="PyTorch baseline not installed: pip install -e '.[torch]' (torch==2.13.0 CPU)"
)
pytest.importorskip(
    "torchdiffeq", reason="torchdiffeq not installed: pip install -e '.[torch]' (torchdiffeq==0.2.5)"
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.torch_baseline import ToyNCODE, grads_as_jax_tree, load_jax_params  # noqa: E402
from ncode_jax import NCODE, MLPField  # noqa: E402

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
