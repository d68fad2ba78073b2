"""Image classifiers of the paper's section 5.2: a conv-block flow on the (augmented) image and a
linear read-out of ``x(T)``.

* ``node``   — shared kernels, the state is the image itself;
* ``anode``  — shared kernels, the image padded with ``augment`` zero channels (10 in the paper);
* ``open``   — per-sample kernels θ(0) = γ(image), γ a 2-layer MLP (10 hidden units in the paper);
* ``closed`` — learned θ(0) and dθ/dt = g(θ, x, t).
"""

from __future__ import annotations

from ..conv import ConvBlockField
from ..ncode import NCODE
from .classifier import FlowClassifier

IMAGE_KINDS = ("node", "anode", "open", "closed")
#: display names of the four flow models (tables and figures)
FLOW_LABELS = {"node": "NODE", "anode": "ANODE", "open": "N-CODE open", "closed": "N-CODE closed"}


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
    (1 = the paper's read-out of the whole state). ``conv_impl`` is the conv block's
    implementation (:class:`~ncode_jax.ConvBlockField`'s ``impl``; all compute the same function)."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown model {kind!r}; choose one of {list(IMAGE_KINDS)}")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}")
    if hidden < 1 or augment < 0:
        raise ValueError(f"need hidden >= 1 and augment >= 0, got hidden={hidden}, augment={augment}")
    h, w, c = image_shape
    extra = 0 if kind == "node" else augment
    field = ConvBlockField(channels=c + extra, height=h, width=w, hidden=hidden, act=act, impl=conv_impl)
    flow = NCODE.build(kind, field, tuple(image_shape), augment=extra, hidden=tuple(gamma_hidden),
                       feedback_hidden=tuple(feedback_hidden))
    return FlowClassifier(flow, num_classes, pool=pool)
