"""A flow followed by a linear read-out of the flattened final state ``x(T)`` (paper sec. 5.1–5.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ..ncode import NCODE
from ..solve import Solution


@dataclass(frozen=True)
class FlowClassifier:
    """``logits = W · flatten(x(T)) + b`` where ``x(T)`` comes from an :class:`NCODE` flow."""

    flow: NCODE
    num_classes: int

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    @property
    def features(self) -> int:
        return math.prod(self.flow.field.state_shape)

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
        flat = xT.reshape(*xT.shape[: xT.ndim - len(s)], self.features)
        return flat @ params["head"]["w"] + params["head"]["b"]

    def __call__(self, params: dict, x0: Array, **solve_options) -> tuple[Array, Solution]:
        """Logits ``(B, num_classes)`` (or ``(len(ts), B, num_classes)`` with ``ts``) and the
        solution."""
        sol = self.flow(params["flow"], x0, **solve_options)
        return self.readout(params, sol.x), sol
