"""A minimal functional MLP (parameters as a list of ``{"w", "b"}`` dicts).

Used by the controllers (γ and g) and the read-out heads. Kept tiny on purpose: parameters are
plain PyTrees so that they pass through diffrax ``args`` and optax untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .fields import activation, dense

MLPParams = list[dict[str, Array]]


def mlp_init(
    key: PRNGKeyArray,
    sizes: Sequence[int],
    *,
    last_scale: float | Array = 1.0,
    dtype=jnp.float32,
) -> MLPParams:
    """LeCun-normal weights and zero biases for layer sizes ``(in, h1, ..., out)``.

    ``last_scale`` multiplies the last layer's weights: a scalar, or a vector of length ``out``
    (e.g. the per-entry scale of the θ the layer produces).
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"mlp_init: need at least two positive layer sizes, got {tuple(sizes)}")
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        w = jax.random.normal(k, (n_in, n_out), dtype) / math.sqrt(n_in)
        if i == len(sizes) - 2:
            w = w * jnp.broadcast_to(jnp.asarray(last_scale, dtype), w.shape)
        layers.append({"w": w, "b": jnp.zeros((n_out,), dtype)})
    return layers


def mlp_apply(params: MLPParams, x: Array, act: str = "tanh", *, fold_last_bias: bool = False) -> Array:
    """Apply the MLP on the last axis of ``x`` ``(..., in)``; no activation after the last layer.

    ``fold_last_bias=True`` computes the last layer as ``[x, 1] @ [[W], [b]]``: the same function
    (to float rounding), but the bias gradient becomes one row of the weight-gradient matrix
    product instead of a sum over the batch. Worth it for a wide last layer evaluated often, as the
    closed-loop g (θ-sized output at every solver stage): XLA:CPU's (YNNPACK) sum of a
    ``(64, 23711)`` cotangent over the batch took 7.5 ms against 0.66 ms for XLA's own loop, and
    the folded layer's forward + VJP 2.4 ms against 7.7 ms (benchmarks/README.md, "Fifth session");
    for narrow layers (``(256, 32) → 64``) it is slightly slower (0.17 vs 0.15 ms). The bias
    then goes through the matrix product at its precision: exact to f32/f64 rounding on CPU, but
    rounded like the weights under a reduced default matmul precision (TF32 on recent GPUs, bf16
    passes on TPU), which is why :class:`~ncode_jax.control.Feedback` folds on CPU only.
    """
    sigma = activation(act)
    for i, layer in enumerate(params):
        last = i == len(params) - 1
        if last and fold_last_bias:
            ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
            x = jnp.concatenate([x, ones], -1) @ jnp.concatenate([layer["w"], layer["b"][None]], 0)
        else:
            x = dense(x, layer["w"], layer["b"])
        if not last:
            x = sigma(x)
    return x
