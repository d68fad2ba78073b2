"""The paper's convolutional vector field (sec. 5.2) with fast *per-sample* kernels.

``f(t, x, θ) = W₃ ⋆ σ(W₂ ⋆ σ(W₁ ⋆ x + b₁) + b₂) + b₃`` on an NHWC state ``x`` of shape
``(B, H, W, C)``: a 1×1 convolution ``C → hidden``, a 3×3 ``'SAME'`` (zero-padded) convolution
``hidden → hidden`` and a 1×1 convolution ``hidden → C``, each with a bias.

With shared θ ``(P,)`` (NODE/ANODE) this is an ordinary conv block. With per-sample θ ``(B, P)``
(N-CODE) every image is convolved with its *own* kernels, which is where naive JAX is slow on
CPU (DESIGN.md fact 3): ``jax.vmap(lax.conv)`` becomes a grouped convolution (~30× slower than
shared kernels), and XLA's transpose of a convolution w.r.t. its *kernel* is slow even with
shared kernels (a single-feature convolution with a 28×28 "window").

What is fast here, measured in ``benchmarks/conv_block.py`` (see benchmarks/README.md):

* the **forward** pass and the **input gradient** are ordinary convolutions
  (``lax.conv_general_dilated``; the input gradient of a stride-1 ``'SAME'`` 3×3 convolution is
  the convolution of the output cotangent with the spatially flipped, in/out-transposed kernel);
* the **kernel gradient** is a matrix product ``im2col(x)ᵀ @ g`` — ``(9·C, H·W) @ (H·W, D)`` per
  image — instead of XLA's kernel-transpose convolution (:func:`conv3x3` has a ``custom_vjp``);
* per-sample kernels run image by image with :func:`jax.lax.map` (a loop, not a ``vmap``), so
  each image is a plain batch-1 convolution and its intermediates (``H·W·hidden`` floats) stay
  in cache. :class:`ConvBlockField` maps the *whole block* per image. Under a data-parallel
  mesh these loops run per device over its own images (:mod:`ncode_jax.sharding`).

The custom VJP makes these functions reverse-mode only (``jax.grad``/``jax.vjp``; forward-mode
``jax.jvp`` through them raises). :func:`naive_per_sample_conv` and ``impl="reference"`` are the
plain-autodiff references used by the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from .fields import VectorField, activation
from .layout import ParamLayout, ParamSpec
from .sharding import batch_map, batch_sum

_DN = ("NHWC", "HWIO", "NHWC")
IMPLS = ("fast", "reference")


def _conv_same(x: Array, w: Array) -> Array:
    """Stride-1 ``'SAME'`` convolution, NHWC input ``(N, H, W, C)``, HWIO kernel."""
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)


def _flip_transpose(w: Float[Array, "kh kw C D"]) -> Float[Array, "kh kw D C"]:
    """Kernel of the input gradient: spatially flipped, in/out channels swapped."""
    return jnp.swapaxes(w[::-1, ::-1], 2, 3)


def _im2col(x: Float[Array, "H W C"]) -> Float[Array, "HW 9C"]:
    """3×3 zero-padded patches of one image; column ``(i·3 + j)·C + c`` is tap ``(i, j)``."""
    h, w, c = x.shape
    xp = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    taps = [xp[i : i + h, j : j + w] for i in range(3) for j in range(3)]
    return jnp.concatenate(taps, axis=-1).reshape(h * w, 9 * c)


def _kernel_grad(x: Float[Array, "H W C"], g: Float[Array, "H W D"]) -> Float[Array, "3 3 C D"]:
    """``∂⟨g, conv(x, w)⟩/∂w`` for one image: one ``(9C, HW) @ (HW, D)`` matrix product."""
    c, d = x.shape[-1], g.shape[-1]
    return (_im2col(x).T @ g.reshape(-1, d)).reshape(3, 3, c, d)


def _check_kernel(w: Array, c: int, batch: int | None, who: str) -> None:
    lead = () if batch is None else (batch,)
    if w.ndim != len(lead) + 4 or tuple(w.shape[: len(lead) + 3]) != (*lead, 3, 3, c):
        want = ", ".join(map(str, (*lead, 3, 3, c))) + ", D"
        raise ValueError(
            f"{who}: kernel has shape {tuple(w.shape)}, expected ({want}) for {c} input channels"
        )


# ---------------------------------------------------------------------------------------------
# One image, its own kernel
# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def _conv3x3(x, w):
    return _conv_same(x[None], w)[0]


def _conv3x3_fwd(x, w):
    return _conv3x3(x, w), (x, w)


def _conv3x3_bwd(res, g):
    x, w = res
    return _conv_same(g[None], _flip_transpose(w))[0], _kernel_grad(x, g)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3(x: Float[Array, "H W C"], w: Float[Array, "3 3 C D"]) -> Float[Array, "H W D"]:
    """3×3 ``'SAME'`` convolution of ONE image ``x (H, W, C)`` with kernel ``w (3, 3, C, D)``.

    Forward and input gradient are convolutions, the kernel gradient an im2col matrix product
    (reverse-mode only, see the module docstring). Map it over a batch with :func:`jax.lax.map`
    (:func:`per_sample_conv3x3`), not ``vmap``: a vmapped convolution is a grouped one.
    """
    if x.ndim != 3:
        raise ValueError(f"conv3x3: x must be one image (H, W, C), got shape {tuple(x.shape)}")
    _check_kernel(w, x.shape[-1], None, "conv3x3")
    return _conv3x3(x, w)


# ---------------------------------------------------------------------------------------------
# A batch, one shared kernel
# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def _shared_conv3x3(x, w):
    return _conv_same(x, w)


def _shared_fwd(x, w):
    return _conv_same(x, w), (x, w)


def _shared_bwd(res, g):
    x, w = res
    dx = _conv_same(g, _flip_transpose(w))

    # image by image: the im2col buffer stays small (9·H·W·C floats); per device when data-parallel
    dw = batch_sum(lambda xg: _kernel_grad(*xg), jnp.zeros(w.shape, w.dtype), (x, g))
    return dx, dw


_shared_conv3x3.defvjp(_shared_fwd, _shared_bwd)


def shared_conv3x3(x: Float[Array, "B H W C"], w: Float[Array, "3 3 C D"]) -> Float[Array, "B H W D"]:
    """3×3 ``'SAME'`` convolution of a batch with ONE kernel (NODE), fast kernel gradient."""
    if x.ndim != 4:
        raise ValueError(f"shared_conv3x3: x must be (B, H, W, C), got shape {tuple(x.shape)}")
    _check_kernel(w, x.shape[-1], None, "shared_conv3x3")
    return _shared_conv3x3(x, w)


# ---------------------------------------------------------------------------------------------
# A batch, one kernel per image
# ---------------------------------------------------------------------------------------------


def per_sample_conv3x3(x: Float[Array, "B H W C"], w: Float[Array, "B 3 3 C D"]) -> Float[Array, "B H W D"]:
    """``out[b] = conv3x3(x[b], w[b])``: every image its own 3×3 kernel (N-CODE).

    A :func:`jax.lax.map` of :func:`conv3x3` over the batch: each image is a batch-1 convolution
    (fast), never a grouped one. Equals :func:`naive_per_sample_conv` to float rounding.
    """
    if x.ndim != 4:
        raise ValueError(f"per_sample_conv3x3: x must be (B, H, W, C), got shape {tuple(x.shape)}")
    _check_kernel(w, x.shape[-1], x.shape[0], "per_sample_conv3x3")
    return batch_map(lambda xw: _conv3x3(*xw), (x, w))


def naive_per_sample_conv(
    x: Float[Array, "B H W C"], w: Float[Array, "B kh kw C D"]
) -> Float[Array, "B H W D"]:
    """Reference: ``jax.vmap`` of a stride-1 ``'SAME'`` ``lax.conv`` over the batch (plain
    autodiff). Correct and simple, but XLA turns it into a grouped convolution: slow on CPU."""
    if x.ndim != 4 or w.ndim != 5 or w.shape[0] != x.shape[0] or w.shape[3] != x.shape[-1]:
        raise ValueError(
            f"naive_per_sample_conv: need x (B, H, W, C) and w (B, kh, kw, C, D), got "
            f"{tuple(x.shape)} and {tuple(w.shape)}"
        )
    return jax.vmap(lambda xb, wb: _conv_same(xb[None], wb)[0])(x, w)


# ---------------------------------------------------------------------------------------------
# The field
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvBlockField(VectorField):
    """The paper's conv block ``1×1 (C→hidden) → σ → 3×3 (hidden→hidden) → σ → 1×1 (hidden→C)``.

    State ``x``: NHWC ``(B, height, width, channels)``. θ: shared ``(P,)`` or per sample
    ``(B, P)`` with ``P = C·h + h + 9·h² + h + h·C + C`` (``h = hidden``), weights

    ``w1 (C, h)``, ``b1 (h,)``, ``w2 (3, 3, h, h)`` (HWIO), ``b2 (h,)``, ``w3 (h, C)``, ``b3 (C,)``

    (LeCun-normal kernels with fan-in ``C``, ``9h``, ``h``; zero biases). The field does not
    depend on ``t``.

    ``impl="fast"`` (default): shared θ runs batched convolutions with a matrix-product kernel
    gradient; per-sample θ runs the whole block image by image (:func:`jax.lax.map`) with
    :func:`conv3x3`. ``impl="reference"``: plain ``lax.conv`` + autodiff, ``vmap`` over the batch
    for per-sample θ (the slow, obviously-correct baseline for tests and benchmarks).
    The fast path is reverse-mode only (custom VJP).
    """

    channels: int
    height: int
    width: int
    hidden: int = 50
    act: str = "relu"
    impl: Literal["fast", "reference"] = "fast"

    def __post_init__(self):
        activation(self.act)
        for name in ("channels", "height", "width", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ConvBlockField: {name} must be a positive int, got {v!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"ConvBlockField: unknown impl {self.impl!r}; choose one of {list(IMPLS)}")

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.height, self.width, self.channels)

    @property
    def layout(self) -> ParamLayout:
        c, h = self.channels, self.hidden
        return ParamLayout(
            (
                ParamSpec("w1", (c, h), fan_in=c),
                ParamSpec("b1", (h,), "zeros"),
                ParamSpec("w2", (3, 3, h, h), fan_in=9 * h),
                ParamSpec("b2", (h,), "zeros"),
                ParamSpec("w3", (h, c), fan_in=h),
                ParamSpec("b3", (c,), "zeros"),
            )
        )

    def flops(self, batch: int) -> int:
        """Analytic multiply-add FLOPs (×2) of one forward pass over ``batch`` images, counting
        all 9 taps everywhere (padding included) and ignoring biases and activations. A forward
        + backward w.r.t. x and θ costs 3× this (input and kernel gradient of every layer)."""
        c, h = self.channels, self.hidden
        return 2 * batch * self.height * self.width * (c * h + 9 * h * h + h * c)

    def check_x(self, x: Array, who: str = "x") -> None:
        if x.ndim == 4:
            if x.shape[-1] != self.channels:
                raise ValueError(
                    f"{who} has {x.shape[-1]} channels (shape {tuple(x.shape)}), but this "
                    f"ConvBlockField was built for channels={self.channels} (NHWC layout)"
                )
            if tuple(x.shape[1:3]) != (self.height, self.width):
                raise ValueError(
                    f"{who} has spatial size {x.shape[1]}×{x.shape[2]} (shape {tuple(x.shape)}), "
                    f"but this ConvBlockField was built for {self.height}×{self.width}"
                )
        super().check_x(x, who)

    def apply(self, t, x, w):
        del t
        dtype = jnp.result_type(x, *w.values())
        x = x.astype(dtype)
        w = {k: v.astype(dtype) for k, v in w.items()}
        per_sample = w["w1"].ndim == 3
        if self.impl == "reference":
            return self._apply_reference(x, w, per_sample)
        if per_sample:
            return batch_map(lambda xw: self._one_image(*xw), (x, w))
        sigma = activation(self.act)
        hid = sigma(x @ w["w1"] + w["b1"])
        hid = sigma(_shared_conv3x3(hid, w["w2"]) + w["b2"])
        return hid @ w["w3"] + w["b3"]

    def _one_image(self, x: Float[Array, "H W C"], w: dict[str, Array]) -> Float[Array, "H W C"]:
        sigma = activation(self.act)
        hid = sigma(x @ w["w1"] + w["b1"])
        hid = sigma(_conv3x3(hid, w["w2"]) + w["b2"])
        return hid @ w["w3"] + w["b3"]

    def _apply_reference(self, x, w, per_sample: bool):
        sigma = activation(self.act)
        if per_sample:
            bias = lambda b: b[:, None, None, :]  # noqa: E731
            hid = sigma(jnp.einsum("bhwc,bcd->bhwd", x, w["w1"]) + bias(w["b1"]))
            hid = sigma(naive_per_sample_conv(hid, w["w2"]) + bias(w["b2"]))
            return jnp.einsum("bhwc,bcd->bhwd", hid, w["w3"]) + bias(w["b3"])
        hid = sigma(x @ w["w1"] + w["b1"])
        hid = sigma(_conv_same(hid, w["w2"]) + w["b2"])
        return hid @ w["w3"] + w["b3"]
