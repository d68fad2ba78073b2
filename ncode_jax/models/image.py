"""Image classifiers of the paper's section 5.2: a conv-block flow on the (augmented) image and a
linear read-out of ``x(T)``.

* ``node``   — shared kernels, the state is the image itself;
* ``anode``  — shared kernels, the image padded with ``augment`` zero channels (10 in the paper);
* ``open``   — per-sample kernels θ(0) = γ(image), γ a 2-layer MLP (10 hidden units in the paper);
* ``closed`` — learned θ(0) and dθ/dt = g(θ, x, t);
* ``anode_matched`` — an ANODE with as many parameters as ``open`` under the same settings: its
  hidden width is :func:`matched_hidden` instead of ``hidden`` (not in the paper: the control for
  capacity a comparison of N-CODE open with ANODE needs, since γ gives N-CODE open 2.5× ANODE's
  parameters at equal width).
"""

from __future__ import annotations

import math

import jax

from ..conv import ConvBlockField
from ..ncode import NCODE
from .classifier import FlowClassifier

IMAGE_KINDS = ("node", "anode", "anode_matched", "open", "closed")


def image_classifier(
    kind: str,
    image_shape: tuple[int, int, int],
    num_classes: int = 10,
    *,
    hidden: int = 50,
    augment: int = 10,
    gamma_hidden: tuple[int, ...] = (10,),
    feedback_hidden: tuple[int, ...] = (10,),
    act: str = "relu",
    pool: int = 1,
    conv_impl: str = "auto",
) -> FlowClassifier:
    """Build a conv-block flow classifier for NHWC images of ``image_shape = (H, W, C)``.

    ``pool`` average-pools ``x(T)`` over ``pool × pool`` windows before the linear read-out
    (1 = the paper's read-out of the whole state). ``kind="anode_matched"`` builds an ANODE of
    hidden width :func:`matched_hidden` (``hidden`` is then N-CODE open's width). ``conv_impl`` is
    the conv block's implementation (:class:`~ncode_jax.ConvBlockField`'s ``impl``; all compute the
    same function).

    Raises ValueError for an unknown ``kind``, a bad ``image_shape``, ``hidden < 1`` or
    ``augment < 0``."""
    if kind == "anode_matched":
        _check(kind, image_shape, hidden, augment)
        wide = matched_hidden(image_shape, num_classes, hidden=hidden, augment=augment,
                              gamma_hidden=gamma_hidden, act=act, pool=pool)
        return image_classifier("anode", image_shape, num_classes, hidden=wide, augment=augment, act=act,
                                pool=pool, conv_impl=conv_impl)
    _check(kind, image_shape, hidden, augment)
    h, w, c = image_shape
    extra = 0 if kind == "node" else augment
    field = ConvBlockField(channels=c + extra, height=h, width=w, hidden=hidden, act=act, impl=conv_impl)
    flow = NCODE.build(kind, field, tuple(image_shape), augment=extra, hidden=tuple(gamma_hidden),
                       feedback_hidden=tuple(feedback_hidden))
    return FlowClassifier(flow, num_classes, pool=pool)


def _check(kind, image_shape, hidden, augment) -> None:
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown model {kind!r}; choose one of {list(IMAGE_KINDS)}")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}")
    if hidden < 1 or augment < 0:
        raise ValueError(f"need hidden >= 1 and augment >= 0, got hidden={hidden}, augment={augment}")


def num_params(model: FlowClassifier) -> int:
    """Number of trained parameters of a classifier (read-out included), without allocating them."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return int(sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)))


def matched_hidden(image_shape: tuple[int, int, int], num_classes: int = 10, *, hidden: int = 50,
                   augment: int = 10, gamma_hidden: tuple[int, ...] = (10,), act: str = "relu",
                   pool: int = 1) -> int:
    """The ANODE hidden width whose classifier's parameter count is closest to that of the N-CODE
    open classifier of width ``hidden`` (same image shape, augmentation, read-out and γ).

    ANODE's count grows with its width (the conv block has ``9·h² + (2c + 3)·h + c`` weights for
    ``c`` state channels), so a bisection finds the first width at or above the target and the
    closer of it and its predecessor is returned (ties: the smaller). E.g. ``mnist5k_cpu``
    (28×28×1, ``hidden=16``, ``augment=10``, ``pool=2``): N-CODE open 61,808 parameters, ANODE of
    width 65 has 61,166 and of width 66 has 62,369, so 66 (0.9% more); ``digits_cpu`` (8×8×1):
    open 34,808, ANODE of width 59 34,526."""
    target = num_params(image_classifier("open", image_shape, num_classes, hidden=hidden, augment=augment,
                                         gamma_hidden=gamma_hidden, act=act, pool=pool))

    def count(width: int) -> int:
        return num_params(image_classifier("anode", image_shape, num_classes, hidden=width, augment=augment,
                                           act=act, pool=pool))

    lo, hi = 1, max(hidden, 1)
    while count(hi) < target:
        lo, hi = hi, 2 * hi
    while lo < hi:  # first width with count >= target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    return lo - 1 if lo > 1 and target - count(lo - 1) <= count(lo) - target else lo
