"""Conv-block field: every implementation (map, grouped, conv_map; the GPU one runs on CPU here)
equals plain lax.conv + autodiff (values and gradients, float64 and float32), ``impl="auto"``
follows the backend, shape errors name the problem, and the field runs inside solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_rel_err
from jax import lax
from jax.test_util import check_grads

import ncode_jax as nc
from ncode_jax import conv as conv_module
from ncode_jax.conv import (
    ConvBlockField,
    conv3x3,
    naive_per_sample_conv,
    per_sample_conv3x3,
    resolve_impl,
    shared_conv3x3,
)

B, H, W, C, HID = 3, 6, 5, 2, 4  # tiny: non-square so that H/W mix-ups show


def _normal(seed, shape, dtype=jnp.float64):
    # numpy data: jax.random would compile a threefry kernel per shape (slow on 2 cores)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _lax_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _readout(y):
    """A nonlinear scalar readout: every output entry gets its own weight."""
    return jnp.sum(jnp.sin(y) * _normal(9, y.shape, y.dtype))


def _value_and_grads(f, *args):
    """``f(*args)`` and the gradient of ``_readout(f(*args))`` w.r.t. all args, in one jit."""

    def vg(*a):
        y, vjp = jax.vjp(f, *a)
        return y, jax.grad(lambda y: _readout(y))(y), vjp

    @jax.jit
    def run(*a):
        y, ct, vjp = vg(*a)
        return y, vjp(ct)

    return run(*args)


FAST = ConvBlockField(C, H, W, hidden=HID)  # impl="auto": "map" on CPU
REF = ConvBlockField(C, H, W, hidden=HID, impl="reference")
FIELD_IMPLS = ("map", "winograd", "grouped", "conv_map")


# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------


PER_SAMPLE_IMPLS = ("map", "winograd", "grouped", "conv_map")


@pytest.mark.parametrize(
    "impl, dtype, tol",
    [*((i, jnp.float64, 1e-12) for i in PER_SAMPLE_IMPLS), ("map", jnp.float32, 1e-5),
     ("winograd", jnp.float32, 1e-5)],
    ids=[*(f"f64-{i}" for i in PER_SAMPLE_IMPLS), "f32-map", "f32-winograd"],
)
def test_per_sample_conv_matches_naive(impl, dtype, tol):
    x, w = _normal(0, (B, H, W, C), dtype), _normal(1, (B, 3, 3, C, 7), dtype)
    y, g = _value_and_grads(lambda a, k: per_sample_conv3x3(a, k, impl), x, w)
    y_ref, g_ref = _value_and_grads(naive_per_sample_conv, x, w)
    assert y.shape == (B, H, W, 7) and y.dtype == dtype and g[1].dtype == dtype
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    assert tree_rel_err(g, g_ref) < tol
    # the naive reference itself is sample-by-sample lax.conv
    np.testing.assert_allclose(y_ref[1], _lax_conv(x[1:2], w[1])[0], rtol=tol, atol=tol)


def test_resolve_impl(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # holds on any machine
    assert resolve_impl("auto") == "map"  # one device
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        assert resolve_impl("auto") == "winograd"  # the batch split over 2 devices
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("data",))):
        assert resolve_impl("auto") == "map"
    assert resolve_impl("auto", devices=2) == "winograd"  # asked for outside the mesh
    # the shared-kernel primitive runs Winograd only when asked for by name (as the field does)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        x, k = _normal(0, (B, H, W, C)), _normal(1, (3, 3, C, 4))
        assert "dot_general" not in str(jax.make_jaxpr(lambda a, q: shared_conv3x3(a, q))(x, k))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_impl("auto") == "grouped"
    assert resolve_impl("map") == "map" and resolve_impl("reference") == "reference"
    with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
        resolve_impl("fft")
    with pytest.raises(ValueError, match="unknown conv impl"):
        per_sample_conv3x3(_normal(0, (B, H, W, C)), _normal(1, (B, 3, 3, C, 4)), "fft")


def test_single_image_and_shared_conv_match_lax_float64():
    x, w = _normal(2, (B, H, W, C)), _normal(3, (3, 3, C, 5))
    one_lax = lambda a, k: _lax_conv(a[None], k)[0]  # noqa: E731
    for fast, ref, xx in [(conv3x3, one_lax, x[0]), (shared_conv3x3, _lax_conv, x)]:
        (y, g), (y_ref, g_ref) = _value_and_grads(fast, xx, w), _value_and_grads(ref, xx, w)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        assert tree_rel_err(g, g_ref) < 1e-12


@pytest.mark.wrong_inputs  # kernels of the wrong shape
def test_primitive_shape_errors():
    x = _normal(0, (B, H, W, C))
    with pytest.raises(ValueError, match="kernel has shape"):
        per_sample_conv3x3(x, _normal(1, (B, 3, 3, C + 1, 4)))  # wrong input channels
    with pytest.raises(ValueError, match="kernel has shape"):
        per_sample_conv3x3(x, _normal(1, (B + 1, 3, 3, C, 4)))  # wrong batch
    with pytest.raises(ValueError, match="kernel has shape"):
        per_sample_conv3x3(x, _normal(1, (B, 5, 5, C, 4)))  # not 3×3
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        per_sample_conv3x3(x[0], _normal(1, (B, 3, 3, C, 4)))
    with pytest.raises(ValueError, match="one image"):
        conv3x3(x, _normal(1, (3, 3, C, 4)))
    with pytest.raises(ValueError, match="kernel has shape"):
        shared_conv3x3(x, _normal(1, (B, 3, 3, C, 4)))
    with pytest.raises(ValueError, match="naive_per_sample_conv"):
        naive_per_sample_conv(x, _normal(1, (3, 3, C, 4)))


# Winograd F(4, 3): widths that 4 divides and widths that leave a padded last tile, odd heights,
# one image, no image; the loop over images (CPU) and the vectorised form (accelerators)
WINO_SIZES = ((1, 4, 8), (2, 3, 5), (1, 1, 1), (0, 4, 4), (2, 5, 10))


@pytest.mark.parametrize(
    "loop, dtype, tol",
    [(True, jnp.float64, 1e-12), (False, jnp.float32, 1e-5),
     pytest.param(True, jnp.float32, 1e-5, marks=pytest.mark.slow),
     pytest.param(False, jnp.float64, 1e-12, marks=pytest.mark.slow)],
    ids=["f64-loop", "f32-batched", "f32-loop", "f64-batched"],
)
def test_winograd_equals_naive_for_every_size(monkeypatch, loop, dtype, tol):
    """Per-sample and shared kernels: values, input and kernel gradients equal plain ``lax.conv``
    autodiff for even and odd H, W (a padded last tile), batch 1 and 0, float64 and float32."""
    monkeypatch.setattr(conv_module, "_loop_over_images", lambda: loop)
    for k, (b, h, w) in enumerate(WINO_SIZES):
        x, kern = _normal(30 + k, (b, h, w, 3), dtype), _normal(40 + k, (b, 3, 3, 3, 4), dtype)
        shared = _normal(50 + k, (3, 3, 3, 4), dtype)
        cases = [(lambda a, q: per_sample_conv3x3(a, q, "winograd"), naive_per_sample_conv, kern),
                 (lambda a, q: shared_conv3x3(a, q, "winograd"), _lax_conv, shared)]
        for fast, ref, q in cases:
            y, g = _value_and_grads(fast, x, q)
            y_ref, g_ref = _value_and_grads(ref, x, q)
            assert y.shape == (b, h, w, 4) and y.dtype == dtype and g[1].dtype == dtype
            np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
            if b:
                assert tree_rel_err(g, g_ref) < tol, (b, h, w)


def test_winograd_under_vmap_and_finite_differences():
    """An extra vmapped axis around the per-image loop; the custom VJP against finite
    differences (float64)."""
    x, kern = _normal(60, (2, B, H, W, C)), _normal(61, (2, B, 3, 3, C, 3))
    fast = jax.jit(jax.vmap(lambda a, q: per_sample_conv3x3(a, q, "winograd")))
    ref = jax.vmap(naive_per_sample_conv)(x, kern)
    np.testing.assert_allclose(fast(x, kern), ref, rtol=1e-12, atol=1e-12)
    check_grads(lambda a, q: _readout(per_sample_conv3x3(a, q, "winograd")),
                (x[0], kern[0]), order=1, modes=["rev"], eps=1e-6)


# ---------------------------------------------------------------------------------------------
# The field
# ---------------------------------------------------------------------------------------------


def test_layout():
    names = {s.name: (s.shape, s.init, s.fan_in) for s in FAST.layout.specs}
    assert names == {
        "w1": ((C, HID), "lecun", C),
        "b1": ((HID,), "zeros", None),
        "w2": ((3, 3, HID, HID), "lecun", 9 * HID),
        "b2": ((HID,), "zeros", None),
        "w3": ((HID, C), "lecun", HID),
        "b3": ((C,), "zeros", None),
    }
    assert FAST.num_params == C * HID + HID + 9 * HID * HID + HID + HID * C + C
    assert FAST.state_shape == (H, W, C)
    assert FAST.flops(2) == 2 * 2 * H * W * (2 * C * HID + 9 * HID * HID)
    assert isinstance(FAST, nc.VectorField) and nc.ConvBlockField is ConvBlockField
    hash(FAST)  # static, hashable


def _theta(seed, batch=None, dtype=jnp.float64):
    shape = (FAST.num_params,) if batch is None else (batch, FAST.num_params)
    std = FAST.layout.init_std(dtype) + 0.3  # non-zero biases too
    return jnp.broadcast_to(std, shape) * _normal(seed, shape, dtype)


@pytest.fixture(scope="module")
def field_fns():
    """Jitted value and gradient w.r.t. (x, θ) of the fast and reference fields (compiled once
    per implementation and θ kind, shared by the tests below)."""

    def fns(field):
        def val(x, th):
            return field(0.0, x, th)

        return jax.jit(val), lambda x, th: _value_and_grads(val, x, th)[1]

    out = {impl: fns(ConvBlockField(C, H, W, hidden=HID, impl=impl)) for impl in FIELD_IMPLS}
    out["tanh"] = fns(ConvBlockField(C, H, W, hidden=HID, act="tanh"))
    out["tanh_reference"] = fns(ConvBlockField(C, H, W, hidden=HID, act="tanh", impl="reference"))
    return {"reference": fns(REF), **out}


@pytest.mark.parametrize(
    "impl, per_sample",
    [("map", False), ("winograd", False), ("grouped", False), *((i, True) for i in (*FIELD_IMPLS, "tanh"))],
    ids=["shared-map", "shared-winograd", "shared-grouped",
         *(f"per_sample-{i}" for i in (*FIELD_IMPLS, "tanh"))],
)
def test_field_impl_equals_reference_float64(field_fns, impl, per_sample):
    """Every implementation (``tanh``: the ``map`` path with another activation); shared θ runs
    the same code under ``map`` and ``conv_map``."""
    (fast, fast_grad) = field_fns[impl]
    ref, ref_grad = field_fns["tanh_reference" if impl == "tanh" else "reference"]
    x = _normal(10, (B, H, W, C))
    theta = _theta(11, B if per_sample else None)
    y = fast(x, theta)
    assert y.shape == x.shape and y.dtype == jnp.float64
    np.testing.assert_allclose(y, ref(x, theta), rtol=1e-12, atol=1e-12)
    g_fast, g_ref = fast_grad(x, theta), ref_grad(x, theta)
    assert g_fast[0].shape == x.shape and g_fast[1].shape == theta.shape
    assert tree_rel_err(g_fast, g_ref) < 1e-12


def test_field_per_sample_is_sample_by_sample(field_fns):
    """Per-sample θ: sample b of the batch equals the shared field run on the whole batch with
    θ[b]; identical rows equal the shared path."""
    fast = field_fns["map"][0]
    x, theta = _normal(12, (B, H, W, C)), _theta(13, B)
    y = fast(x, theta)
    for b in range(B):
        np.testing.assert_allclose(y[b], fast(x, theta[b])[b], rtol=1e-12, atol=1e-12)
    same = jnp.broadcast_to(theta[0], theta.shape)
    np.testing.assert_allclose(fast(x, same), fast(x, theta[0]), rtol=1e-12, atol=1e-12)


def test_winograd_block_vectorised_over_images(field_fns, monkeypatch):
    """The per-sample Winograd block with its images vectorised (the accelerator form) equals the
    reference, values and gradients (float64)."""
    monkeypatch.setattr(conv_module, "_loop_over_images", lambda: False)
    field = ConvBlockField(C, H, W, hidden=HID, impl="winograd")
    x, theta = _normal(16, (B, H, W, C)), _theta(17, B)
    y, g = _value_and_grads(lambda a, th: field(0.0, a, th), x, theta)
    ref, ref_grad = field_fns["reference"]
    np.testing.assert_allclose(y, ref(x, theta), rtol=1e-12, atol=1e-12)
    assert tree_rel_err(g, ref_grad(x, theta)) < 1e-12


@pytest.mark.parametrize("impl", FIELD_IMPLS)
def test_field_float32(field_fns, impl):
    """float32 values (shared and per-sample θ) and per-sample gradients against the float64
    reference."""
    (fast, fast_grad), (ref, ref_grad) = field_fns[impl], field_fns["reference"]
    x, theta = _normal(14, (B, H, W, C), jnp.float32), _theta(15, B, jnp.float32)
    x64, th64 = x.astype(jnp.float64), theta.astype(jnp.float64)
    for th, th_ref in ((theta, th64), (theta[0], th64[0])):
        y = fast(x, th)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, ref(x64, th_ref), rtol=1e-5, atol=1e-5)
    g = fast_grad(x, theta)
    assert g[1].dtype == jnp.float32
    assert tree_rel_err(g, ref_grad(x64, th64)) < 1e-5


def test_field_errors():
    x, theta = _normal(0, (B, H, W, C)), _theta(1)
    with pytest.raises(ValueError, match="3 channels.*channels=2"):
        FAST(0.0, _normal(0, (B, H, W, C + 1)), theta)
    with pytest.raises(ValueError, match="spatial size 5×6.*6×5"):
        FAST(0.0, _normal(0, (B, W, H, C)), theta)
    with pytest.raises(ValueError, match="needs \\(batch, 6, 5, 2\\)"):
        FAST(0.0, x[0], theta)  # unbatched
    with pytest.raises(ValueError, match=f"P={FAST.num_params}"):
        FAST(0.0, x, theta[:-1])
    with pytest.raises(ValueError, match="batch 2 but x has batch 3"):
        FAST(0.0, x, _theta(2, 2))
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        ConvBlockField(C, H, W, hidden=0)
    with pytest.raises(ValueError, match="unknown activation"):
        ConvBlockField(C, H, W, act="gelu")
    with pytest.raises(ValueError, match="unknown impl"):
        ConvBlockField(C, H, W, impl="cuda")


# ---------------------------------------------------------------------------------------------
# Inside a solve
# ---------------------------------------------------------------------------------------------


def test_field_in_solve():
    """A tiny 8×8 image, 3 channels, fixed-step rk4, checkpoint adjoint: per-sample θ0 runs and
    differentiates (the field's gradients are checked against the reference above); shared θ0
    (NODE) runs too."""
    field = ConvBlockField(3, 8, 8, hidden=4)
    x0 = _normal(20, (2, 8, 8, 3))
    with jax.numpy_dtype_promotion("standard"):  # a float32 scale times float64 noise
        theta0 = 0.5 * field.layout.init_std()[None] * _normal(21, (2, field.num_params))

    @jax.jit
    def loss(th):
        sol = nc.solve(nc.Dynamics(field), x0, th, solver="rk4", dt=0.25, t1=0.5)
        return jnp.sum(sol.x**2), sol

    (val, sol), g = jax.value_and_grad(loss, has_aux=True)(theta0)
    assert sol.x.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(sol.x)))
    assert int(sol.stats["num_steps"]) == 2
    assert g.shape == theta0.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    shared = nc.solve(nc.Dynamics(field), x0, theta0[0], solver="rk4", dt=0.25, t1=0.5)
    assert shared.x.shape == (2, 8, 8, 3)
