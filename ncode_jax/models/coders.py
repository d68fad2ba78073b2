"""Encoder and decoder architectures of the paper's table A.1 (appendix A.5), in Flax linen.

Every encoder ends with ``FC_k ↦ Norm``: a dense layer with ``k`` outputs followed by a
*component-wise normalisation* — a batch normalisation of each output component (batch
statistics while training, running averages at evaluation) with a learned scale and shift. For
AutoN-CODE the ``k = 2n`` outputs are the controls θ of the latent linear system; for the VAE they
are the mean and log-variance; for the vanilla AE (``k = n``) the code itself.

=============== ======================================= =========================================
name            encoder                                 decoder
=============== ======================================= =========================================
``mlp``         Flatten, FC_400 ↦ ReLU, FC_k ↦ Norm     FC_400 ↦ ReLU, FC_(h·w·c) (logits)
``conv``        [Conv_c ↦ BN ↦ ReLU] per width (stride  FC_(c_last·(h/4)·(w/4)) ↦ Norm,
                2, SAME), Flatten, FC_k ↦ Norm          [ConvT_c ↦ BN ↦ ReLU] for the widths but
                                                        the last, reversed (stride 2), ConvT_C
                                                        (stride 1)
=============== ======================================= =========================================

Presets (:data:`ARCHITECTURES`): ``mnist`` (MLP 400, latent 25), ``cifar10`` (conv 256/512/1024,
4×4 kernels, latent 128), ``celeba`` (conv 256/512/1024, 5×5 kernels, latent 64) and ``small``
(conv 16/32/64, 4×4 kernels, latent 8: for tests and CPU experiments on tiny images).

Deviation from table A.1, stated once: the table's conv decoder starts from an 8×8 map for both
CIFAR-10 (32×32) and CelebA (64×64), but two stride-2 transposed convolutions and a stride-1 one
cannot turn 8×8 into 64×64. Here the decoder starts from ``(h/4)×(w/4)`` (8×8 for CIFAR-10, as in
the table; 16×16 for CelebA; 7×7 for MNIST-sized images), so image sides must be multiples of 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import flax.linen as nn
from jaxtyping import Array

CODER_KINDS = ("mlp", "conv")
BN_MOMENTUM = 0.9


class ComponentNorm(nn.Module):
    """Batch normalisation of every component of a ``(B, k)`` vector (the table's ``Norm``).

    ``scale_init`` is the initial learned scale (AutoN-CODE starts its controls small so that the
    flow on ``[0, 10]`` starts near the identity map, see :mod:`~ncode_jax.models.autoencoder`).
    """

    scale_init: float = 1.0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                            scale_init=nn.initializers.constant(self.scale_init))(x)


class MLPEncoder(nn.Module):
    """Flatten, ``FC_hidden ↦ ReLU`` per hidden width, ``FC_out ↦ Norm``."""

    out: int
    hidden: Sequence[int] = (400,)
    norm_scale: float = 1.0

    @nn.compact
    def __call__(self, images: Array, train: bool) -> Array:
        h = images.reshape(images.shape[0], -1)
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
        return ComponentNorm(self.norm_scale)(nn.Dense(self.out)(h), train)


class MLPDecoder(nn.Module):
    """``FC_hidden ↦ ReLU`` per hidden width (reversed), ``FC_(h·w·c)``, reshaped to the image."""

    image_shape: tuple[int, int, int]
    hidden: Sequence[int] = (400,)

    @nn.compact
    def __call__(self, z: Array, train: bool) -> Array:
        del train
        h = z
        for width in reversed(tuple(self.hidden)):
            h = nn.relu(nn.Dense(width)(h))
        out = nn.Dense(math.prod(self.image_shape))(h)
        return out.reshape(z.shape[0], *self.image_shape)


class ConvEncoder(nn.Module):
    """``Conv_c ↦ BN ↦ ReLU`` (stride 2) per width, Flatten, ``FC_out ↦ Norm``."""

    out: int
    widths: Sequence[int] = (256, 512, 1024)
    kernel: int = 4
    norm_scale: float = 1.0

    @nn.compact
    def __call__(self, images: Array, train: bool) -> Array:
        h = images
        for width in self.widths:
            h = nn.Conv(width, (self.kernel, self.kernel), strides=(2, 2), padding="SAME")(h)
            h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(h))
        h = h.reshape(h.shape[0], -1)
        return ComponentNorm(self.norm_scale)(nn.Dense(self.out)(h), train)


class ConvDecoder(nn.Module):
    """``FC ↦ Norm`` to a ``(h/4, w/4, widths[-1])`` map, ``ConvT_c ↦ BN ↦ ReLU`` (stride 2) for
    ``widths[-2::-1]``, then ``ConvT_channels`` (stride 1, no activation)."""

    image_shape: tuple[int, int, int]
    widths: Sequence[int] = (256, 512, 1024)
    kernel: int = 4

    @nn.compact
    def __call__(self, z: Array, train: bool) -> Array:
        h_img, w_img, c_img = self.image_shape
        base = (h_img // 4, w_img // 4, self.widths[-1])
        h = nn.Dense(math.prod(base))(z)
        h = ComponentNorm()(h, train).reshape(z.shape[0], *base)
        for width in reversed(tuple(self.widths[:-1])):
            h = nn.ConvTranspose(width, (self.kernel, self.kernel), strides=(2, 2), padding="SAME")(h)
            h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(h))
        return nn.ConvTranspose(c_img, (self.kernel, self.kernel), strides=(1, 1), padding="SAME")(h)


@dataclass(frozen=True)
class Architecture:
    """A named encoder/decoder pair and its latent size (the presets of table A.1)."""

    kind: str
    latent_dim: int
    widths: tuple[int, ...]
    kernel: int = 4

    def __post_init__(self):
        if self.kind not in CODER_KINDS:
            raise ValueError(f"unknown coder kind {self.kind!r}; choose one of {list(CODER_KINDS)}")
        if self.latent_dim < 1 or not self.widths or min(self.widths) < 1 or self.kernel < 1:
            raise ValueError(f"invalid architecture {self}: latent_dim, widths and kernel must be >= 1")
        if self.kind == "conv" and len(self.widths) != 3:
            raise ValueError(f"a conv architecture has three widths (two stride-2 transposed "
                             f"convolutions in the decoder), got {self.widths}")

    def check_image_shape(self, image_shape: tuple[int, ...]) -> None:
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (height, width, channels), got {tuple(image_shape)}")
        if self.kind == "conv" and (image_shape[0] % 4 or image_shape[1] % 4):
            raise ValueError(f"the conv decoder upsamples (h/4, w/4) twice by 2, so image sides must "
                             f"be multiples of 4; got {tuple(image_shape)}")

    def encoder(self, out: int, norm_scale: float = 1.0) -> nn.Module:
        if self.kind == "mlp":
            return MLPEncoder(out, self.widths, norm_scale)
        return ConvEncoder(out, self.widths, self.kernel, norm_scale)

    def decoder(self, image_shape: tuple[int, int, int]) -> nn.Module:
        self.check_image_shape(image_shape)
        if self.kind == "mlp":
            return MLPDecoder(tuple(image_shape), self.widths)
        return ConvDecoder(tuple(image_shape), self.widths, self.kernel)


ARCHITECTURES: dict[str, Architecture] = {
    "mnist": Architecture("mlp", 25, (400,)),
    "cifar10": Architecture("conv", 128, (256, 512, 1024), kernel=4),
    "celeba": Architecture("conv", 64, (256, 512, 1024), kernel=5),
    "small": Architecture("conv", 8, (16, 32, 64), kernel=4),
}


def architecture(name: str, *, latent_dim: int | None = None, widths: Sequence[int] | None = None,
                 kernel: int | None = None) -> Architecture:
    """A preset of :data:`ARCHITECTURES`, optionally with another latent size, widths or kernel."""
    try:
        arch = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None
    return Architecture(arch.kind,
                        arch.latent_dim if latent_dim is None else int(latent_dim),
                        arch.widths if widths is None else tuple(int(w) for w in widths),
                        arch.kernel if kernel is None else int(kernel))

