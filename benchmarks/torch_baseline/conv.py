"""Conv-block N-CODE image classifier in PyTorch + torchdiffeq, the same as
``ncode_jax.models.image_classifier(kind, image_shape)``.

``ConvNCODE(kind, image_shape=(H, W, c))`` for ``kind`` in ``node``/``anode``/``open``/``closed``:

* state: the image padded with ``augment`` zero channels (``anode``/``open``/``closed``; none for
  ``node``), ``C = c + augment`` channels; kept NCHW ``(B, C, H, W)`` inside the solver;
* field (paper sec. 5.2): ``1×1 (C→h) → ReLU → 3×3 'SAME' (h→h) → ReLU → 1×1 (h→C)``, each with a
  bias, weights cut from flat θ in ``ConvBlockField``'s layout ``[w1 (C, h), b1, w2 (3, 3, h, h)
  HWIO, b2, w3 (h, C), b3]``; θ shared ``(P,)`` (node/anode) or per sample ``(B, P)``;
* ``open``: θ(0) = θ̄ + MLP(flatten(image)) (tanh, ``gamma_hidden`` units), constant in time;
* ``closed``: θ(0) = θ̄, ``dθ/dt = g(θ, x, t) = MLP([θ, flatten(x), t])`` (tanh,
  ``feedback_hidden`` units);
* read-out: ``logits = flatten(x(T)) @ W + b`` with ``flatten`` in JAX's NHWC order.

Flattening is NHWC on the JAX side; here the NCHW state is never transposed per evaluation —
instead the rows of g's first layer and of the read-out are permuted once per solve.

**Per-sample kernels** (the 3×3 convolution of every image with its own kernel; the 1×1 layers
are ``torch.baddbmm``). Candidates in :data:`CONV_IMPLS`: ``unfold`` (``F.unfold`` im2col +
``torch.bmm``, plain autograd), ``loop`` (one batch-1 ``F.conv2d`` per image), ``hybrid`` (custom
autograd: per-image convolutions forward and for the input gradient, an im2col ``bmm`` for the
kernel gradient — the JAX strategy), ``grouped`` (``F.conv2d(groups=B)`` on ``(1, B·h, H, W)``)
and ``vmap`` (``torch.func.vmap(F.conv2d)``, whose batching rule for a batched kernel is a
grouped convolution too). **``vmap`` is the default**, the fastest measured on this 2-core CPU (torch 2.13.0,
2 threads), with ``grouped`` level with it:

* whole per-sample block, forward + backward (batch 64, 28×28, 11→50→50→11, f32;
  ``python -m benchmarks.conv_block --torch``, load 1.3–1.5): ``vmap`` 106.7 ms, ``grouped``
  122.0, ``unfold`` 204.6;
* training step (``python -m benchmarks.conv_step --torch-conv unfold vmap grouped``, rk4 16
  NFE, same run, load 1.0 → 2.0): open loop ``odeint`` 2239 / 2268 / 4885 ms (vmap / grouped /
  unfold), ``odeint_adjoint`` 2865 / 2805 / 3191; closed loop 2571 / 2597 / 3837 and
  3516 / 3573 / 4016.

Earlier, loaded runs (load average ~8) had ranked ``unfold`` first (``grouped`` and ``vmap``
1333–1372 ms per block), which is why it was the default before; benchmarks/README.md
has the current table. ``unfold`` also keeps the im2col matrix (``B·9h·H·W`` floats, 90 MB at batch 64) per
evaluation for the backward pass: 1.4 GB for 16 rk4 evaluations under ``odeint``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .core import grads_as_jax_tree, load_jax_params, mlp, mlp_leaves, mlp_params, odeint_final

__all__ = ["CONV_IMPLS", "DEFAULT_CONV_IMPL", "IMAGE_KINDS", "ConvNCODE", "grads_as_jax_tree",
           "load_jax_params", "per_sample_conv3x3"]

IMAGE_KINDS = ("node", "anode", "open", "closed")
CONV_IMPLS = ("unfold", "hybrid", "loop", "grouped", "vmap")
DEFAULT_CONV_IMPL = "vmap"  # the fastest measured here (see the module docstring)


# ---------------------------------------------------------------------------------------------
# Per-sample 3×3 convolution: out[b] = conv2d(u[b], w[b]), u (B, c, H, W), w (B, d, c, 3, 3)
# ---------------------------------------------------------------------------------------------


def _conv_loop(u, w):
    return torch.cat([F.conv2d(u[i : i + 1], w[i], padding=1) for i in range(u.shape[0])], 0)


def _conv_unfold(u, w):
    b, _, hh, ww = u.shape
    cols = F.unfold(u, 3, padding=1)  # (B, c·9, H·W), rows (c, ki, kj)
    return torch.bmm(w.reshape(b, w.shape[1], -1), cols).view(b, w.shape[1], hh, ww)


def _conv_grouped(u, w):
    b, c, hh, ww = u.shape
    d = w.shape[1]
    out = F.conv2d(u.reshape(1, b * c, hh, ww), w.reshape(b * d, c, 3, 3), padding=1, groups=b)
    return out.view(b, d, hh, ww)


_vmapped_conv = torch.func.vmap(lambda u, w: F.conv2d(u[None], w, padding=1)[0])


class _HybridConv(torch.autograd.Function):
    """Per-image ``F.conv2d`` forward; input gradient = per-image convolution of the output
    cotangent with the flipped, in/out-swapped kernel; kernel gradient = ``g @ im2col(u)ᵀ``."""

    @staticmethod
    def forward(ctx, u, w):
        ctx.save_for_backward(u, w)
        return _conv_loop(u, w)

    @staticmethod
    def backward(ctx, g):
        u, w = ctx.saved_tensors
        gu = gw = None
        if ctx.needs_input_grad[0]:
            gu = _conv_loop(g, w.flip(-1, -2).transpose(1, 2))
        if ctx.needs_input_grad[1]:
            b, d, hh, ww = g.shape
            cols = F.unfold(u, 3, padding=1)
            gw = torch.bmm(g.reshape(b, d, hh * ww), cols.transpose(1, 2)).view_as(w)
        return gu, gw


def per_sample_conv3x3(u: torch.Tensor, w: torch.Tensor, impl: str = DEFAULT_CONV_IMPL) -> torch.Tensor:
    """Stride-1 zero-padded 3×3 convolution of every image with its own kernel:
    ``u (B, c, H, W)``, ``w (B, d, c, 3, 3)`` → ``(B, d, H, W)``."""
    if u.dim() != 4 or w.dim() != 5 or w.shape[0] != u.shape[0] or w.shape[2] != u.shape[1]:
        raise ValueError(f"per_sample_conv3x3: need u (B, c, H, W) and w (B, d, c, 3, 3), got "
                         f"{tuple(u.shape)} and {tuple(w.shape)}")
    if impl == "hybrid":
        return _HybridConv.apply(u, w)
    if impl == "loop":
        return _conv_loop(u, w)
    if impl == "unfold":
        return _conv_unfold(u, w)
    if impl == "grouped":
        return _conv_grouped(u, w)
    if impl == "vmap":
        return _vmapped_conv(u, w)
    raise ValueError(f"unknown conv impl {impl!r}; choose one of {list(CONV_IMPLS)}")


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------


class ConvNCODE(nn.Module):
    """See the module docstring. Inputs are NHWC images ``(B, H, W, c)`` like the JAX model's."""

    def __init__(
        self,
        kind: str,
        image_shape: tuple[int, int, int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        hidden: int = 50,
        augment: int = 10,
        gamma_hidden: Sequence[int] = (10,),
        feedback_hidden: Sequence[int] = (10,),
        conv_impl: str = DEFAULT_CONV_IMPL,
        dtype=torch.float32,
    ):
        super().__init__()
        if kind not in IMAGE_KINDS:
            raise ValueError(f"unknown model {kind!r}; choose one of {list(IMAGE_KINDS)}")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv impl {conv_impl!r}; choose one of {list(CONV_IMPLS)}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}")
        self.kind, self.conv_impl = kind, conv_impl
        self.image_shape = tuple(image_shape)
        hh, ww, c = image_shape
        self.extra = 0 if kind == "node" else augment
        self.C = C = c + self.extra
        self.h = h = hidden
        self.HW = hh * ww
        self.features = C * hh * ww
        self.sizes = [C * h, h, 9 * h * h, h, h * C, C]  # w1, b1, w2, b2, w3, b3
        self.P = sum(self.sizes)
        self.theta = nn.Parameter(torch.zeros(self.P, dtype=dtype))
        self.hyper = mlp_params((hh * ww * c, *gamma_hidden, self.P), dtype) if kind == "open" else None
        self.feedback = (mlp_params((self.P + self.features + 1, *feedback_hidden, self.P), dtype)
                         if kind == "closed" else None)
        self.head_w = nn.Parameter(torch.zeros(self.features, num_classes, dtype=dtype))
        self.head_b = nn.Parameter(torch.zeros(num_classes, dtype=dtype))
        self.last_nfe = 0

    def __repr__(self):
        return f"ConvNCODE({self.kind!r}, image_shape={self.image_shape}, hidden={self.h}, C={self.C})"

    def jax_leaves(self):
        """``(path, tensor)`` pairs in the order of the JAX ``FlowClassifier.init`` PyTree."""
        out = [(("flow", "initial", "theta"), self.theta)]
        if self.kind == "open":
            out += mlp_leaves(("flow", "initial", "mlp"), self.hyper)
        if self.kind == "closed":
            out += mlp_leaves(("flow", "feedback", "mlp"), self.feedback)
        return out + [(("head", "w"), self.head_w), (("head", "b"), self.head_b)]

    # -- the field -----------------------------------------------------------------------------
    def weights(self, theta: torch.Tensor):
        """θ ``(P,)`` or ``(B, P)`` → ``w1ᵀ (…, h, C)``, ``b1 (…, h, 1)``, ``w2 (…, h, h, 3, 3)``
        OIHW, ``b2 (…, h, 1, 1)``, ``w3ᵀ (…, C, h)``, ``b3 (…, C, 1)``."""
        C, h = self.C, self.h
        lead = theta.shape[:-1]
        w1, b1, w2, b2, w3, b3 = torch.split(theta, self.sizes, -1)
        w2 = w2.reshape(*lead, 3, 3, h, h)
        w2 = w2.permute(*range(len(lead)), -1, -2, -4, -3).contiguous()
        return (w1.reshape(*lead, C, h).transpose(-1, -2), b1.unsqueeze(-1),
                w2, b2[..., None, None], w3.reshape(*lead, h, C).transpose(-1, -2), b3.unsqueeze(-1))

    def field(self, x: torch.Tensor, weights) -> torch.Tensor:
        """``f(x)`` for an NCHW state ``x (B, C, H, W)`` and :meth:`weights` (shared or per sample)."""
        w1t, b1, w2, b2, w3t, b3 = weights
        b, C, hh, ww = x.shape
        xf = x.reshape(b, C, hh * ww)
        if w1t.dim() == 2:  # shared θ: ordinary (batched) convolutions
            hid = torch.relu(torch.matmul(w1t, xf) + b1).view(b, self.h, hh, ww)
            hid = torch.relu(F.conv2d(hid, w2, b2.view(-1), padding=1))
            return (torch.matmul(w3t, hid.view(b, self.h, hh * ww)) + b3).view(b, C, hh, ww)
        hid = torch.relu(torch.baddbmm(b1, w1t, xf)).view(b, self.h, hh, ww)
        hid = torch.relu(per_sample_conv3x3(hid, w2, self.conv_impl) + b2)
        return torch.baddbmm(b3, w3t, hid.view(b, self.h, hh * ww)).view(b, C, hh, ww)

    def _nhwc_rows_to_nchw(self, w: torch.Tensor) -> torch.Tensor:
        """Rows of ``w (H·W·C, k)`` indexed NHWC-flat → indexed NCHW-flat."""
        hh, ww, _ = self.image_shape
        return w.reshape(hh, ww, self.C, -1).permute(2, 0, 1, 3).reshape(self.features, -1)

    # -- the solve -------------------------------------------------------------------------------
    def rhs(self, images: torch.Tensor):
        """``(func, y0, adjoint_params, unpack)`` for torchdiffeq; ``unpack(y(T))`` is NCHW x(T)."""
        b, hh, ww, c = images.shape
        if (hh, ww, c) != self.image_shape:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected (B, {hh}, {ww}, {c}) "
                             f"with (H, W, c) = {self.image_shape}")
        x0 = images.permute(0, 3, 1, 2)
        if self.extra:
            x0 = torch.cat([x0, x0.new_zeros(b, self.extra, hh, ww)], 1)
        x0 = x0.contiguous()
        shape = x0.shape
        if self.kind != "closed":
            theta0 = self.theta
            if self.kind == "open":
                theta0 = theta0 + mlp(self.hyper, images.reshape(b, -1))
            consts = self.weights(theta0)

            def func(t, x):
                return self.field(x, consts)

            return func, x0, consts, lambda y: y

        # closed loop: z = [x (NCHW-flat), θ]; g's first layer acts on z with its rows reordered
        fb, P, n = self.feedback, self.P, self.features
        w_in = fb[0]
        w_z = torch.cat([self._nhwc_rows_to_nchw(w_in[P : P + n]), w_in[:P]], 0)
        w_t, b_in, rest = w_in[P + n], fb[1], tuple(fb[2:])
        z0 = torch.cat([x0.reshape(b, n), self.theta.expand(b, P)], 1)

        def func(t, z):
            x, theta = torch.split(z, [n, P], 1)
            dx = self.field(x.view(shape), self.weights(theta))
            hid = torch.addmm(b_in + t * w_t, z, w_z)
            for i in range(len(rest) // 2):
                hid = torch.addmm(rest[2 * i + 1], torch.tanh(hid), rest[2 * i])
            return torch.cat([dx.reshape(b, n), hid], 1)

        return func, z0, (w_z, w_t, b_in, *rest), lambda y: y[:, :n].view(shape)

    def forward(self, images: torch.Tensor, *, t1: float = 1.0, solver: str = "rk4",
                dt: float | None = None, rtol: float = 1e-3, atol: float = 1e-6,
                adjoint: bool = False) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for NHWC ``images``; solver options as
        :func:`~benchmarks.torch_baseline.core.odeint_final`. The forward NFE is in ``last_nfe``
        and, after ``backward()``, forward + adjoint evaluations in ``counter.nfe``."""
        func, y0, adjoint_params, unpack = self.rhs(images)
        yt, self.counter = odeint_final(func, y0, t1=t1, solver=solver, dt=dt, rtol=rtol, atol=atol,
                                        adjoint=adjoint, adjoint_params=adjoint_params)
        self.last_nfe = self.counter.nfe
        xt = unpack(yt)
        return torch.addmm(self.head_b, xt.reshape(xt.shape[0], -1), self._nhwc_rows_to_nchw(self.head_w))
