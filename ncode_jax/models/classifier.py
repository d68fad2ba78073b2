"""A flow followed by a linear read-out of the flattened final state ``x(T)`` (paper sec. 5.1–5.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ..fields import dense
from ..ncode import NCODE
from ..solve import Solution


@dataclass(frozen=True)
class FlowClassifier:
    """``logits = W · flatten(pool(x(T))) + b`` where ``x(T)`` comes from an :class:`NCODE` flow.

    ``pool > 1`` (image states ``(H, W, C)`` only) averages ``x(T)`` over non-overlapping
    ``pool × pool`` windows first; the read-out stays linear in ``x(T)`` with ``pool²`` times
    fewer weights.
    """

    flow: NCODE
    num_classes: int
    pool: int = 1

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        s = self.flow.field.state_shape
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if self.pool > 1 and (len(s) != 3 or s[0] % self.pool or s[1] % self.pool):
            raise ValueError(f"pool={self.pool} needs an image state (H, W, C) with H and W divisible "
                             f"by it, got state shape {s}")

    @property
    def pooled_shape(self) -> tuple[int, ...]:
        s = self.flow.field.state_shape
        if self.pool == 1:
            return tuple(s)
        return (s[0] // self.pool, s[1] // self.pool, s[2])

    @property
    def features(self) -> int:
        return math.prod(self.pooled_shape)

    def init(self, key: PRNGKeyArray, dtype=jnp.float32) -> dict:
        k_flow, k_head = jax.random.split(key)
        w = jax.random.normal(k_head, (self.features, self.num_classes), dtype)
        return {
            "flow": self.flow.init(k_flow, dtype),
            "head": {"w": w / math.sqrt(self.features), "b": jnp.zeros((self.num_classes,), dtype)},
        }

    def readout(self, params: dict, xT: Array) -> Array:
        """Logits ``(..., B, num_classes)`` from final states ``(..., B, *S)``."""
        s = self.flow.field.state_shape
        lead = xT.shape[: xT.ndim - len(s)]
        if self.pool > 1:
            h, w, c, k = *s, self.pool
            xT = xT.reshape(*lead, h // k, k, w // k, k, c).mean(axis=(-4, -2))
        flat = xT.reshape(*lead, self.features)
        return dense(flat, params["head"]["w"], params["head"]["b"])

    def __call__(self, params: dict, x0: Array, **options) -> tuple[Array, Solution]:
        """Logits ``(B, num_classes)`` (or ``(len(ts), B, num_classes)`` with ``ts``) and the
        solution; ``options`` are those of :meth:`NCODE.__call__ <ncode_jax.NCODE.__call__>`
        (``config=SolveConfig(...)`` or its fields, ``cost_args``, ``ts``, ...)."""
        sol = self.flow(params["flow"], x0, **options)
        return self.readout(params, sol.x), sol
