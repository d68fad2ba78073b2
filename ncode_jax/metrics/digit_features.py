"""Features for the **digit-feature FID**: a small conv classifier trained on a digit training split.

The standard FID uses ImageNet InceptionV3 features, which say little about 28×28 grey digits and
need 299×299 inputs. For digit data this project instead trains a small classifier on the
*training* split and takes its penultimate layer as the feature map. Numbers computed with it are
called **"digit-feature FID"** (:data:`DIGIT_FID_NAME`) everywhere; they are not comparable to
Inception FIDs from papers (the N-CODE paper's figure 9 uses Inception features), only to other
digit-feature FIDs computed with the same extractor file.

Network (NHWC, ``"SAME"`` padding, ReLU)::

    image (H, W, C) in [0, 1] → (x − mean)/std → conv 5×5, 16 ch, stride 2 → conv 3×3, 32 ch,
    stride 2 → flatten → dense 128 (features, after ReLU) → dense num_classes (logits)

(~0.5 MFLOP per 28×28 image). This module holds only the feature map: the network as a pure
function of its weights (:func:`init_params`, :func:`logits`) and :class:`DigitFeatureExtractor`
(trained weights + the input standardisation; ``features``, ``fid``, ``save``/``load``). It is
trained like every other model of the project, on the run engine: ``train/digit_features.py``
(AdamW on cross-entropy with small random translations, resumable, deterministic given the seed).

Pixel convention: :meth:`DigitFeatureExtractor.features` takes images with values in ``[0, 1]``
(``load_dataset(..., normalize=False)``, or decoder outputs). Values far outside (below -0.5 or
above 1.5) raise, because they are almost always standardised images passed by mistake
(``Dataset.pixels01()`` undoes the standardisation). Like every metric of the package, it takes
arrays, not the data layer's types.

Usage::

    from train.digit_features import train_extractor          # or python -m train.digit_features

    extractor = train_extractor("runs/digit_features", "mnist5k")
    extractor.fid(real_images, generated_images)              # digit-feature FID
    extractor.save("digit_features.npz"); DigitFeatureExtractor.load("digit_features.npz")
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..compiler import jit
from ..fields import add_bias, dense
from .batching import map_batches
from .fid import fid_from_features

__all__ = ["DIGIT_FID_NAME", "DigitFeatureExtractor", "init_params", "logits"]

#: The name under which FIDs computed with these features are reported.
DIGIT_FID_NAME = "digit-feature FID"

_FORMAT_VERSION = 1
_CONV = ((5, 16, 2), (3, 32, 2))  # (kernel, channels, stride) of the two conv layers
_PIXEL_RANGE = (-0.5, 1.5)


def _conv_out(size: int) -> int:
    for _, _, stride in _CONV:
        size = -(-size // stride)  # "SAME" padding: ceil(size / stride)
    return size


def init_params(seed: int, image_shape: tuple[int, int, int], num_classes: int, feature_dim: int) -> dict:
    """He-normal weights, zero biases (numpy RNG: no JAX compilation for the initialisation)."""
    h, w, c = image_shape
    rng = np.random.default_rng(seed)
    params = {}
    c_in = c
    for i, (k, c_out, _) in enumerate(_CONV):
        params[f"conv{i}_w"] = rng.normal(0.0, math.sqrt(2.0 / (k * k * c_in)), (k, k, c_in, c_out))
        params[f"conv{i}_b"] = np.zeros((c_out,))
        c_in = c_out
    flat = _conv_out(h) * _conv_out(w) * c_in
    params["fc_w"] = rng.normal(0.0, math.sqrt(2.0 / flat), (flat, feature_dim))
    params["fc_b"] = np.zeros((feature_dim,))
    params["out_w"] = rng.normal(0.0, 1.0 / math.sqrt(feature_dim), (feature_dim, num_classes))
    params["out_b"] = np.zeros((num_classes,))
    return {k: v.astype(np.float32) for k, v in params.items()}


def _features(params: dict, images, mean, std):
    x = (images - jnp.broadcast_to(mean, images.shape)) / jnp.broadcast_to(std, images.shape)
    for i, (_, _, stride) in enumerate(_CONV):
        x = jax.lax.conv_general_dilated(
            x, params[f"conv{i}_w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(add_bias(x, params[f"conv{i}_b"]))
    x = x.reshape(x.shape[0], -1)
    return jax.nn.relu(dense(x, params["fc_w"], params["fc_b"]))


def logits(params: dict, images, mean, std):
    """Class logits ``(N, num_classes)`` of images ``(N, H, W, C)`` in [0, 1]."""
    return dense(_features(params, images, mean, std), params["out_w"], params["out_b"])


_features_jit = jit(_features)
_logits_jit = jit(logits)


@dataclass(frozen=True)
class DigitFeatureExtractor:
    """A trained digit classifier whose penultimate layer gives the digit-feature-FID features.

    Attributes:
        params: the network's weights (numpy float32 arrays, see the module docstring).
        image_shape: ``(H, W, C)`` it was trained on; other shapes are rejected.
        num_classes: number of classes of the training set.
        mean, std: per-channel input standardisation applied inside the network (the training
            set's fixed constants); inputs themselves are in ``[0, 1]``.
        info: provenance (dataset, split, seed, epochs, training time, ...), saved with the weights.
    """

    params: dict
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.params["fc_b"].shape[0])

    @property
    def name(self) -> str:
        return DIGIT_FID_NAME

    def _check_images(self, images) -> np.ndarray:
        x = np.asarray(images)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"{DIGIT_FID_NAME}: images must be real numbers, got dtype {x.dtype}")
        if x.ndim == 3 and self.image_shape[2] == 1 and x.shape[1:] == self.image_shape[:2]:
            x = x[..., None]  # (N, H, W) grey images
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"{DIGIT_FID_NAME}: the extractor was trained on images of shape (N, "
                f"{', '.join(map(str, self.image_shape))}), got {x.shape}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{DIGIT_FID_NAME}: no images")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{DIGIT_FID_NAME}: images contain NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < _PIXEL_RANGE[0] or hi > _PIXEL_RANGE[1]:
            raise ValueError(
                f"{DIGIT_FID_NAME}: images must have pixel values in [0, 1], got range [{lo:.3g}, "
                f"{hi:.3g}]; standardised images (normalize=True) must be mapped back with "
                f"x * std + mean first"
            )
        return x

    def _batched(self, fn, images, batch_size: int) -> np.ndarray:
        x = self._check_images(images)
        params = jax.tree.map(jnp.asarray, self.params)
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return map_batches(lambda chunk: fn(params, jnp.asarray(chunk), mean, std), x, batch_size)

    def features(self, images, *, batch_size: int = 1000) -> np.ndarray:
        """Penultimate-layer features ``(N, feature_dim)`` float32 of images ``(N, H, W, C)`` in [0, 1]."""
        return self._batched(_features_jit, images, batch_size)

    def logits(self, images, *, batch_size: int = 1000) -> np.ndarray:
        return self._batched(_logits_jit, images, batch_size)

    def predict(self, images, *, batch_size: int = 1000) -> np.ndarray:
        return self.logits(images, batch_size=batch_size).argmax(axis=-1)

    def accuracy(self, images, labels, *, batch_size: int = 1000) -> float:
        """Fraction of ``images`` ``(N, H, W, C)`` in [0, 1] classified as their ``labels``
        ``(N,)`` int; a ValueError for other shapes or pixel ranges (see :meth:`features`)."""
        pred = self.predict(images, batch_size=batch_size)
        labels = np.asarray(labels)
        if labels.shape != pred.shape:
            raise ValueError(f"{DIGIT_FID_NAME}: {pred.shape[0]} images but labels of shape {labels.shape}")
        return float(np.mean(pred == labels))

    def fid(self, images_a, images_b, *, batch_size: int = 1000) -> float:
        """The digit-feature FID between two image sets (each ``(N, H, W, C)`` in [0, 1], N >= 2)."""
        return fid_from_features(
            self.features(images_a, batch_size=batch_size), self.features(images_b, batch_size=batch_size)
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write weights and metadata to one ``.npz`` file (written atomically)."""
        path = Path(path)
        meta = {
            "format": "ncode_jax.digit_features",
            "version": _FORMAT_VERSION,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "info": self.info,
        }
        arrays = {f"param/{k}": np.asarray(v) for k, v in self.params.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DigitFeatureExtractor:
        """Read an extractor written by :meth:`save`; raises ``ValueError`` for other files."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no digit feature extractor at {str(path)!r}")
        with np.load(path, allow_pickle=False) as data:
            if "meta" not in data.files:
                raise ValueError(f"{str(path)!r} is not a digit feature extractor file (no 'meta' entry)")
            meta = json.loads(str(data["meta"]))
            params = {
                k.removeprefix("param/"): np.asarray(data[k]) for k in data.files if k.startswith("param/")
            }
        if meta.get("format") != "ncode_jax.digit_features" or meta.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}"
            )
        image_shape = tuple(int(s) for s in meta["image_shape"])
        feature_dim = int(params["fc_b"].shape[0]) if "fc_b" in params else 1
        expected = init_params(0, image_shape, int(meta["num_classes"]), feature_dim)
        got = {k: v.shape for k, v in params.items()}
        want = {k: v.shape for k, v in expected.items()}
        if got != want:
            raise ValueError(f"{str(path)!r}: parameter shapes {got} do not match the network {want}")
        return cls(
            params=params,
            image_shape=image_shape,
            num_classes=int(meta["num_classes"]),
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            info=meta.get("info", {}),
        )
