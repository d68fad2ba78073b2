"""The paper's convolutional vector field (sec. 5.2) with fast *per-sample* kernels.

``f(t, x, θ) = W₃ ⋆ σ(W₂ ⋆ σ(W₁ ⋆ x + b₁) + b₂) + b₃`` on an NHWC state ``x`` of shape
``(B, H, W, C)``: a 1×1 convolution ``C → hidden``, a 3×3 ``'SAME'`` (zero-padded) convolution
``hidden → hidden`` and a 1×1 convolution ``hidden → C``, each with a bias.

With shared θ ``(P,)`` (NODE/ANODE) this is an ordinary conv block. With per-sample θ ``(B, P)``
(N-CODE) every image is convolved with its *own* kernels, which is where naive JAX is slow:
``jax.vmap(lax.conv)`` becomes a grouped convolution (~30× slower than shared kernels on CPU,
``benchmarks/README.md``), and XLA's transpose of a convolution w.r.t. its *kernel* is slow even
with shared kernels (a single-feature convolution with a 28×28 "window").

Implementations of the per-sample block (``ConvBlockField(impl=...)``, and ``impl=`` of
:func:`per_sample_conv3x3`), all equal to plain autodiff of :func:`naive_per_sample_conv` to
float rounding (``tests/test_conv.py``); timings in ``benchmarks/README.md``:

* ``"winograd"`` (CPU with the batch split over several devices, e.g. one per core: what
  ``"auto"`` picks there) — fewer multiplications: Winograd's minimal
  filtering F(4, 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR
  2016) along the image width, the three kernel rows side by side in the contraction. Every
  4 outputs of a row take 6 products of depth ``3·C`` instead of 4 of depth ``9·C``: 2× fewer
  multiply-adds in the 3×3 layer (widths that 4 does not divide pay for a zero-padded last
  tile). The heavy part is six ``(H·⌈W/4⌉, 3C) @ (3C, D)`` matrix products per image, deeper
  than the 2-D F(2×2, 3×3)'s sixteen of depth ``C`` (which measured slower on CPU: shallow
  products run far below the matmul peak). All three products of a training step use it:
  forward, input gradient (the flipped kernel) and kernel gradient (the transposed transforms).
  Per-sample θ runs the ``"map"`` block below with these products; on CPU the images are looped
  over, elsewhere vectorised (batched matrix products, the accelerator candidate to replace
  ``"grouped"``). Equal to direct convolution to a few 1e-7 relative in float32
  (``tests/test_conv.py``). Measured on 2 CPU cores (``benchmarks/README.md``): with one device
  per core the conv classifier's training step is 1.26–1.29× faster than with ``"map"``; on ONE
  device it is 2–9% slower (its six products per image are too small for XLA to spread over
  the cores, while ``"map"``'s batch-1 convolution uses both), hence ``"auto"``'s rule.
* ``"map"`` (CPU on one device: what ``"auto"`` picks there) — the *whole block* is one
  ``custom_vjp``
  evaluated image by image with :func:`jax.lax.map`: the forward 3×3 convolution is XLA's
  batch-1 convolution (the least work measured in the block, benchmarks/README.md), the backward
  pass is im2col matrix products ``(H·W, 9h) @ (9h, h)`` per image: input gradient
  ``im2col(ḡ) @ flip(W₂)ᵀ``, kernel gradient ``im2col(σ(a₁))ᵀ @ ḡ``. The 1×1 layers, biases and
  activations of an image run in the same loop iteration, so its intermediates stay in cache; the
  backward pass keeps only the two pre-activations ``a₁, a₂`` of every image as residuals and
  computes all cotangents of an image in one iteration (no XLA convolution transpose). Jit the
  step with :func:`ncode_jax.compiler_options` on CPU: XLA's default (YNNPACK) convolution runs on
  one core, its own on all (the block 1.09–1.3× faster, ``benchmarks/README.md``).
* ``"grouped"`` (accelerators; what ``"auto"`` picks on GPU/TPU) — batched ops, no loop over
  images: the 1×1 layers are batched matrix products, the 3×3 convolution a *grouped*
  convolution (batch folded into channels, ``feature_group_count=B``) for the forward pass and
  for the input gradient, and a batched matrix product (one per tap, contracting over pixels)
  for the kernel gradient, under a ``custom_vjp`` (XLA's own backward of a grouped convolution
  w.r.t. its kernel is slow on CUDA, jax issue #13800). On CPU it is correct but slow.
* ``"conv_map"`` — the previous CPU path, kept for before/after benchmarks: ``lax.map`` of the
  block with batch-1 ``lax.conv`` forward and input gradient and an im2col kernel gradient.
* ``"reference"`` — plain ``lax.conv`` + autodiff, ``vmap`` over the batch (slow, obviously
  correct: the baseline of the tests and of the FLOP counts).
* ``"auto"`` (default) — on CPU ``"winograd"`` under a data-parallel mesh of several devices and
  ``"map"`` on one, ``"grouped"`` on other backends; decided when the field is traced
  (:func:`resolve_impl`).

Shared θ runs batched convolutions with an im2col kernel gradient (``auto``, ``map``,
``conv_map``), the Winograd products image by image (``winograd``, when asked for by name), or
plain ``lax.conv`` autodiff (``grouped``: cuDNN is fine with shared kernels; ``reference``).
Under a data-parallel mesh the per-image loops run per device over its own images
(:mod:`ncode_jax.sharding`). The custom VJPs make the fast paths reverse-mode only
(``jax.grad``/``jax.vjp``; forward-mode ``jax.jvp`` through them raises).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float

from .fields import VectorField, activation, add_bias
from .layout import ParamLayout, ParamSpec
from .sharding import batch_map, batch_sum, data_parallel_devices

_DN = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "map", "winograd", "grouped", "conv_map", "reference")
Impl = Literal["auto", "map", "winograd", "grouped", "conv_map", "reference"]


def resolve_impl(impl: str, devices: int | None = None) -> str:
    """``"auto"`` → on JAX's CPU backend ``"winograd"`` when the batch is split over several
    devices (a data-parallel mesh, :func:`ncode_jax.sharding.data_parallel_devices`; e.g. one
    device per core) and ``"map"`` on one device — the faster of the two measured in each setting
    (module docstring); ``"grouped"`` on any other backend (GPU, TPU: never measured on one;
    ``"winograd"`` is the batched-GEMM candidate). Any other name is returned unchanged after a
    check. Decided when the field is traced; ``devices`` overrides the active mesh's count (to
    ask, outside the mesh, what a step on that many devices runs)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {list(IMPLS)}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "grouped"
        return "winograd" if (data_parallel_devices() if devices is None else devices) > 1 else "map"
    return impl


def _conv_same(x: Array, w: Array, groups: int = 1) -> Array:
    """Stride-1 ``'SAME'`` convolution, NHWC input ``(N, H, W, C)``, HWIO kernel."""
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=groups)


def _flip_transpose(w: Float[Array, "*b kh kw C D"]) -> Float[Array, "*b kh kw D C"]:
    """Kernel of the input gradient: spatially flipped, in/out channels swapped."""
    return jnp.swapaxes(jnp.flip(w, (-4, -3)), -2, -1)


def _im2col(x: Float[Array, "H W C"]) -> Float[Array, "H*W 9*C"]:
    """3×3 zero-padded patches of one image; column ``(i·3 + j)·C + c`` is tap ``(i, j)``."""
    h, w, c = x.shape
    xp = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    taps = [xp[i : i + h, j : j + w] for i in range(3) for j in range(3)]
    return jnp.concatenate(taps, axis=-1).reshape(h * w, 9 * c)


def _conv_mm(x: Float[Array, "H W C"], w: Float[Array, "3 3 C D"]) -> Float[Array, "H W D"]:
    """3×3 ``'SAME'`` convolution of one image as one ``(HW, 9C) @ (9C, D)`` matrix product."""
    h, wd, c = x.shape
    return (_im2col(x) @ w.reshape(9 * c, -1)).reshape(h, wd, -1)


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
# Winograd F(4, 3) along the width, the three kernel rows in the contraction
# ---------------------------------------------------------------------------------------------

# Minimal filtering F(4, 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
# CVPR 2016, sec. 4; interpolation points 0, 1, -1, 2, -2, ∞): four outputs of a 3-tap filter from
# a 6-wide input tile d with six multiplications, y = Aᵀ[(G g) ⊙ (Bᵀ d)] instead of twelve.
_WINO_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINO_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINO_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
_WINO_M, _WINO_ALPHA = 4, 6  # outputs per tile, tile width


def _lincomb(mat, xs: list) -> list:
    """``[Σ_s mat[n][s]·xs[s] for each row n]`` written out as adds (zeros skipped, ±1 without a
    multiplication), so XLA fuses a whole transform into one elementwise loop. The coefficients are
    Python numbers: the result keeps the dtype of ``xs``."""
    out = []
    for row in mat:
        terms = [x if c == 1 else -x if c == -1 else c * x for c, x in zip(row, xs, strict=True) if c != 0]
        acc = terms[0]
        for t in terms[1:]:
            acc = acc + t
        out.append(acc)
    return out


def _transpose(mat) -> tuple:
    return tuple(zip(*mat, strict=True))


def _wino_tiles(width: int) -> int:
    return -(-width // _WINO_M)


def _wino_inputs(x: Float[Array, "N H W C"]) -> Float[Array, "6 NHT 3*C"]:
    """The transformed input tiles ``Bᵀ d`` of every 6-wide, stride-4 window of every (zero-padded)
    row, the three rows a 3×3 output needs side by side in the last axis (``T = ⌈W/4⌉`` tiles per
    row; the last tile of a width that 4 does not divide reads zero padding)."""
    n, h, wd, c = x.shape
    tiles = _wino_tiles(wd)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, _WINO_M * tiles + 1 - wd), (0, 0)))
    cols = [xp[:, :, s : s + _WINO_M * (tiles - 1) + 1 : _WINO_M] for s in range(_WINO_ALPHA)]
    v = jnp.stack(_lincomb(_WINO_BT, cols))  # (6, N, H + 2, T, C)
    v = jnp.concatenate([v[:, :, i : i + h] for i in range(3)], axis=-1)
    return v.reshape(_WINO_ALPHA, n * h * tiles, 3 * c)


def _wino_kernel(w: Float[Array, "3 3 C D"]) -> Float[Array, "6 3*C D"]:
    """``G g`` along the kernel's width for each of its three rows: ``(6, 3·C, D)``."""
    u = jnp.stack(_lincomb(_WINO_G, [w[:, t] for t in range(3)]))  # (6, 3, C, D)
    return u.reshape(_WINO_ALPHA, -1, w.shape[-1])


def _wino_conv(x: Float[Array, "N H W C"], w: Float[Array, "3 3 C D"]) -> Float[Array, "N H W D"]:
    """3×3 ``'SAME'`` convolution of a batch with ONE kernel by Winograd F(4, 3) along the width:
    six ``(N·H·T, 3C) @ (3C, D)`` matrix products (``T = ⌈W/4⌉``), i.e. 6·3 = 18 multiply-adds
    per 4 outputs and channel pair where direct convolution takes 36 (2× fewer for ``W % 4 == 0``).
    Exact in exact arithmetic; in float32 it differs from direct convolution by a few 1e-7
    relative (the transforms' coefficients go up to 8, ``tests/test_conv.py``)."""
    n, h, wd, _ = x.shape
    m = lax.dot_general(_wino_inputs(x), _wino_kernel(w), (((2,), (1,)), ((0,), (0,))))
    y = jnp.stack(_lincomb(_WINO_AT, list(m)), axis=1)  # (N·H·T, 4, D)
    return y.reshape(n, h, _WINO_M * _wino_tiles(wd), w.shape[-1])[:, :, :wd]


def _wino_kernel_grad(x: Float[Array, "N H W C"], g: Float[Array, "N H W D"]) -> Float[Array, "3 3 C D"]:
    """``∂⟨g, _wino_conv(x, w)⟩/∂w`` summed over the batch: the transposed output transform
    ``A g``, six ``(3C, N·H·T) @ (N·H·T, D)`` products with the input tiles, then ``Gᵀ`` back."""
    n, h, wd, d = g.shape
    tiles = _wino_tiles(wd)
    gp = jnp.pad(g, ((0, 0), (0, 0), (0, _WINO_M * tiles - wd), (0, 0))).reshape(n * h * tiles, _WINO_M, d)
    dm = jnp.stack(_lincomb(_transpose(_WINO_AT), [gp[:, o] for o in range(_WINO_M)]))  # (6, NHT, D)
    du = lax.dot_general(_wino_inputs(x), dm, (((1,), (1,)), ((0,), (0,))))  # (6, 3C, D)
    du = du.reshape(_WINO_ALPHA, 3, x.shape[-1], d)
    return jnp.stack(_lincomb(_transpose(_WINO_G), list(du)), axis=1)  # (3, 3, C, D)


# ---------------------------------------------------------------------------------------------
# One image, its own kernel
# ---------------------------------------------------------------------------------------------


def _linear_conv(apply, kernel_grad, doc: str):
    """A convolution ``apply(x, w)`` (linear in each argument) under a custom VJP: the input
    gradient is ``apply(g, flip(w))`` (the transposed convolution of a 'SAME' 3×3 kernel) and the
    kernel gradient ``kernel_grad(x, g)``; only ``(x, w)`` are saved for the backward pass."""

    @jax.custom_vjp
    def conv(x, w):
        return apply(x, w)

    def fwd(x, w):
        return apply(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        return apply(g, _flip_transpose(w)), kernel_grad(x, g)

    conv.defvjp(fwd, bwd)
    conv.__doc__ = doc
    return conv


_conv3x3 = _linear_conv(
    lambda x, w: _conv_same(x[None], w)[0], _kernel_grad,
    "Batch-1 ``lax.conv`` forward and input gradient, im2col kernel gradient (``conv_map``).")
_conv3x3_mm = _linear_conv(_conv_mm, _kernel_grad, "Everything an im2col matrix product (``map``).")
_conv3x3_wino = _linear_conv(
    lambda x, w: _wino_conv(x[None], w)[0], lambda x, g: _wino_kernel_grad(x[None], g[None]),
    "Winograd F(4, 3) forward, input gradient (flipped kernel) and kernel gradient (``winograd``).")


def conv3x3(x: Float[ArrayLike, "H W C"], w: Float[ArrayLike, "3 3 C D"]) -> Float[Array, "H W D"]:
    """3×3 ``'SAME'`` convolution of ONE image ``x (H, W, C)`` with kernel ``w (3, 3, C, D)``.

    Forward, input gradient and kernel gradient are im2col matrix products (reverse-mode only,
    see the module docstring). Map it over a batch with :func:`jax.lax.map`
    (:func:`per_sample_conv3x3`), not ``vmap``: a vmapped convolution is a grouped one.
    """
    if x.ndim != 3:
        raise ValueError(f"conv3x3: x must be one image (H, W, C), got shape {tuple(x.shape)}")
    _check_kernel(w, x.shape[-1], None, "conv3x3")
    return _conv3x3_mm(x, w)


# ---------------------------------------------------------------------------------------------
# A batch, one shared kernel
# ---------------------------------------------------------------------------------------------


def _summed_kernel_grad(one_image):
    """The kernel gradient of a batch with one kernel, image by image (``one_image(x, g)`` on one
    image): the per-image buffers (im2col, Winograd tiles) stay small; per device when
    data-parallel."""

    def kernel_grad(x, g):
        zeros = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), jnp.result_type(x, g))
        return batch_sum(lambda xg: one_image(*xg), zeros, (x, g))

    return kernel_grad


_shared_conv3x3 = _linear_conv(_conv_same, _summed_kernel_grad(_kernel_grad),
                               "A batch with one kernel: ``lax.conv``, kernel gradient image by image.")
_shared_conv3x3_wino = _linear_conv(
    lambda x, w: batch_map(lambda xi: _wino_conv(xi[None], w)[0], x),
    _summed_kernel_grad(lambda x, g: _wino_kernel_grad(x[None], g[None])),
    "A batch with one kernel, Winograd F(4, 3) image by image (the tiles of one image stay small).")


def shared_conv3x3(
    x: Float[ArrayLike, "B H W C"], w: Float[ArrayLike, "3 3 C D"], impl: Impl = "auto"
) -> Float[Array, "B H W D"]:
    """3×3 ``'SAME'`` convolution of a batch with ONE kernel (NODE), fast kernel gradient.

    ``impl="winograd"``: Winograd F(4, 3) (module docstring); any other name: XLA's convolution
    forward and input gradient, im2col kernel gradient image by image.
    """
    if x.ndim != 4:
        raise ValueError(f"shared_conv3x3: x must be (B, H, W, C), got shape {tuple(x.shape)}")
    _check_kernel(w, x.shape[-1], None, "shared_conv3x3")
    resolve_impl(impl)  # a known name
    return (_shared_conv3x3_wino if impl == "winograd" else _shared_conv3x3)(x, w)


# ---------------------------------------------------------------------------------------------
# A batch, one kernel per image
# ---------------------------------------------------------------------------------------------


def _grouped(x: Float[Array, "B H W C"], w: Float[Array, "B 3 3 C D"]) -> Float[Array, "B H W D"]:
    """Every image its own kernel as ONE grouped convolution: the batch is folded into the
    channels (``(1, H, W, B·C)``, ``B`` groups of ``C → D``)."""
    b, h, wd, c = x.shape
    d = w.shape[-1]
    xg = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, wd, b * c)
    wg = jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(3, 3, c, b * d)
    y = _conv_same(xg, wg, groups=b)
    return jnp.transpose(y.reshape(h, wd, b, d), (2, 0, 1, 3))


def _batched_kernel_grad(x: Float[Array, "B H W C"], g: Float[Array, "B H W D"]) -> Float[Array, "B 3 3 C D"]:
    """Per-image kernel gradients, batched: for each of the 9 taps one batched matrix product
    ``Σ_p x_shifted[b, p, c] g[b, p, d]`` (no loop over images, no im2col buffer)."""
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [
        jnp.einsum("bhwc,bhwd->bcd", xp[:, i : i + h, j : j + wd], g) for i in range(3) for j in range(3)
    ]
    return jnp.stack(taps, 1).reshape(x.shape[0], 3, 3, x.shape[-1], g.shape[-1])


_grouped_conv3x3 = _linear_conv(
    _grouped, _batched_kernel_grad,
    "Grouped convolution forward and input gradient, per-tap batched kernel gradient (``grouped``).")


def per_sample_conv3x3(
    x: Float[ArrayLike, "B H W C"], w: Float[ArrayLike, "B 3 3 C D"], impl: Impl = "auto"
) -> Float[Array, "B H W D"]:
    """``out[b] = conv3x3(x[b], w[b])``: every image its own 3×3 kernel (N-CODE).

    ``impl``: ``"map"`` — a :func:`jax.lax.map` of :func:`conv3x3` (im2col matrix products image
    by image, never a grouped convolution; the field's ``"map"`` block uses XLA's batch-1
    convolution for its forward pass instead); ``"grouped"`` — one grouped convolution forward and
    for the input gradient, batched per-tap matrix products for the kernel gradient;
    ``"conv_map"`` — ``lax.map`` of batch-1 ``lax.conv`` with an im2col kernel gradient;
    ``"reference"`` — :func:`naive_per_sample_conv`; ``"auto"`` — see :func:`resolve_impl`.
    All equal :func:`naive_per_sample_conv` to float rounding.
    """
    if x.ndim != 4:
        raise ValueError(f"per_sample_conv3x3: x must be (B, H, W, C), got shape {tuple(x.shape)}")
    _check_kernel(w, x.shape[-1], x.shape[0], "per_sample_conv3x3")
    impl = resolve_impl(impl)
    if impl == "map":
        return batch_map(lambda xw: _conv3x3_mm(*xw), (x, w))
    if impl == "winograd":
        return _per_image(_conv3x3_wino, x, w)
    if impl == "conv_map":
        return batch_map(lambda xw: _conv3x3(*xw), (x, w))
    if impl == "grouped":
        return _grouped_conv3x3(x, w)
    return naive_per_sample_conv(x, w)


def _loop_over_images() -> bool:
    """Whether per-image work runs as a loop over the images (CPU: each image's buffers stay in
    cache) or batched (accelerators: one batched matrix product per Winograd point)."""
    return jax.default_backend() == "cpu"


def _over_images(f, xs, loop: bool):
    """``f`` on each image (the leading axis of every leaf of ``xs``): a loop (``batch_map``: per
    device under a data-parallel mesh) or vectorised (``vmap``)."""
    return batch_map(f, xs) if loop else jax.vmap(f)(xs)


def _per_image(conv, x, w):
    """``out[b] = conv(x[b], w[b])``, looped on CPU, vectorised elsewhere."""
    return _over_images(lambda xw: conv(*xw), (x, w), _loop_over_images())


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
# The whole per-sample block, image by image, under one custom VJP (impl="map", "winograd")
# ---------------------------------------------------------------------------------------------


class _BlockConv(NamedTuple):
    """How the block computes its 3×3 convolution of ONE image ``h (H, W, C)`` with ``w (3, 3, C,
    D)``: the forward pass, the input gradient from ``(g, w)`` and the kernel gradient from
    ``(h, g)``, plus whether the images are looped over (``lax.map``) or vectorised (``vmap``)."""

    forward: Callable
    input_grad: Callable
    kernel_grad: Callable
    loop: bool = True


_MAP_CONV = _BlockConv(
    lambda h, w: _conv_same(h[None], w)[0], lambda g, w: _conv_mm(g, _flip_transpose(w)), _kernel_grad)


_WINO_CONV = _BlockConv(
    lambda h, w: _wino_conv(h[None], w)[0],
    lambda g, w: _wino_conv(g[None], _flip_transpose(w))[0],
    lambda h, g: _wino_kernel_grad(h[None], g[None]),
)


def _images(conv: _BlockConv, f, xs):
    return _over_images(f, xs, conv.loop)


def _block_image(sigma, conv: _BlockConv, x, w):
    """One image ``x (H, W, C)``, its weights ``w``: ``(y, (a₁, a₂))`` with the pre-activations
    ``a₁ (HW, h)`` and ``a₂ (HW, h)`` kept for the backward pass."""
    h, wd, c = x.shape
    hid = w["b1"].shape[-1]
    a1 = add_bias(x.reshape(h * wd, c) @ w["w1"], w["b1"])
    a2 = add_bias(conv.forward(sigma(a1).reshape(h, wd, hid), w["w2"]).reshape(h * wd, hid), w["b2"])
    y = add_bias(sigma(a2) @ w["w3"], w["b3"])
    return y.reshape(h, wd, c), (a1, a2)


def _block_image_bwd(sigma, conv: _BlockConv, x, w, a1, a2, g):
    """Cotangents ``(x̄, w̄)`` of one image from its residuals and the output cotangent ``g``."""
    h, wd, c = x.shape
    hid = w["b1"].shape[-1]
    g = g.reshape(h * wd, c)
    h1, act1 = jax.vjp(sigma, a1)
    h2, act2 = jax.vjp(sigma, a2)
    (da2,) = act2(g @ w["w3"].T)
    da2_img = da2.reshape(h, wd, hid)
    dw2 = conv.kernel_grad(h1.reshape(h, wd, hid), da2_img)
    (da1,) = act1(conv.input_grad(da2_img, w["w2"]).reshape(h * wd, hid))
    dx = da1 @ w["w1"].T
    dw = {
        "w1": x.reshape(h * wd, c).T @ da1,
        "b1": da1.sum(0),
        "w2": dw2,
        "b2": da2.sum(0),
        "w3": h2.T @ g,
        "b3": g.sum(0),
    }
    return dx.reshape(h, wd, c), dw


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _map_block(sigma: Callable, conv: _BlockConv, x, w):
    return _images(conv, lambda xw: _block_image(sigma, conv, *xw)[0], (x, w))


def _map_block_fwd(sigma, conv, x, w):
    y, (a1, a2) = _images(conv, lambda xw: _block_image(sigma, conv, *xw), (x, w))
    return y, (x, w, a1, a2)


def _map_block_bwd(sigma, conv, res, g):
    x, w, a1, a2 = res
    return _images(conv, lambda r: _block_image_bwd(sigma, conv, *r), (x, w, a1, a2, g))


_map_block.defvjp(_map_block_fwd, _map_block_bwd)


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

    ``impl``: ``"auto"`` (default: on CPU ``"winograd"`` with the batch split over several
    devices, ``"map"`` on one; ``"grouped"`` on GPU/TPU), ``"winograd"``, ``"map"``,
    ``"grouped"``, ``"conv_map"`` or ``"reference"`` — see the module docstring. All compute the
    same function; the fast ones are reverse-mode only (custom VJP).
    """

    channels: int
    height: int
    width: int
    hidden: int = 50
    act: str = "relu"
    impl: Impl = "auto"

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

    def flops(self, batch: int, executed: bool = False) -> int:
        """Analytic multiply-add FLOPs (×2) of one forward pass over ``batch`` images, ignoring
        biases, activations and the Winograd transforms. ``executed=False`` (the
        "direct-equivalent" count every rate in the benchmarks uses): all 9 taps everywhere,
        padding included. ``executed=True``: what this field's implementation multiplies —
        for ``"winograd"`` (and ``"auto"`` where it resolves to it) the 3×3 layer's
        ``6·H·⌈W/4⌉·3h·h`` products instead of ``9·H·W·h·h`` (2× fewer when 4 divides W). A
        forward + backward w.r.t. x and θ costs 3× either (input and kernel gradient of every layer)."""
        c, h, hw = self.channels, self.hidden, self.height * self.width
        conv = 9 * hw * h * h
        if executed and resolve_impl(self.impl) == "winograd":
            conv = 6 * self.height * _wino_tiles(self.width) * 3 * h * h
        return 2 * batch * (hw * (c * h + h * c) + conv)

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
        impl = resolve_impl(self.impl)
        sigma = activation(self.act)
        if impl == "reference" or (impl == "grouped" and not per_sample):
            return self._apply_reference(x, w, per_sample)
        if per_sample:
            if impl == "map":
                return _map_block(sigma, _MAP_CONV, x, w)
            if impl == "winograd":
                return _map_block(sigma, _WINO_CONV._replace(loop=_loop_over_images()), x, w)
            if impl == "conv_map":
                return batch_map(lambda xw: self._one_image(*xw), (x, w))
            return self._apply_grouped(x, w)
        hid = sigma(add_bias(x @ w["w1"], w["b1"]))
        # shared θ: Winograd only when asked for (its gain was measured for per-sample kernels;
        # with shared kernels one device's XLA convolution was faster, 70 vs 103 ms per block)
        conv = _shared_conv3x3_wino if self.impl == "winograd" else _shared_conv3x3
        hid = sigma(add_bias(conv(hid, w["w2"]), w["b2"]))
        return add_bias(hid @ w["w3"], w["b3"])

    def _one_image(self, x: Float[Array, "H W C"], w: dict[str, Array]) -> Float[Array, "H W C"]:
        sigma = activation(self.act)
        hid = sigma(add_bias(x @ w["w1"], w["b1"]))
        hid = sigma(add_bias(_conv3x3(hid, w["w2"]), w["b2"]))
        return add_bias(hid @ w["w3"], w["b3"])

    def _apply_grouped(self, x, w):
        sigma = activation(self.act)
        bias = lambda b: b[:, None, None, :]  # noqa: E731
        hid = sigma(jnp.einsum("bhwc,bcd->bhwd", x, w["w1"]) + bias(w["b1"]))
        hid = sigma(_grouped_conv3x3(hid, w["w2"]) + bias(w["b2"]))
        return jnp.einsum("bhwc,bcd->bhwd", hid, w["w3"]) + bias(w["b3"])

    def _apply_reference(self, x, w, per_sample: bool):
        sigma = activation(self.act)
        if per_sample:
            bias = lambda b: b[:, None, None, :]  # noqa: E731
            hid = sigma(jnp.einsum("bhwc,bcd->bhwd", x, w["w1"]) + bias(w["b1"]))
            hid = sigma(naive_per_sample_conv(hid, w["w2"]) + bias(w["b2"]))
            return jnp.einsum("bhwc,bcd->bhwd", hid, w["w3"]) + bias(w["b3"])
        hid = sigma(add_bias(x @ w["w1"], w["b1"]))
        hid = sigma(add_bias(_conv_same(hid, w["w2"]), w["b2"]))
        return add_bias(hid @ w["w3"], w["b3"])
