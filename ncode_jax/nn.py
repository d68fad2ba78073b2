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

from .fields import activation

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
            w = w * jnp.asarray(last_scale, dtype)
        layers.append({"w": w, "b": jnp.zeros((n_out,), dtype)})
    return layers


def mlp_apply(params: MLPParams, x: Array, act: str = "tanh") -> Array:
    """Apply the MLP on the last axis of ``x``; no activation after the last layer."""
    sigma = activation(act)
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = sigma(x)
    return x
