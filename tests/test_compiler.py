"""ncode_jax.compiler_options: which options, what they change in the compiled program, and that
they change nothing in the values (float32, as training runs)."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ncode_jax as nc
from ncode_jax import compiler
from ncode_jax.conv import ConvBlockField

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False
OPTION = "xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture(autouse=True)
def _on_cpu():
    """These tests are about XLA:CPU's options: where a GPU is the default backend they run on the
    CPU backend (arrays made and programs compiled there)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _ynn_convolutions(hlo: str) -> int:
    """Convolutions XLA handed to YNNPACK: ``ynn_fusion`` instructions whose fused computation
    holds a convolution."""
    comps = dict(re.findall(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, flags=re.S | re.M))
    calls = re.findall(r"ynn_fusion[\w.]* = .*?calls=%?([\w.\-]+)", hlo)
    return sum(" convolution(" in comps.get(c, "") for c in calls)


def _block_grad(hidden=50, batch=2, size=8):
    field = ConvBlockField(channels=3, height=size, width=size, hidden=hidden, impl="map")
    k = jax.random.split(jax.random.key(0), 3)
    theta = field.layout.init(k[0])[None] * (1 + 0.1 * jax.random.normal(k[1], (batch, field.num_params)))
    x = jax.random.normal(k[2], (batch, size, size, 3))

    def loss(x, th):
        return 0.5 * jnp.sum(field(0.0, x, th) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1)), (x, theta)


def test_cpu_options_leave_convolutions_to_xla():
    want = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    assert nc.compiler_options("cpu") == {OPTION: want}
    assert nc.compiler_options("gpu") == {} and nc.compiler_options("tpu") == {}
    fn, args = _block_grad()
    default = jax.jit(fn).lower(*args).compile().as_text()
    tuned = jax.jit(fn, compiler_options=nc.compiler_options("cpu")).lower(*args).compile().as_text()
    assert _ynn_convolutions(default) > 0  # the pinned jaxlib's default: YNNPACK convolutions
    assert _ynn_convolutions(tuned) == 0
    assert "ynn_fusion" in tuned  # the other YNNPACK fusions (dots) stay


def test_options_do_not_change_values_or_gradients():
    fn, args = _block_grad()
    ref = jax.jit(fn)(*args)
    out = jax.jit(fn, compiler_options=nc.compiler_options("cpu"))(*args)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-5)


def test_user_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{OPTION}=+individual_convolution")
    assert nc.compiler_options("cpu") == {}


def test_a_jaxlib_that_refuses_the_option_gets_none(monkeypatch):
    compiler._accepted.cache_clear()
    monkeypatch.setattr(compiler, "_cpu_options", lambda: {OPTION: "NO_SUCH_FUSION_TYPE"})
    try:
        with pytest.warns(RuntimeWarning, match="refuses"):
            assert nc.compiler_options("cpu") == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # checked once: no second warning
            assert nc.compiler_options("cpu") == {}
    finally:
        compiler._accepted.cache_clear()


def test_training_engine_jit_compiles_with_them():
    from train.parallel import DataParallel

    dp = DataParallel.create(1)
    fn, (x, theta) = _block_grad()
    step = dp.jit(lambda th, x: fn(x, th), batch_argnums=(1,))
    hlo = step.lower(theta, x).compile().as_text()
    assert dp.backend == jax.default_backend() and _ynn_convolutions(hlo) == 0


def test_lazy_jit_builds_at_the_first_call_with_the_options(monkeypatch):
    built = []
    real = compiler.compiler_options
    monkeypatch.setattr(compiler, "compiler_options", lambda: built.append(1) or real())
    fn, args = _block_grad()
    lazy = compiler.jit(fn)
    assert built == []  # defining it touched nothing
    ref = jax.jit(fn)(*args)
    for a, b in zip(jax.tree.leaves(lazy(*args)), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-5)
    assert _ynn_convolutions(lazy.lower(*args).compile().as_text()) == 0 and built == [1]


_TWO_DEVICES = """
import warnings
warnings.simplefilter("error")  # a refusal warning fails the check
import jax
from tests.test_compiler import _block_grad, _ynn_convolutions
from train.parallel import DataParallel
dp = DataParallel.create(2)
fn, (x, theta) = _block_grad()
step = dp.jit(lambda th, x: fn(x, th), batch_argnums=(1,))
step(theta, x)  # the first call: options computed, probe compiled, all under a 2-device mesh
assert _ynn_convolutions(step.lower(theta, x).compile().as_text()) == 0
import ncode_jax as nc
assert nc.compiler_options("cpu") != {}
print("ok")
"""


def test_engine_jit_on_two_devices_keeps_the_options():
    """Before: the options' probe compiled on cpu:0 under the engine's 2-device mesh, failed, and
    was taken for a refusal, so every multi-device run (and FID after it) lost the options."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=str(root), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
