"""ncode_jax.compiler_options: which options, what they change in the compiled program, and that
they change nothing in the values (float32, as training runs)."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ncode_jax as nc
from ncode_jax import compiler
from ncode_jax.conv import ConvBlockField

X64 = False
OPTION = "xla_cpu_experimental_ynn_fusion_type"


def _ynn_convolutions(hlo: str) -> int:
    """Convolutions XLA handed to YNNPACK: ``ynn_fusion`` instructions whose fused computation
    holds a convolution."""
    comps = dict(re.findall(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, flags=re.S | re.M))
    calls = re.findall(r"ynn_fusion[\w.]* = .*?calls=%?([\w.\-]+)", hlo)
    return sum(" convolution(" in comps.get(c, "") for c in calls)


def _block_grad(hidden=50, batch=2, size=8):
    field = ConvBlockField(channels=3, height=size, width=size, hidden=hidden, impl="map")
    k = jax.random.split(jax.random.key(0), 3)
    theta = field.layout.init(k[0]) * (1 + 0.1 * jax.random.normal(k[1], (batch, field.num_params)))
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
    assert dp.backend == "cpu" and _ynn_convolutions(hlo) == 0


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
