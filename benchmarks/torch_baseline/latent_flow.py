"""AutoN-CODE latent flow (paper sec. 5.3) in PyTorch + torchdiffeq, the same as ncode_jax's
``SparseLinearField(dim, offsets)`` solved with per-sample θ.

``dx/dt = A(θ) x`` where row ``i`` of ``A`` is non-zero only at columns ``(i + o) mod dim`` for
``o`` in ``offsets`` (default ``(0, 1)``: two entries per row, so θ has ``2·dim`` entries per sample,
the size of a VAE's mean + log-variance). Flat θ ``(B, dim·k)`` is ``a (dim, k)`` in C order with
``A[i, (i + offsets[j]) % dim] = a[i, j]`` — ``SparseLinearField``'s layout. ``x(0)`` is a constant
vector (shared ``(dim,)`` or per sample ``(B, dim)``), and ``x(T)`` (``T = 10`` in the paper) is the
latent code. There are no weights of its own: θ comes from an encoder, so the gradients of
interest are w.r.t. θ (and x(0)), and they flow through ordinary autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import odeint_final

__all__ = ["LatentFlow"]


class LatentFlow(nn.Module):
    """``forward(theta (B, dim·k), x0 (dim,) | (B, dim)) -> x(T) (B, dim)``."""

    def __init__(self, dim: int, offsets: tuple[int, ...] = (0, 1)):
        super().__init__()
        if dim < 1:
            raise ValueError(f"LatentFlow: dim must be >= 1, got {dim}")
        if len({o % dim for o in offsets}) != len(offsets):
            raise ValueError(f"offsets {offsets} repeat a column modulo dim={dim}")
        self.dim, self.offsets = dim, tuple(offsets)
        self.P = dim * len(offsets)
        self.last_nfe = 0

    def __repr__(self):
        return f"LatentFlow(dim={self.dim}, offsets={self.offsets})"

    def coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        """θ ``(B, dim·k)`` → ``a (B, dim, k)``."""
        if theta.dim() != 2 or theta.shape[1] != self.P:
            raise ValueError(f"theta has shape {tuple(theta.shape)}, expected (B, {self.P}) "
                             f"= (B, dim·len(offsets)) with dim={self.dim}, offsets={self.offsets}")
        return theta.view(theta.shape[0], self.dim, len(self.offsets))

    def matrix(self, theta: torch.Tensor) -> torch.Tensor:
        """The dense ``A(θ)`` ``(B, dim, dim)`` (for tests)."""
        a = self.coefficients(theta)
        rows = torch.arange(self.dim)
        out = a.new_zeros(a.shape[0], self.dim, self.dim)
        for k, o in enumerate(self.offsets):
            out[:, rows, (rows + o) % self.dim] = a[:, :, k]
        return out

    def field(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A(θ) x`` from the coefficients ``a (B, dim, k)`` without forming ``A``."""
        out = a[:, :, 0] * torch.roll(x, -self.offsets[0], -1) if self.offsets[0] else a[:, :, 0] * x
        for k, o in enumerate(self.offsets[1:], 1):
            out = out + a[:, :, k] * torch.roll(x, -o, -1)
        return out

    def forward(self, theta: torch.Tensor, x0: torch.Tensor, *, t1: float = 10.0, solver: str = "rk4",
                dt: float | None = None, rtol: float = 1e-3, atol: float = 1e-6,
                adjoint: bool = False) -> torch.Tensor:
        """x(T) ``(B, dim)``; solver options as :func:`~benchmarks.torch_baseline.core.odeint_final`."""
        a = self.coefficients(theta)
        x0 = x0.expand(theta.shape[0], self.dim).contiguous() if x0.dim() == 1 else x0
        if tuple(x0.shape) != (theta.shape[0], self.dim):
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected ({self.dim},) or "
                             f"({theta.shape[0]}, {self.dim})")
        xt, self.counter = odeint_final(lambda t, x: self.field(x, a), x0, t1=t1, solver=solver, dt=dt,
                                        rtol=rtol, atol=atol, adjoint=adjoint, adjoint_params=(a,))
        self.last_nfe = self.counter.nfe
        return xt
