"""Pieces every PyTorch baseline model shares: tanh MLPs stored like ncode_jax's, one torchdiffeq
call with an evaluation counter, and copying a JAX params PyTree in (and gradients out).

Weights are stored like JAX's (``w`` of shape ``(in, out)``, ``y = x @ w + b``), so a JAX params
PyTree copies in as is. A model lists its parameters as ``(path, tensor)`` pairs in the JAX
PyTree's order (``model.jax_leaves()``); :func:`load_jax_params` and :func:`grads_as_jax_tree`
work from that list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchdiffeq
from torch import nn


def mlp_params(sizes: Sequence[int], dtype) -> nn.ParameterList:
    """``[w0, b0, w1, b1, ...]`` with ``w`` of shape ``(in, out)`` (LeCun normal), zero ``b``."""
    out = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        out.append(nn.Parameter(torch.randn(n_in, n_out, dtype=dtype) / math.sqrt(n_in)))
        out.append(nn.Parameter(torch.zeros(n_out, dtype=dtype)))
    return nn.ParameterList(out)


def mlp(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """tanh MLP on the last axis; no activation after the last layer (``ncode_jax.mlp_apply``)."""
    n = len(params) // 2
    for i in range(n):
        x = torch.addmm(params[2 * i + 1], x, params[2 * i])
        if i < n - 1:
            x = torch.tanh(x)
    return x


def mlp_leaves(prefix: tuple, params: Sequence[torch.Tensor]) -> list[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` of an MLP in the JAX layout ``[{"w", "b"}, ...]`` under ``prefix``."""
    out = []
    for i in range(len(params) // 2):
        out += [((*prefix, i, "w"), params[2 * i]), ((*prefix, i, "b"), params[2 * i + 1])]
    return out


class Counted(nn.Module):
    """Wraps a right-hand side ``fn(t, y)`` and counts its calls (forward and adjoint)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.fn(t, y)


def odeint_final(
    func,
    y0: torch.Tensor,
    *,
    t1: float,
    solver: str = "rk4",
    dt: float | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    adjoint: bool = False,
    adjoint_params: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, Counted]:
    """``(y(t1), counter)`` from ``y(0) = y0`` at ``t = 0``. ``solver="rk4"`` is fixed-step (the
    3/8 rule, as ``ncode_jax``'s ``rk4``) and needs ``dt``; adaptive solvers take ``rtol``/``atol``.
    ``adjoint=False``: ``torchdiffeq.odeint`` (backprop through the solver); ``True``:
    ``odeint_adjoint`` (continuous adjoint w.r.t. ``adjoint_params``). ``counter.nfe`` counts the
    forward evaluations, and after ``backward()`` the adjoint's too."""
    counter = Counted(func)
    t = torch.tensor([0.0, t1], dtype=y0.dtype, device=y0.device)
    if solver == "rk4":
        if dt is None:
            raise ValueError("rk4 is fixed-step: pass dt")
        kw = dict(method="rk4", options=dict(step_size=dt))
    else:
        if dt is not None:
            raise ValueError("adaptive solvers take rtol/atol, not dt")
        kw = dict(method=solver, rtol=rtol, atol=atol)
    if adjoint:
        ys = torchdiffeq.odeint_adjoint(counter, y0, t, adjoint_params=tuple(adjoint_params), **kw)
    else:
        ys = torchdiffeq.odeint(counter, y0, t, **kw)
    return ys[-1], counter


def _iter_arrays(tree, path=()):
    """``(path, leaf)`` for every non-None leaf of nested dicts/lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _iter_arrays(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _iter_arrays(v, (*path, i))
    elif tree is not None:
        yield path, tree


def load_jax_params(model: nn.Module, params) -> nn.Module:
    """Copy a JAX params PyTree (arrays or NumPy) into ``model`` (anything with ``jax_leaves()``),
    in place. Raises a ValueError on a missing or extra entry (e.g. closed-loop params for an
    open-loop model) or a shape mismatch."""
    leaves = model.jax_leaves()
    given = dict(_iter_arrays(params))
    expected = {path for path, _ in leaves}
    if set(given) != expected:
        fmt = lambda ps: ", ".join("/".join(map(str, p)) for p in sorted(ps, key=str))  # noqa: E731
        raise ValueError(
            f"JAX params do not fit {model!r}: missing [{fmt(expected - set(given))}], "
            f"unexpected [{fmt(set(given) - expected)}]"
        )
    with torch.no_grad():
        for path, p in leaves:
            a = np.asarray(given[path])
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"params{list(path)} has shape {a.shape}, expected {tuple(p.shape)}")
            p.copy_(torch.as_tensor(np.array(a), dtype=p.dtype, device=p.device))
    return model


def grads_as_jax_tree(model: nn.Module) -> dict:
    """The ``.grad`` of every parameter as NumPy, in the JAX params PyTree's structure (zeros
    where a parameter got no gradient)."""
    tree: dict = {}
    for path, p in model.jax_leaves():
        g = (np.zeros(tuple(p.shape), np.float32) if p.grad is None
             else p.grad.detach().cpu().numpy().copy())
        node = tree
        for k, nxt in zip(path[:-1], path[1:]):
            if isinstance(node, list):
                while len(node) <= k:
                    node.append(None)
                if node[k] is None:
                    node[k] = [] if isinstance(nxt, int) else {}
                node = node[k]
            else:
                node = node.setdefault(k, [] if isinstance(nxt, int) else {})
        last = path[-1]
        if isinstance(node, list):
            while len(node) <= last:
                node.append(None)
        node[last] = g
    return tree
