"""AutoN-CODE, AE and VAE (paper sec. 5.3) and the latent samplers (sec. 5.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from ncode_jax.generate import GMMSampler, KDESampler, PriorSampler
from ncode_jax.models.autoencoder import MODEL_KINDS, autoencoder
from ncode_jax.models.coders import ARCHITECTURES, architecture

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)


@pytest.fixture(scope="module")
def digits():
    from ncode_jax.data import load_dataset

    return load_dataset("digits", "train").images[:64]  # (64, 8, 8, 1) in [0, 1]


def test_latent_flow_is_matrix_exponential():
    m = autoencoder("ncode", architecture("mnist", latent_dim=5, widths=(16,)), (8, 8, 1),
                    rtol=1e-10, atol=1e-12)
    assert m.field.num_params == 10  # θ has 2n entries
    v = m.init(jax.random.key(1))
    x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1))
    th = m.encode(v, x)
    assert th.shape == (4, 10)
    a = np.asarray(m.field.matrix(th.astype(jnp.float64)))
    # two non-zeros per row: the diagonal and the cyclic super-diagonal
    assert (np.count_nonzero(a[0], axis=1) == 2).all() and a[0][4, 0] != 0 and a[0][0, 1] != 0
    ref = np.stack([scipy.linalg.expm(10.0 * a[i]) @ np.ones(5) for i in range(4)])
    assert np.abs(ref - 1).max() > 0.1  # the flow moves the state: the check can fail
    # latent(images) = x(10) = expm(10 A(encoder(images))) x(0); the orbit starts at x(0) = 1
    xs, dec = jax.jit(m.orbit)(v, x, jnp.linspace(0.0, 10.0, 6))
    assert xs.shape == (6, 4, 5) and dec.shape == (6, 4, 8, 8, 1)
    np.testing.assert_allclose(np.asarray(xs[0]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(xs[-1]), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_ncode_and_vae_have_equal_parameter_counts(name):
    shape = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "celeba": (64, 64, 3), "small": (8, 8, 1)}[name]
    counts = {k: autoencoder(k, architecture(name), shape).num_params() for k in MODEL_KINDS}
    assert counts["ncode"] == counts["vae"]
    arch = ARCHITECTURES[name]
    n, last = arch.latent_dim, arch.widths[-1]
    flat = last * (shape[0] // 8 + (shape[0] % 8 > 0)) ** 2 if arch.kind == "conv" else last
    # the AE's encoder head has n outputs instead of 2n: Dense (flat + 1) n + norm scale/bias 2n
    assert counts["vae"] - counts["ae"] == flat * n + n + 2 * n


def test_table_a1_shapes():
    m = autoencoder("ae", architecture("mnist"), (28, 28, 1))
    v = jax.eval_shape(m.init, jax.random.key(0))
    p = v["params"]
    assert p["encoder"]["Dense_0"]["kernel"].shape == (784, 400)
    assert p["encoder"]["Dense_1"]["kernel"].shape == (400, 25)
    assert p["decoder"]["Dense_1"]["kernel"].shape == (400, 784)
    c = autoencoder("ncode", architecture("cifar10"), (32, 32, 3))
    pc = jax.eval_shape(c.init, jax.random.key(0))["params"]
    assert [pc["encoder"][f"Conv_{i}"]["kernel"].shape for i in range(3)] == [
        (4, 4, 3, 256), (4, 4, 256, 512), (4, 4, 512, 1024)]
    assert pc["encoder"]["Dense_0"]["kernel"].shape == (4 * 4 * 1024, 256)  # FC_{128*2}
    assert pc["decoder"]["Dense_0"]["kernel"].shape == (128, 1024 * 8 * 8)  # FC_{1024*8*8}
    assert pc["decoder"]["ConvTranspose_2"]["kernel"].shape == (4, 4, 256, 3)
    out = jax.eval_shape(lambda v, x: c.apply(v, x)[0].recon, jax.eval_shape(c.init, jax.random.key(0)),
                         jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert out.shape == (2, 32, 32, 3)
    celeba = autoencoder("vae", architecture("celeba"), (64, 64, 3), likelihood="mse")
    out = jax.eval_shape(lambda v, x: celeba.apply(v, x)[0].recon,
                         jax.eval_shape(celeba.init, jax.random.key(0)),
                         jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert out.shape == (2, 64, 64, 3)


@pytest.mark.parametrize("kind,coders,likelihood", [
    ("ae", "mnist", "bernoulli"), ("vae", "mnist", "mse"), ("ncode", "mnist", "bernoulli"),
    pytest.param("ncode", "small", "mse", marks=pytest.mark.slow)])  # conv coders: slow compile
def test_loss_decreases(kind, coders, likelihood, digits):
    arch = architecture(coders, latent_dim=4, widths=(32,) if coders == "mnist" else (4, 4, 4))
    m = autoencoder(kind, arch, (8, 8, 1), likelihood=likelihood, solver="rk4", dt=1.0)
    v = m.init(jax.random.key(0))
    opt = optax.adam(3e-3)
    opt_state = opt.init(v["params"])

    @jax.jit
    def step(v, opt_state, key):
        (loss, (met, stats)), g = jax.value_and_grad(
            lambda p: m.loss({"params": p, "batch_stats": v["batch_stats"]}, digits, key=key),
            has_aux=True)(v["params"])
        upd, opt_state = opt.update(g, opt_state)
        return {"params": optax.apply_updates(v["params"], upd), "batch_stats": stats}, opt_state, loss

    losses = []
    for i in range(20):
        v, opt_state, loss = step(v, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    # evaluation mode is deterministic and uses the running batch statistics
    r1, r2 = m.reconstruct(v, digits[:8]), m.reconstruct(v, digits[:8])
    assert r1.shape == (8, 8, 8, 1) and bool(jnp.all(r1 == r2))
    assert float(r1.min()) >= 0 and float(r1.max()) <= 1


def test_bad_input_errors(digits):
    m = autoencoder("ncode", architecture("mnist", latent_dim=8, widths=(16,)), (8, 8, 1))
    v = m.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"images have shape \(2, 28, 28, 1\).*needs \(batch, 8, 8, 1\)"):
        m.reconstruct(v, jnp.zeros((2, 28, 28, 1)))
    with pytest.raises(ValueError, match="needs \\(batch, 8\\)"):
        m.decode(v, jnp.zeros((2, 5)))
    other = autoencoder("ncode", architecture("mnist", latent_dim=6, widths=(16,)), (8, 8, 1))
    with pytest.raises(ValueError, match="latent size"):
        other.check_variables(v)
    with pytest.raises(ValueError, match="multiples of 4"):
        autoencoder("ae", architecture("small"), (30, 30, 1))
    with pytest.raises(ValueError, match="unknown autoencoder"):
        autoencoder("gan", architecture("small"), (8, 8, 1))
    with pytest.raises(ValueError, match="unknown architecture"):
        architecture("resnet")
    with pytest.raises(ValueError, match="pass key"):
        autoencoder("vae", m.arch, (8, 8, 1)).loss(v, digits[:2])
    with pytest.raises(ValueError, match="only AutoN-CODE"):
        autoencoder("ae", m.arch, (8, 8, 1)).orbit(v, digits[:2], jnp.arange(3.0))


def test_samplers():
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(-3, 0.3, (200, 2)), rng.normal(3, 0.3, (200, 2))])
    gmm = GMMSampler(codes, 2, seed=0)
    s = gmm.sample(1000, seed=1)
    assert s.shape == (1000, 2) and s.dtype == np.float32
    assert np.array_equal(s, gmm.sample(1000, seed=1)) and not np.array_equal(s, gmm.sample(1000, seed=2))
    assert abs((s[:, 0] > 0).mean() - 0.5) < 0.06  # shuffled, both modes
    assert np.allclose(np.sort(gmm.gmm.means_[:, 0]), [-3, 3], atol=0.1)
    assert gmm.gmm.tol == 1e-3 and gmm.gmm.max_iter == 100 and gmm.gmm.init_params == "kmeans"
    assert gmm.fit_info["codes_per_component"] == 200 and "note" not in gmm.fit_info
    assert "underdetermined" in GMMSampler(codes, 200).fit_info["note"]
    with pytest.raises(ValueError, match="401 components to 400 latent codes"):
        GMMSampler(codes, 401)
    kde = KDESampler(codes, bandwidth=0.1)
    k = kde.sample(2000, seed=0)
    assert k.shape == (2000, 2) and np.allclose(np.abs(k).mean(0), 3, atol=0.15)
    p = PriorSampler(3).sample(5000, seed=0)
    assert p.shape == (5000, 3) and np.allclose(p.std(0), 1, atol=0.05)
    with pytest.raises(ValueError, match="non-empty"):
        GMMSampler(np.zeros((0, 2)), 1)
    with pytest.raises(ValueError, match="positive int"):
        kde.sample(0)


def test_a_collapsed_mixture_fit_says_so():
    """200 codes at 3 distinct points, 10 components: 7 components had weight 0 while fit_info
    reported a normal converged fit and scikit-learn's warning was suppressed."""
    codes = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]]), [70, 70, 60], axis=0)
    with pytest.warns(UserWarning, match=r"collapsed fit: 7 of 10 components hold no code \(3 distinct"):
        info = GMMSampler(codes, 10).fit_info
    assert (info["distinct_codes"], info["empty_components"]) == (3, 7) and "collapsed" in info["note"]
    assert any("distinct clusters (3)" in w for w in info["warnings"])
