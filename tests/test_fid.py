"""FID (Fréchet distance), the digit-feature extractor and the InceptionV3 feature network."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from ncode_jax.data import load_dataset
from ncode_jax.metrics import feature_statistics, fid_from_features, frechet_distance
from ncode_jax.metrics import inception as inc
from ncode_jax.metrics.convert_inception import convert_state_dict
from ncode_jax.metrics.convert_inception import main as convert_main
from ncode_jax.metrics.digit_features import DIGIT_FID_NAME, DigitFeatureExtractor
from train.digit_features import train_extractor

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False  # the feature networks run in float32, as users run them; FID itself is float64 numpy


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_fid_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 2.0
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(b, b) == pytest.approx(0.0, abs=1e-9)
    d_ab, d_ba = fid_from_features(a, b), fid_from_features(b, a)
    assert d_ab > 1.0
    assert d_ab == pytest.approx(d_ba, rel=1e-10)


def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_fid_of_samples_approaches_closed_form():
    """Features drawn from two known (correlated) Gaussians: the estimate converges to d²."""
    rng = np.random.default_rng(9)
    d, n = 4, 200_000
    l1, l2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = l1 @ l1.T, l2 @ l2.T
    exact = frechet_distance(mu1, s1, mu2, s2)
    r1 = linalg.sqrtm(s1).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
    assert exact == pytest.approx(ref, rel=1e-9)
    a = mu1 + rng.normal(size=(n, d)) @ l1.T
    b = mu2 + rng.normal(size=(n, d)) @ l2.T
    assert fid_from_features(a, b) == pytest.approx(exact, rel=0.02)


def test_fid_matches_scipy_sqrtm_for_full_rank():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 10))
    b = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 0.3
    mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-9)
    m, s = feature_statistics(a)
    assert m.dtype == s.dtype == np.float64
    np.testing.assert_allclose(s, s1, rtol=1e-12, atol=1e-14)


def test_fid_stable_for_rank_deficient_covariances():
    d = 30
    u = _rotation(d, 3)
    a = np.concatenate([np.random.default_rng(4).uniform(0.5, 2.0, 10), np.zeros(d - 10)])  # rank 10
    b = np.concatenate([np.zeros(5), np.random.default_rng(5).uniform(0.5, 2.0, 20), np.zeros(d - 25)])
    s1, s2 = (u * a) @ u.T, (u * b) @ u.T  # commuting, singular, not diagonal
    mu1, mu2 = np.ones(d), np.zeros(d)
    expected = d + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-9)
    # fewer samples than dimensions: singular sample covariances; a translated copy differs
    # only in the mean
    x = np.random.default_rng(6).normal(size=(5, 40))
    shift = np.linspace(-1, 1, 40)
    assert fid_from_features(x, x + shift) == pytest.approx(np.sum(shift**2), rel=1e-9)
    # exactly zero covariance on both sides
    assert frechet_distance(mu1, np.zeros((d, d)), mu2, np.zeros((d, d))) == pytest.approx(d)


def test_fid_accurate_for_ill_conditioned_covariance():
    """Eigenvalues spread over 14 decades: identical covariances give ~0 to round-off in tr Σ
    (the eigenvalues of Σ₁^{1/2}Σ₂Σ₁^{1/2} would lose the small ones: error ~1e-8·tr Σ)."""
    d = 50
    u = _rotation(d, 8)
    s = (u * np.logspace(-14, 0, d)) @ u.T
    s = 0.5 * (s + s.T)
    assert frechet_distance(np.zeros(d), s, np.zeros(d), s) <= 1e-12 * np.trace(s)
    w = np.logspace(-14, 0, d)
    w2 = w * np.linspace(0.5, 2.0, d)
    expected = np.sum(w + w2 - 2 * np.sqrt(w * w2))
    got = frechet_distance(np.zeros(d), (u * w) @ u.T, np.zeros(d), (u * w2) @ u.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_never_negative_under_round_off():
    x = np.random.default_rng(7).normal(size=(50, 64)) * 1e-3
    assert fid_from_features(x, x * (1 + 1e-12)) >= 0.0


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros(10), np.zeros((5, 3)), "2-D"),
        (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2 samples"),
        (np.zeros((5, 3)), np.zeros((5, 4)), "feature dimensions differ"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), "NaN"),
        (np.array([["a", "b"], ["c", "d"]]), np.zeros((2, 2)), "real numbers"),
    ],
)
def test_fid_bad_features(a, b, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fid_from_features(a, b)


def test_frechet_distance_bad_statistics():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="covariance must have shape"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), eye)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), np.diag([1.0, -1.0, 1.0]), np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(3), eye, np.array([0, np.inf, 0]), eye)


# ------------------------------------------------------------------------------------------------
# Digit-feature extractor


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def digit_extractor(tmp_path_factory):
    return train_extractor(tmp_path_factory.mktemp("digitfeat"), "digits", epochs=8, batch_size=64)


def test_digit_classifier_accuracy_and_features(digit_extractor, digits):
    train, test = digits
    acc = digit_extractor.accuracy(test.images, test.labels)
    assert acc >= 0.9, acc  # held-out sklearn digits
    assert digit_extractor.name == DIGIT_FID_NAME == "digit-feature FID"
    f = digit_extractor.features(test.images[:37], batch_size=16)  # padded last batch
    assert f.shape == (37, digit_extractor.feature_dim) and f.dtype == np.float32
    np.testing.assert_allclose(f, digit_extractor.features(test.images[:37]), rtol=1e-5, atol=1e-5)
    # the standardised copy of the same split gives the same accuracy
    standardised = load_dataset("digits", "test", normalize=True)
    assert digit_extractor.accuracy(standardised.pixels01(), standardised.labels) == pytest.approx(acc)
    assert digit_extractor.info["dataset"] == "digits" and digit_extractor.info["train_seconds"] > 0


def test_digit_fid_separates_real_from_corrupted(digit_extractor, digits):
    train, test = digits
    real_vs_real = digit_extractor.fid(train.images[:300], test.images)
    rng = np.random.default_rng(0)
    shuffled = test.images.reshape(len(test.images), -1)
    shuffled = np.stack([row[rng.permutation(row.size)] for row in shuffled]).reshape(test.images.shape)
    real_vs_noise = digit_extractor.fid(train.images[:300], shuffled)
    feats = digit_extractor.features(test.images)
    scale = np.trace(np.cov(feats, rowvar=False))
    assert digit_extractor.fid(test.images, test.images) <= 1e-10 * scale
    assert real_vs_noise > 5 * real_vs_real, (real_vs_real, real_vs_noise)


def test_digit_extractor_save_load_roundtrip(digit_extractor, digits, tmp_path):
    path = tmp_path / "ext.npz"
    digit_extractor.save(path)
    loaded = DigitFeatureExtractor.load(path)
    assert loaded.image_shape == digit_extractor.image_shape and loaded.info == digit_extractor.info
    x = digits[1].images[:20]
    np.testing.assert_array_equal(loaded.features(x), digit_extractor.features(x))
    bad = tmp_path / "bad.npz"
    np.savez(bad, meta=np.asarray(json.dumps({"format": "other", "version": 1})))
    with pytest.raises(ValueError, match="unsupported format"):
        DigitFeatureExtractor.load(bad)
    with pytest.raises(FileNotFoundError):
        DigitFeatureExtractor.load(tmp_path / "missing.npz")


def test_digit_extractor_bad_input(digit_extractor, digits):
    with pytest.raises(ValueError, match=r"trained on images of shape \(N, 8, 8, 1\)"):
        digit_extractor.features(np.zeros((4, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match=r"pixel values in \[0, 1\]"):
        digit_extractor.features(load_dataset("digits", "test", normalize=True).images)
    with pytest.raises(ValueError, match="NaN"):
        digit_extractor.features(np.full((2, 8, 8, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least 2 samples"):
        digit_extractor.fid(digits[1].images[:1], digits[1].images)
    with pytest.raises(ValueError, match="epochs=0 is out of range"):
        train_extractor("unused", "digits", epochs=0)
    with pytest.raises(ValueError, match="random_shift=-1 is out of range"):
        train_extractor("unused", "digits", random_shift=-1)


@pytest.mark.slow
def test_digit_classifier_on_mnist5k(tmp_path):
    ext = train_extractor(tmp_path, "mnist5k", epochs=10)
    test = load_dataset("mnist5k", "test")
    assert ext.accuracy(test.images, test.labels) >= 0.95


# ------------------------------------------------------------------------------------------------
# InceptionV3


@pytest.fixture(scope="module")
def random_inception():
    return inc.random_inception_params(0)


def test_inception_parameter_layout():
    shapes = inc.inception_param_shapes()
    assert len(shapes) == 5 * 94  # 94 BasicConv layers, each kernel + 4 batch-norm arrays
    assert shapes["Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
    assert shapes["Mixed_5b/branch_pool/conv/kernel"] == (1, 1, 192, 32)
    assert shapes["Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
    assert shapes["Mixed_6e/branch7x7dbl_4/conv/kernel"] == (7, 1, 192, 192)
    assert shapes["Mixed_7a/branch3x3_2/conv/kernel"] == (3, 3, 192, 320)
    assert shapes["Mixed_7c/branch3x3dbl_1/conv/kernel"] == (1, 1, 2048, 448)
    assert shapes["Mixed_7c/branch_pool/bn/var"] == (192,)


def test_inception_feature_shapes(random_inception):
    """The standard path (grey 28×28 → RGB 299×299 → pool3), random weights, batch 2: shapes
    only (abstract evaluation; a real forward pass compiles for ~10 s, see the slow tests)."""
    out = jax.eval_shape(
        lambda v, x: inc.InceptionV3().apply(v, inc.preprocess(x)),
        random_inception,
        jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32),
    )
    assert out.shape == (2, inc.INCEPTION_FEATURE_DIM) and out.dtype == jnp.float32
    rgb = jax.eval_shape(inc.preprocess, jax.ShapeDtypeStruct((5, 64, 48, 3), jnp.float32))
    assert rgb.shape == (5, 299, 299, 3)


@pytest.mark.slow
def test_inception_forward_random_weights(random_inception):
    # a real forward pass at the smallest input size, batches padded
    x = np.random.default_rng(0).uniform(size=(3, 75, 75, 3)).astype(np.float32)
    f = inc.inception_features(random_inception, x, size=None, batch_size=2)
    assert f.shape == (3, 2048) and np.isfinite(f).all() and f.min() >= 0.0
    assert np.abs(f).max() > 0
    g = inc.inception_features(random_inception, x[1:2], size=None, batch_size=2)
    np.testing.assert_allclose(g[0], f[1], rtol=1e-4, atol=1e-5)
    # the standard 299×299 path
    f = inc.inception_features(random_inception, np.random.default_rng(0).uniform(size=(2, 32, 32, 3)))
    assert f.shape == (2, 2048) and np.isfinite(f).all()


def test_inception_bad_input(random_inception, tmp_path):
    with pytest.raises(ValueError, match="at least 75"):
        inc.inception_features(random_inception, np.zeros((1, 28, 28, 1)), size=None)
    with pytest.raises(ValueError, match=r"\(N >= 1, H, W, 1 or 3\)"):
        inc.inception_features(random_inception, np.zeros((1, 28, 28, 2)))
    with pytest.raises(ValueError, match=r"pixel values in \[0, 1\]"):
        inc.inception_features(random_inception, np.full((1, 28, 28, 1), 255.0))
    with pytest.raises(ValueError, match="H, W >= 75"):
        inc.InceptionV3().apply(random_inception, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(FileNotFoundError, match="inception_weights.md"):
        inc.load_inception_params(tmp_path / "none.npz")


def test_inception_params_save_load_and_errors(random_inception, tmp_path):
    path = tmp_path / "inc.npz"
    inc.save_inception_params(random_inception, path)
    loaded = inc.load_inception_params(path)
    a, b = inc.flatten_params(random_inception), inc.flatten_params(loaded)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the same checks guard saving (in memory, before anything is written) and loading
    flat = {k: np.asarray(v) for k, v in a.items()}
    missing = dict(flat)
    del missing["Mixed_6c/branch1x1/bn/mean"]
    with pytest.raises(ValueError, match=r"1 missing arrays \['Mixed_6c/branch1x1/bn/mean'\]"):
        inc.save_inception_params(inc.unflatten_params(missing), tmp_path / "missing.npz")
    wrong = dict(flat)
    wrong["Conv2d_1a_3x3/conv/kernel"] = flat["Conv2d_1a_3x3/conv/kernel"].transpose(3, 2, 0, 1)  # OIHW
    with pytest.raises(ValueError, match="wrong shape"):
        inc.save_inception_params(inc.unflatten_params(wrong), tmp_path / "wrong.npz")
    assert not (tmp_path / "missing.npz").exists() and not (tmp_path / "wrong.npz").exists()
    np.savez(tmp_path / "small.npz", **{k: flat[k] for k in list(flat)[:5]})
    with pytest.raises(ValueError, match="465 missing arrays"):
        inc.load_inception_params(tmp_path / "small.npz")


def _as_torch_state_dict(variables):
    """The inverse of the converter's mapping: what pytorch-fid's .pth holds for these weights."""
    names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    sd = {}
    for key, value in inc.flatten_params(variables).items():
        layer, kind, leaf = key.rsplit("/", 2)
        layer = layer.replace("/", ".")
        value = np.array(value)  # a writable copy (torch.from_numpy needs one)
        if kind == "conv":
            sd[f"{layer}.conv.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        else:
            sd[f"{layer}.bn.{names[leaf]}"] = value
    return sd


def test_convert_pytorch_state_dict(random_inception, tmp_path):
    torch = pytest.importorskip("torch")
    sd = _as_torch_state_dict(random_inception)
    sd["fc.weight"], sd["fc.bias"] = np.zeros((10, 2048), np.float32), np.zeros(10, np.float32)  # dropped
    pth = tmp_path / "pt_inception.pth"
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    tensors["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(tensors, pth)
    convert_main([str(pth), str(tmp_path / "out.npz")])
    loaded = inc.flatten_params(inc.load_inception_params(tmp_path / "out.npz"))
    ref = inc.flatten_params(random_inception)
    assert all(np.array_equal(loaded[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="unexpected entries"):
        convert_state_dict({**sd, "Mixed_5b.branch1x1.conv.bias": np.zeros(64)})


def test_inception_building_blocks_match_torch(random_inception):
    """The ops where a port goes wrong, each against PyTorch with the converted weights:
    an asymmetric (1, 7) conv + batch norm, TF-style average pool, padded max pool, resize."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 11, 128)).astype(np.float32)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    layer = {
        k: np.asarray(v)
        for k, v in inc.flatten_params(random_inception).items()
        if k.startswith("Mixed_6b/branch7x7_2/")
    }
    layer["Mixed_6b/branch7x7_2/bn/mean"] = rng.normal(size=128).astype(np.float32)
    layer["Mixed_6b/branch7x7_2/bn/var"] = rng.uniform(0.5, 2, size=128).astype(np.float32)
    layer["Mixed_6b/branch7x7_2/bn/scale"] = rng.uniform(0.5, 2, size=128).astype(np.float32)
    layer["Mixed_6b/branch7x7_2/bn/bias"] = rng.normal(size=128).astype(np.float32)
    v = inc.unflatten_params({k.split("/", 2)[2]: val for k, val in layer.items()})
    ours = inc.BasicConv(128, (1, 7), padding=(0, 3)).apply(v, jnp.asarray(x))
    sd = _as_torch_state_dict({"params": {"L": v["params"]}, "batch_stats": {"L": v["batch_stats"]}})
    t = F.conv2d(tx, torch.from_numpy(sd["L.conv.weight"]), padding=(0, 3))
    t = F.batch_norm(
        t,
        *(torch.from_numpy(sd[f"L.bn.{n}"]) for n in ("running_mean", "running_var", "weight", "bias")),
        training=False,
        eps=1e-3,
    )
    np.testing.assert_allclose(
        np.asarray(ours), F.relu(t).numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )

    pool = F.avg_pool2d(tx, 3, stride=1, padding=1, count_include_pad=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(inc.avg_pool_3x3_same(jnp.asarray(x))), pool, rtol=1e-5, atol=1e-6)
    mpool = F.max_pool2d(tx, 3, stride=1, padding=1).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(inc._max_pool_3x3_same(jnp.asarray(x))), mpool)

    for size in (28, 320):  # up- and down-sampling to 299
        img = rng.uniform(size=(1, size, size, 1)).astype(np.float32)
        ref = F.interpolate(
            torch.from_numpy(img.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear", align_corners=False
        )
        ref = 2 * ref.repeat(1, 3, 1, 1).numpy().transpose(0, 2, 3, 1) - 1
        np.testing.assert_allclose(np.asarray(inc.preprocess(img)), ref, rtol=1e-5, atol=1e-5)
