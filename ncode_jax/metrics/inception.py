"""InceptionV3 pool3 features (2048-d) in Flax linen, for the standard FID.

The architecture is that of the network used by the standard FID implementations (TTUR's
TensorFlow graph ``inception-2015-12-05``, ported to PyTorch by pytorch-fid as
``pt_inception-2015-12-05-6726825d.pth``): torchvision's InceptionV3 layout with the FID
changes — the average pools inside the Mixed_5*, Mixed_6b–e and Mixed_7b blocks exclude the
padding from their average (``count_include_pad=False``), and the pool branch of the last block
(Mixed_7c) is a 3×3 **max** pool. Every conv is ``conv (no bias) → batch norm (ε = 1e-3,
running statistics) → ReLU``. Features are the global average of the last block's output
(pool3), shape ``(N, 2048)``; the 1008-way classifier is not built.

No weights ship with this project and none are downloaded: :func:`load_inception_params` reads
a file the user supplies. ``docs/inception_weights.md`` explains how to make it from the
pytorch-fid weights with ``python -m ncode_jax.metrics.convert_inception in.pth out.npz``.

Weight file format (``.npz``, float32), one entry per array, keyed by the torchvision/pytorch-fid
layer name with ``/`` separators::

    <layer>/conv/kernel   (kh, kw, c_in, c_out)   conv weight, HWIO (torch's OIHW transposed)
    <layer>/bn/scale      (c_out,)                batch-norm γ   (torch ``bn.weight``)
    <layer>/bn/bias       (c_out,)                batch-norm β   (torch ``bn.bias``)
    <layer>/bn/mean       (c_out,)                running mean   (torch ``bn.running_mean``)
    <layer>/bn/var        (c_out,)                running var    (torch ``bn.running_var``)

e.g. ``Conv2d_1a_3x3/conv/kernel`` or ``Mixed_6b/branch7x7_2/bn/var`` (94 conv layers, 470
arrays; :func:`inception_param_shapes` lists them all). Loading checks that exactly these
names are present with exactly these shapes.

Inputs. :func:`inception_features` (and :func:`preprocess`) take NHWC images with values in
``[0, 1]``, 1 or 3 channels (grey images are repeated to RGB), of any size: they are resized
to 299×299 with bilinear interpolation (half-pixel centres, no antialiasing — the same as
pytorch-fid's ``F.interpolate(..., mode="bilinear", align_corners=False)``) and mapped to
``[-1, 1]`` by ``2x − 1``. The :class:`InceptionV3` module itself takes already preprocessed
images in ``[-1, 1]``, of size at least 75×75. Since the TF graph's own resize differs slightly
from pytorch-fid's, values match pytorch-fid's FID, not TTUR's to the last digit.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..compiler import jit
from .batching import map_batches

__all__ = [
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_SIZE",
    "InceptionV3",
    "flatten_params",
    "inception_features",
    "inception_param_shapes",
    "load_inception_params",
    "preprocess",
    "random_inception_params",
    "save_inception_params",
    "unflatten_params",
]

INCEPTION_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
_MIN_SIZE = 75  # smallest input the stride/pool chain maps to a non-empty 1×1 grid
_BN_EPS = 1e-3


def _pad(p: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (p, p) if isinstance(p, int) else p
    return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
    """conv (no bias) → batch norm (running statistics) → ReLU, named ``conv`` and ``bn``."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features,
            self.kernel,
            (self.strides, self.strides),
            padding=_pad(self.padding),
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
        return nn.relu(x)


def avg_pool_3x3_same(x):
    """3×3, stride 1, padding 1 average pool that averages only real pixels (TF's, and torch's
    ``count_include_pad=False``)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c7, name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """``max_pool=False``: Mixed_7b (average pool branch); ``True``: Mixed_7c (FID's max pool)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool_3x3_same(x) if self.max_pool else avg_pool_3x3_same(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3 up to pool3. Input: NHWC float, 3 channels, values in ``[-1, 1]``, height
    and width >= 75 (299 for the standard FID; see :func:`preprocess`). Output: ``(N, 2048)``."""

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < _MIN_SIZE:
            raise ValueError(
                f"InceptionV3 expects preprocessed images (N, H, W, 3) with H, W >= {_MIN_SIZE}, "
                f"got shape {x.shape}; use preprocess() / inception_features() for raw images"
            )
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Parameters: names, shapes, files


def _abstract_variables() -> Any:
    x = jax.ShapeDtypeStruct((1, _MIN_SIZE, _MIN_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)


def flatten_params(variables: Mapping) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` → ``{"<layer>/conv/kernel": array, ...}``."""
    flat = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            flat["/".join(str(k.key) for k in path)] = leaf
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten_params`: ``bn/mean`` and ``bn/var`` go to ``batch_stats``."""
    variables: dict = {"params": {}, "batch_stats": {}}
    for name, value in flat.items():
        *layers, leaf = name.split("/")
        collection = "batch_stats" if leaf in ("mean", "var") else "params"
        node = variables[collection]
        for layer in layers:
            node = node.setdefault(layer, {})
        node[leaf] = value
    return variables


def inception_param_shapes() -> dict[str, tuple[int, ...]]:
    """Every array the weight file must hold, name → shape (see the module docstring)."""
    return dict(_param_shapes())


@functools.cache
def _param_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten_params(_abstract_variables()).items()}


def _check_flat(flat: Mapping[str, Any], source: str) -> None:
    want = inception_param_shapes()
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise ValueError(
            f"{source}: not an InceptionV3 FID weight file: {len(missing)} missing arrays "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(extra)} unexpected arrays "
            f"{extra[:5]}{'...' if len(extra) > 5 else ''} (see docs/inception_weights.md)"
        )
    wrong = [(k, tuple(np.shape(flat[k])), want[k]) for k in want if tuple(np.shape(flat[k])) != want[k]]
    if wrong:
        k, got, exp = wrong[0]
        raise ValueError(
            f"{source}: {len(wrong)} arrays have the wrong shape, e.g. {k!r} is {got}, expected {exp} "
            f"(conv kernels must be HWIO: (kh, kw, c_in, c_out))"
        )
    for k in want:
        if not np.isfinite(np.asarray(flat[k])).all():
            raise ValueError(f"{source}: array {k!r} contains NaN or inf")


def save_inception_params(variables: Mapping, path: str | os.PathLike) -> None:
    """Write ``variables`` as the ``.npz`` weight file described in the module docstring."""
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(variables).items()}
    _check_flat(flat, "save_inception_params")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, path)


def load_inception_params(path: str | os.PathLike) -> dict:
    """Load the user-supplied weight file (``.npz``, format in the module docstring) into Flax
    variables ``{"params": ..., "batch_stats": ...}`` for :class:`InceptionV3`.

    Raises ``FileNotFoundError`` if there is no file and ``ValueError`` if any array is missing,
    unexpected, of the wrong shape or not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no InceptionV3 weight file at {str(path)!r}; no weights ship with ncode_jax — convert the "
            f"pytorch-fid weights as described in docs/inception_weights.md"
        )
    with np.load(path, allow_pickle=False) as data:
        flat = {k: np.asarray(data[k], np.float32) for k in data.files}
    _check_flat(flat, str(path))
    return jax.tree.map(jnp.asarray, unflatten_params(flat))


def random_inception_params(seed: int = 0) -> dict:
    """Random weights of the right shapes (He-normal kernels, unit batch norm) — for tests and
    shape checks only; features from them mean nothing."""
    flat = {}
    rng = np.random.default_rng(seed)
    for name, shape in inception_param_shapes().items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:3]))
            flat[name] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        elif leaf in ("scale", "var"):
            flat[name] = np.ones(shape, np.float32)
        else:
            flat[name] = np.zeros(shape, np.float32)
    return jax.tree.map(jnp.asarray, unflatten_params(flat))


# ----------------------------------------------------------------------------------------------
# Preprocessing and batched features


def preprocess(images, *, size: int | None = INCEPTION_SIZE):
    """Raw NHWC images in ``[0, 1]`` (1 or 3 channels) → RGB, bilinear resize to ``size×size``
    (``None``: keep the size), ``2x − 1``. Works on numpy or JAX arrays, inside ``jit`` too."""
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"inception: images must be (N, H, W, 1 or 3) in [0, 1], got shape {x.shape}")
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if size is not None and x.shape[1:3] != (size, size):
        # half-pixel centres and no antialiasing = torch F.interpolate(bilinear, align_corners=False)
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
    return 2.0 * x - 1.0


def _apply(variables, images, size):
    return InceptionV3().apply(variables, preprocess(images, size=size))


_apply_jit = jit(_apply, static_argnums=2)  # CPU: XLA's multi-threaded convolutions (1.9x)


def inception_features(
    variables: Mapping, images, *, batch_size: int = 50, size: int | None = INCEPTION_SIZE
) -> np.ndarray:
    """Pool3 features ``(N, 2048)`` float32 of raw NHWC images in ``[0, 1]``, computed in
    fixed-size batches (the last one padded, so one compilation). ``size=None`` skips the
    resize (inputs must then be at least 75×75; not the standard FID)."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(
            f"inception_features: images must be (N >= 1, H, W, 1 or 3) in [0, 1], got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("inception_features: images contain NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -0.5 or hi > 1.5:
        raise ValueError(
            f"inception_features: images must have pixel values in [0, 1], got range [{lo:.3g}, {hi:.3g}]"
        )
    if size is None and min(x.shape[1:3]) < _MIN_SIZE:
        raise ValueError(
            f"inception_features: with size=None images must be at least {_MIN_SIZE}×{_MIN_SIZE}, "
            f"got {x.shape}"
        )
    return map_batches(lambda chunk: _apply_jit(variables, chunk, size), x.astype(np.float32), batch_size)
