"""Fields and layouts: flat θ ↔ named weights, shared vs per-sample θ, sparse pattern, errors."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

from ncode_jax import LinearField, MLPField, ParamLayout, ParamSpec, SparseLinearField

B = 5


def _normal(seed, shape):
    # numpy data: jax.random would compile a threefry kernel per shape (slow on 2 cores)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


# ---------------------------------------------------------------------------------------------
# ParamLayout
# ---------------------------------------------------------------------------------------------

LAYOUT = ParamLayout(
    (
        ParamSpec("w", (3, 4)),
        ParamSpec("b", (4,), "zeros"),
        ParamSpec("k", (2, 1, 3), "normal", scale=0.5),
    )
)


def test_layout_sizes_and_offsets():
    assert LAYOUT.size == 12 + 4 + 6
    assert LAYOUT.names == ("w", "b", "k")
    assert LAYOUT.offsets() == {"w": (0, 12), "b": (12, 16), "k": (16, 22)}
    assert MLPField(3, 7).num_params == 3 * 7 + 7 + 7 * 3 + 3
    assert MLPField(3, 7, time_dependent=True).num_params == 4 * 7 + 7 + 7 * 3 + 3
    assert LinearField(4).num_params == 16
    assert SparseLinearField(6).num_params == 12  # 2n: AutoN-CODE's θ matches a VAE's mean+logvar
    assert SparseLinearField(6, offsets=(0, 1, -1)).num_params == 18


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_layout_roundtrip(batch):
    theta = _normal(0, (*batch, LAYOUT.size))
    w = LAYOUT.unflatten(theta)
    assert {k: v.shape for k, v in w.items()} == {
        "w": (*batch, 3, 4),
        "b": (*batch, 4),
        "k": (*batch, 2, 1, 3),
    }
    # C-order cut: weight "w" is the first 12 entries, row-major.
    np.testing.assert_array_equal(w["w"][..., 1, 2], theta[..., 1 * 4 + 2])
    np.testing.assert_array_equal(w["k"].reshape(*batch, 6), theta[..., 16:])
    np.testing.assert_array_equal(LAYOUT.flatten(w), theta)
    # and the other way round
    w2 = {k: _normal(1, v.shape) for k, v in w.items()}
    assert tree_allclose(LAYOUT.unflatten(LAYOUT.flatten(w2)), w2, rtol=0)



def _primitives(jaxpr) -> set[str]:
    """Every primitive of a jaxpr, sub-jaxprs included."""
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out |= _primitives(sub)
    return out


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_layout_cotangent_is_one_concatenation(batch):
    """The cotangent of θ from the weights' cotangents: one concatenation. A slice per weight
    would give a zero-padded θ-sized array per weight and their sum (6 (B, P) pads + adds per
    conv-field evaluation in the backward pass)."""
    theta = _normal(0, (*batch, LAYOUT.size))
    _, vjp = jax.vjp(LAYOUT.unflatten, theta)
    cot = {k: _normal(i + 1, v.shape) for i, (k, v) in enumerate(LAYOUT.unflatten(theta).items())}
    prims = _primitives(jax.make_jaxpr(vjp)(cot).jaxpr)
    assert "concatenate" in prims and not prims & {"pad", "add_any"}, prims
    (dtheta,) = vjp(cot)
    np.testing.assert_array_equal(dtheta, LAYOUT.flatten(cot))


def test_layout_init():
    theta = LAYOUT.init(jax.random.PRNGKey(0), jnp.float64)
    assert theta.shape == (LAYOUT.size,) and theta.dtype == jnp.float64
    w = LAYOUT.unflatten(theta)
    np.testing.assert_array_equal(w["b"], 0.0)
    assert float(jnp.abs(w["w"]).min()) > 0
    std = LAYOUT.unflatten(LAYOUT.init_std(jnp.float64))
    np.testing.assert_allclose(std["w"], 1 / np.sqrt(3))  # LeCun: fan-in = prod(shape[:-1])
    np.testing.assert_allclose(std["b"], 0.0)
    np.testing.assert_allclose(std["k"], 0.5)


@pytest.mark.wrong_inputs  # an integer θ, a list
def test_layout_errors():
    with pytest.raises(ValueError, match="duplicate"):
        ParamLayout((ParamSpec("a", (2,)), ParamSpec("a", (3,))))
    with pytest.raises(ValueError, match="P=22"):
        LAYOUT.unflatten(jnp.zeros((21,)))
    with pytest.raises(TypeError, match="floating"):
        LAYOUT.unflatten(jnp.zeros((22,), jnp.int32))
    w = LAYOUT.unflatten(jnp.zeros((22,)))
    with pytest.raises(KeyError, match="'b'"):
        LAYOUT.flatten({"w": w["w"], "k": w["k"]})
    with pytest.raises(ValueError, match="'k'"):
        LAYOUT.flatten({**w, "k": jnp.zeros((2, 3))})
    with pytest.raises(TypeError, match="array of shape .*P=22.*got list"):
        LAYOUT.unflatten([0.0] * 22)
    with pytest.raises(ValueError, match="at least one ParamSpec"):
        ParamLayout(())


def test_layout_keeps_numpy_numpy():
    """A NumPy θ gives NumPy weights of its dtype (float64 stays float64 without x64)."""
    theta = np.arange(2.0 * LAYOUT.size).reshape(2, LAYOUT.size)
    w = LAYOUT.unflatten(theta)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in w.values())
    np.testing.assert_array_equal(np.asarray(LAYOUT.flatten(w)), theta)


# ---------------------------------------------------------------------------------------------
# Shared vs per-sample θ
# ---------------------------------------------------------------------------------------------

FIELDS = {
    "mlp": MLPField(3, 6),
    "mlp_t": MLPField(3, 6, act="softplus", time_dependent=True),
    "linear": LinearField(3),
    "sparse": SparseLinearField(5),
    "sparse3": SparseLinearField(5, offsets=(0, 2, -1)),
}


@pytest.mark.parametrize("name", list(FIELDS))
def test_per_sample_theta_equals_sample_by_sample(name):
    field = FIELDS[name]
    (d,) = field.state_shape
    x = _normal(1, (B, d))
    theta = _normal(2, (B, field.num_params))
    t = 0.7

    @jax.jit  # one small compile instead of dozens of eager op dispatches
    def run(x, theta):
        out = field(t, x, theta)
        ref = jnp.concatenate([field(t, x[i : i + 1], theta[i]) for i in range(B)])
        shared = field(t, x, theta[0])
        shared_ref = jnp.concatenate([field(t, x[i : i + 1], theta[0]) for i in range(B)])
        return out, ref, shared, shared_ref

    out, ref, shared, shared_ref = run(x, theta)
    assert out.shape == (B, d)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(shared, shared_ref, rtol=1e-12, atol=1e-12)
    # different samples really follow different fields
    assert not np.allclose(out[1:], shared[1:])


def test_time_dependent_mlp_uses_t():
    field = FIELDS["mlp_t"]
    x = _normal(1, (B, 3))
    theta = _normal(2, (B, field.num_params))
    assert not np.allclose(field(0.0, x, theta), field(1.0, x, theta))
    # t enters as the last input: row d of w1
    w = field.layout.unflatten(theta)
    xt = jnp.concatenate([x, jnp.full((B, 1), 0.3)], -1)
    hid = jax.nn.softplus(jnp.einsum("bi,bio->bo", xt, w["w1"]) + w["b1"])
    ref = jnp.einsum("bh,bho->bo", hid, w["w2"]) + w["b2"]
    np.testing.assert_allclose(field(0.3, x, theta), ref, rtol=1e-12)
    assert np.allclose(FIELDS["mlp"](0.0, x, theta[:, : FIELDS["mlp"].num_params]),
                       FIELDS["mlp"](5.0, x, theta[:, : FIELDS["mlp"].num_params]))


@pytest.mark.parametrize("name", ["linear", "sparse", "sparse3"])
def test_matrix_times_x_equals_field(name):
    field = FIELDS[name]
    (d,) = field.state_shape
    x = _normal(3, (B, d))
    theta = _normal(4, (B, field.num_params))
    a = field.matrix(theta)
    assert a.shape == (B, d, d)
    np.testing.assert_allclose(jnp.einsum("bij,bj->bi", a, x), field(0.0, x, theta), rtol=1e-12)
    a0 = field.matrix(theta[0])
    assert a0.shape == (d, d)
    np.testing.assert_allclose(x @ a0.T, field(0.0, x, theta[0]), rtol=1e-12)


def test_sparse_pattern_two_per_row():
    n = 7
    field = SparseLinearField(n)
    theta = _normal(5, (n * 2,)) + 3.0  # no accidental zeros
    a = np.asarray(field.matrix(theta))
    nz = a != 0
    np.testing.assert_array_equal(nz.sum(axis=1), 2)
    rows = np.arange(n)
    expected = np.zeros((n, n), bool)
    expected[rows, rows] = True
    expected[rows, (rows + 1) % n] = True
    np.testing.assert_array_equal(nz, expected)
    # A[i, (i + o) % n] = a[i, k]
    w = np.asarray(field.layout.unflatten(theta)["a"])
    np.testing.assert_array_equal(a[rows, rows], w[:, 0])
    np.testing.assert_array_equal(a[rows, (rows + 1) % n], w[:, 1])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "linear", "sparse"])
def test_wrong_theta_size_names_p(name):
    field = FIELDS[name]
    (d,) = field.state_shape
    P = field.num_params
    x = jnp.zeros((B, d))
    with pytest.raises(ValueError, match=f"P={P}"):
        field(0.0, x, jnp.zeros((P + 1,)))
    with pytest.raises(ValueError, match=f"P={P}"):
        field(0.0, x, jnp.zeros((B, P - 1)))
    with pytest.raises(ValueError, match="batch"):
        field(0.0, x, jnp.zeros((B + 1, P)))
    with pytest.raises(ValueError):
        field(0.0, x, jnp.zeros((1, B, P)))
    with pytest.raises(TypeError, match="floating"):
        field(0.0, x, jnp.zeros((P,), jnp.int32))


@pytest.mark.parametrize("name", ["mlp", "linear", "sparse"])
def test_wrong_x(name):
    field = FIELDS[name]
    (d,) = field.state_shape
    theta = jnp.zeros((field.num_params,))
    for bad in [jnp.zeros((d,)), jnp.zeros((B, d + 1)), jnp.zeros((B, d, 1))]:
        with pytest.raises(ValueError, match=r"\(batch, " + str(d)):
            field(0.0, bad, theta)
    with pytest.raises(TypeError, match="floating"):
        field(0.0, jnp.zeros((B, d), jnp.int32), theta)


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MLPField(2, 4, act="gelu")
    with pytest.raises(ValueError):
        MLPField(0, 4)
    with pytest.raises(ValueError, match="repeat a column"):
        SparseLinearField(4, offsets=(0, 4))
    for bad in ((0.5,), (0, True), 3):
        with pytest.raises(ValueError, match="offsets must be"):
            SparseLinearField(4, offsets=bad)
    listed = SparseLinearField(4, offsets=[0, np.int64(1)])  # a list is taken as a tuple: hashable
    assert listed.offsets == (0, 1) and hash(listed) == hash(SparseLinearField(4, offsets=(0, 1)))


# ---------------------------------------------------------------------------------------------
# mlp_apply (controllers γ, g)
# ---------------------------------------------------------------------------------------------


def test_mlp_folded_last_bias_is_the_same_function():
    """``fold_last_bias``: ``[x, 1] @ [[W], [b]]`` equals ``x @ W + b`` in value and gradients
    (float64), and the bias gradient is part of the matrix product: no sum over the batch."""
    from ncode_jax import mlp_apply, mlp_init

    params = mlp_init(jax.random.PRNGKey(0), (6, 5, 9), dtype=jnp.float64)
    params[-1]["b"] = _normal(3, (9,))
    x = _normal(4, (7, 6))
    x3 = _normal(6, (2, 3, 6))  # several leading axes
    np.testing.assert_allclose(mlp_apply(params, x3, fold_last_bias=True), mlp_apply(params, x3), rtol=1e-12)

    def loss(p, x, fold):
        return jnp.sum(jnp.sin(mlp_apply(p, x, "tanh", fold_last_bias=fold)))

    assert tree_allclose(jax.value_and_grad(loss, (0, 1))(params, x, True),
                         jax.value_and_grad(loss, (0, 1))(params, x, False), rtol=1e-12)
    one_layer = params[-1:]
    for fold, batch_sum in ((False, True), (True, False)):
        _, vjp = jax.vjp(lambda p, fold=fold: mlp_apply(p, x[:, :5], fold_last_bias=fold), one_layer)
        sums = [e for e in jax.make_jaxpr(vjp)(_normal(5, (7, 9))).jaxpr.eqns
                if e.primitive.name == "reduce_sum"
                and any(e.invars[0].aval.shape[a] > 1 for a in e.params["axes"])]
        assert bool(sums) == batch_sum, (fold, sums)


def test_sparse_field_cotangent_has_no_per_offset_pads():
    """``SparseLinearField``: the cotangent of its weights ``a (B, dim, K)`` is one product, not a
    zero-padded ``a`` per offset summed; values and gradients equal the dense matrix's."""
    field = SparseLinearField(6, offsets=(0, 1, -2))
    theta, x = _normal(0, (4, field.num_params)), _normal(1, (4, 6))
    a = field.layout.unflatten(theta)["a"]
    _, vjp = jax.vjp(lambda a: field.apply(0.0, x, {"a": a}), a)
    prims = _primitives(jax.make_jaxpr(vjp)(_normal(2, (4, 6))).jaxpr)
    assert not prims & {"pad", "add_any", "scatter-add", "dynamic_update_slice"}, prims
    dense = lambda th, x: jnp.einsum("bij,bj->bi", field.matrix(th), x)  # noqa: E731
    loss = lambda f: lambda th, x: jnp.sum(jnp.sin(f(th, x)))  # noqa: E731
    assert tree_allclose(jax.grad(loss(lambda th, x: field(0.0, x, th)), (0, 1))(theta, x),
                         jax.grad(loss(dense), (0, 1))(theta, x), rtol=1e-12)
