"""Toy N-CODE in PyTorch + torchdiffeq, parameter-for-parameter the same as ncode_jax's.

``ToyNCODE(kind, dim, hidden)`` mirrors ``ncode_jax.NCODE.build(kind, MLPField(dim, hidden),
(dim,))`` for ``kind`` in ``node``, ``open``, ``closed``:

* field ``f(t, x, θ) = W₂ tanh(W₁ x + b₁) + b₂`` with flat ``θ = [W₁ (dim, hidden) C-order, b₁,
  W₂ (hidden, dim) C-order, b₂]`` — ncode_jax's ``ParamLayout`` order, ``P = 2·dim·hidden +
  hidden + dim``; θ shared ``(P,)`` (node) or per sample ``(B, P)``;
* ``node``: θ = θ̄ for every sample, constant;
* ``open``: θ(0) = γ(x(0)) = θ̄ + MLP(x(0)) (tanh hidden layers), constant in time;
* ``closed``: θ(0) = θ̄, ``dθ/dt = g(θ, x, t) = MLP([θ, x, t])`` (tanh hidden layers).

Weights are stored like JAX's (``w`` of shape ``(in, out)``, ``y = x @ w + b``) so
:func:`load_jax_params` copies a JAX params PyTree as is and :func:`grads_as_jax_tree` returns the
gradients in the same PyTree shape.

Written for speed on CPU (measured, see ``benchmarks/README.md``): the batch is one ODE system;
per-sample weights are strided views of θ fed to ``torch.baddbmm`` (faster here than einsum or
broadcast-multiply-sum, forward and backward); in open loop the constant θ is cut into weights once
per solve, not per evaluation; the closed-loop state is one tensor ``z = [x, θ]`` of shape
``(B, dim + P)`` (torchdiffeq's default RMS norm over it equals diffrax's RMS norm over the
``(x, θ)`` PyTree); the field's weights are cut out of ``z`` with one ``torch.split`` (one cat in
the backward instead of a zero-filled gradient per slice: 9–13% faster per evaluation) and g's
first layer is applied to ``z`` directly with its weight rows permuted once per solve, so no
per-evaluation concatenation of g's input is needed. Measured and not used: ``torch.compile`` of
the right-hand side (slower: 70 vs 59 ms per closed-loop rk4 step, 156 vs 119 ms with the adjoint).
The benchmarks use ``torch.optim.Adam(fused=True)`` (111 vs 269 µs per update here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .core import grads_as_jax_tree, load_jax_params, mlp, mlp_leaves, mlp_params, odeint_final

__all__ = ["KINDS", "ToyNCODE", "grads_as_jax_tree", "load_jax_params", "solve_toy"]

KINDS = ("node", "open", "closed")


class ToyNCODE(nn.Module):
    """Toy N-CODE with an MLP field; see the module docstring. ``hidden`` is the field's width,
    ``ctrl_hidden`` γ's hidden widths, ``feedback_hidden`` g's hidden widths (ncode_jax's
    ``NCODE.build`` defaults: 16, (32,), (32,))."""

    def __init__(
        self,
        kind: str,
        dim: int = 2,
        hidden: int = 16,
        ctrl_hidden: Sequence[int] = (32,),
        feedback_hidden: Sequence[int] = (32,),
        dtype=torch.float32,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {list(KINDS)}")
        self.kind, self.dim, self.hidden = kind, dim, hidden
        d, h = dim, hidden
        # flat θ layout (ncode_jax ParamLayout order): w1 (d, h), b1 (h,), w2 (h, d), b2 (d,)
        self.offsets = {"w1": (0, d * h), "b1": (d * h, d * h + h),
                        "w2": (d * h + h, 2 * d * h + h), "b2": (2 * d * h + h, 2 * d * h + h + d)}
        self.P = 2 * d * h + h + d
        self.theta = nn.Parameter(torch.zeros(self.P, dtype=dtype))  # θ̄
        self.hyper = mlp_params((d, *ctrl_hidden, self.P), dtype) if kind == "open" else None
        self.feedback = (
            mlp_params((self.P + d + 1, *feedback_hidden, self.P), dtype) if kind == "closed" else None
        )
        self.last_nfe = 0

    # -- the field f -------------------------------------------------------------------------
    def weights(self, theta: torch.Tensor):
        """Cut θ ``(P,)`` or ``(B, P)`` into ``w1, b1, w2, b2`` (views, no copies)."""
        d, h, o = self.dim, self.hidden, self.offsets
        lead = theta.shape[:-1]
        w1 = theta[..., o["w1"][0] : o["w1"][1]].reshape(*lead, d, h)
        b1 = theta[..., o["b1"][0] : o["b1"][1]]
        w2 = theta[..., o["w2"][0] : o["w2"][1]].reshape(*lead, h, d)
        b2 = theta[..., o["b2"][0] : o["b2"][1]]
        return w1, b1, w2, b2

    @staticmethod
    def field_from_weights(x, w1, b1, w2, b2):
        """``f`` for shared ``(d, h)`` weights, or per-sample ``(B, d, h)`` with ``b1``/``b2`` given
        as ``(B, 1, h)``/``(B, 1, d)``."""
        if w1.dim() == 2:
            return torch.addmm(b2, torch.tanh(torch.addmm(b1, x, w1)), w2)
        hid = torch.tanh(torch.baddbmm(b1, x.unsqueeze(1), w1))
        return torch.baddbmm(b2, hid, w2).squeeze(1)

    def field(self, t, x, theta):
        """``f(t, x, θ)`` for θ ``(P,)`` or ``(B, P)`` (reference form, used by tests)."""
        del t
        w1, b1, w2, b2 = self.weights(theta)
        if theta.dim() == 2:
            b1, b2 = b1.unsqueeze(1), b2.unsqueeze(1)
        return self.field_from_weights(x, w1, b1, w2, b2)

    # -- the controllers ---------------------------------------------------------------------
    def initial_theta(self, x0: torch.Tensor) -> torch.Tensor:
        """θ(0): ``(P,)`` (node, closed) or ``(B, P)`` (open: θ̄ + MLP(x0))."""
        if self.kind == "open":
            return self.theta + mlp(self.hyper, x0)
        return self.theta

    def g(self, t, theta, x):
        """``g(θ, x, t) = MLP([θ, x, t])`` (reference form, used by tests)."""
        b = x.shape[0]
        inp = torch.cat([theta.expand(b, self.P), x, t.reshape(1, 1).expand(b, 1).to(x.dtype)], 1)
        return mlp(self.feedback, inp)

    # -- the ODE right-hand side ---------------------------------------------------------------
    def rhs(self, x0: torch.Tensor):
        """``(func, y0, adjoint_params, unpack)`` for torchdiffeq: ``unpack(y(T))`` gives x(T)."""
        b, d, P = x0.shape[0], self.dim, self.P
        theta0 = self.initial_theta(x0)
        if self.kind in ("node", "open"):
            w1, b1, w2, b2 = self.weights(theta0)
            if theta0.dim() == 2:
                b1, b2 = b1.unsqueeze(1), b2.unsqueeze(1)
            consts = (w1, b1, w2, b2)

            def func(t, x):
                return self.field_from_weights(x, *consts)

            return func, x0, consts, lambda y: y

        # closed loop: z = [x, θ]; g's first layer acts on z with rows permuted to [x; θ]
        fb = self.feedback
        w_in = fb[0]
        w_z = torch.cat([w_in[P : P + d], w_in[:P]], 0)  # (d + P, H)
        w_t, b_in = w_in[P + d], fb[1]
        rest = tuple(fb[2:])
        z0 = torch.cat([x0, self.theta.expand(b, P)], 1)
        h = self.hidden
        sizes = [d, d * h, h, h * d, d]  # z = [x, w1, b1, w2, b2]

        def func(t, z):
            # one split (its backward is one cat) instead of five slices (five zero-filled grads)
            x, w1, b1, w2, b2 = torch.split(z, sizes, 1)
            dx = self.field_from_weights(x, w1.view(b, d, h), b1.unsqueeze(1), w2.view(b, h, d),
                                         b2.unsqueeze(1))
            hid = torch.addmm(b_in + t * w_t, z, w_z)
            n = len(rest) // 2
            for i in range(n):
                hid = torch.addmm(rest[2 * i + 1], torch.tanh(hid), rest[2 * i])
            return torch.cat([dx, hid], 1)

        return func, z0, (w_z, w_t, b_in, *rest), lambda y: y[:, :d]

    def forward(
        self,
        x0: torch.Tensor,
        *,
        t1: float = 1.0,
        solver: str = "rk4",
        dt: float | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        adjoint: bool = False,
    ) -> torch.Tensor:
        """x(T) for x0 ``(B, dim)``. ``adjoint=False``: ``odeint`` (backprop through the solver,
        discretise-then-optimise); ``True``: ``odeint_adjoint`` (continuous adjoint, re-solves
        backwards). Field evaluations of the last call (forward, plus the adjoint's during the
        backward pass) accumulate in ``self.last_nfe``/``self.counter.nfe``."""
        func, y0, adjoint_params, unpack = self.rhs(x0)
        yt, self.counter = odeint_final(func, y0, t1=t1, solver=solver, dt=dt, rtol=rtol, atol=atol,
                                        adjoint=adjoint, adjoint_params=adjoint_params)
        self.last_nfe = self.counter.nfe
        return unpack(yt)

    def jax_leaves(self):
        """``(path, tensor)`` pairs in the order of the JAX params PyTree (``NCODE.init``)."""
        out = [(("initial", "theta"), self.theta)]
        if self.kind == "open":
            out += mlp_leaves(("initial", "mlp"), self.hyper)
        if self.kind == "closed":
            out += mlp_leaves(("feedback", "mlp"), self.feedback)
        return out

    def __repr__(self):
        return f"ToyNCODE({self.kind!r}, dim={self.dim}, hidden={self.hidden})"


def solve_toy(model: ToyNCODE, x0, **kw) -> tuple[torch.Tensor, int]:
    """``(x(T), forward NFE)``; keyword arguments as :meth:`ToyNCODE.forward`."""
    xt = model(x0, **kw)
    return xt, model.last_nfe
