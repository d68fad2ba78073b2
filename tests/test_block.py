"""NCODEBlock: an N-CODE flow as a Flax layer; the guide's digits CNN trains to >= 90%."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import doc_block

import ncode_jax as nc

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False  # as users run Flax models



@pytest.fixture(scope="module")
def digits_run():
    """Run the guide's digits example in this process (so its jitted step can be inspected)."""
    code = doc_block("docs/custom-networks.md", "## An N-CODE layer inside a Flax model", 0)
    assert len([line for line in code.splitlines() if line.strip()]) <= 24
    ns = {"__name__": "readme_digits"}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "docs/custom-networks.md:digits", "exec"), ns)
    return ns, buf.getvalue()


def test_guide_digits_cnn_reaches_90_percent(digits_run):
    _, out = digits_run
    acc = float(re.search(r"held-out accuracy ([0-9.]+)", out).group(1))
    assert acc >= 0.90, out


def test_train_step_does_not_recompile(digits_run):
    ns, _ = digits_run
    step = ns["train_step"]
    assert step._cache_size() == 1  # 180 calls, one compilation
    X, y = ns["X"], ns["y"]
    params, opt_state = step(ns["params"], ns["opt_state"], X[:128], y[:128])
    jax.block_until_ready(params)
    assert step._cache_size() == 1
    # the block's parameters are ordinary Flax variables
    block = ns["params"]["params"]["NCODEBlock_0"]["ncode"]
    assert set(block) == {"initial"} and block["initial"]["theta"].shape == (nc.MLPField(16).num_params,)


# ---------------------------------------------------------------------------------------------
# The block itself (forward passes only: cheap)
# ---------------------------------------------------------------------------------------------


RK4_HALF = nc.SolveConfig(solver="rk4", dt=0.5)


class Tiny(nn.Module):
    field: nc.VectorField
    kind: str = "open"
    return_stats: bool = False

    @nn.compact
    def __call__(self, x):
        h = nc.NCODEBlock(self.field, kind=self.kind, augment=1, hidden=(4,), feedback_hidden=(4,),
                          solve=RK4_HALF, return_stats=self.return_stats)(nn.Dense(2)(x))
        return h


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)


def test_block_params_stats_and_sow(x):
    field = nc.MLPField(3, 8)
    net = Tiny(field, return_stats=True)
    model = nc.NCODE.build("open", field, (2,), augment=1, hidden=(4,))

    @jax.jit  # one compilation: init (which runs the block once) and the reference solve
    def run(x):
        (out, stats), variables = net.init_with_output(jax.random.key(0), x, mutable=True)
        h = nn.Dense(2).apply({"params": variables["params"]["Dense_0"]}, x)
        want = model(variables["params"]["NCODEBlock_0"]["ncode"], h, solver="rk4", dt=0.5).x
        return variables, out, stats, want

    variables, out, stats, want = run(x)
    ncode_params = variables["params"]["NCODEBlock_0"]["ncode"]
    assert set(ncode_params["initial"]) == {"theta", "mlp"}  # θ̄ and γ live in the Flax variables
    assert out.shape == (5, 3) and out.dtype == jnp.float32  # augmented state: 2 + 1 channels
    assert int(stats["nfe"]) == 8  # rk4, 2 steps
    sown = variables["intermediates"]["NCODEBlock_0"]["solve_stats"][0]  # sow: collection 'intermediates'
    assert int(sown["num_steps"]) == 2
    np.testing.assert_allclose(out, want, rtol=1e-6)  # the same maths as the NCODE it wraps


def test_block_with_module_field_open_loop(x):
    class F(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(4)(x)))

    field = nc.ModuleField.from_flax(F(), jnp.zeros((1, 3)), jax.random.key(1))
    net = Tiny(field, kind="open")  # hypernetwork γ on a ModuleField (closed loop: test_module_field, slow)

    # init under jit: the field's init_std must not need concrete values of traced ones
    out, variables = jax.jit(net.init_with_output)(jax.random.key(0), x)
    assert set(variables["params"]["NCODEBlock_0"]["ncode"]["initial"]) == {"theta", "mlp"}
    assert out.shape == (5, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_block_errors(x):
    class F(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(x.shape[-1])(x)

    with pytest.raises(TypeError, match="ModuleField.from_flax"):
        nc.NCODEBlock(F())
    with pytest.raises(TypeError, match="must be a VectorField"):
        nc.NCODEBlock("mlp")
    with pytest.raises(ValueError, match="unknown kind 'opne'"):
        nc.NCODEBlock(nc.MLPField(3), kind="opne")
    with pytest.raises(ValueError, match=r"field's state shape is \(4,\)"):
        nc.NCODEBlock(nc.MLPField(4)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="expects a batch"):
        nc.NCODEBlock(nc.MLPField(3)).init(jax.random.key(0), x[0])
