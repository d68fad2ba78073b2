"""An N-CODE flow as a Flax linen layer.

:class:`NCODEBlock` wraps :class:`~ncode_jax.ncode.NCODE` (field, controller kind, augmentation,
solver settings) so that it drops into any Flax model::

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16)(encoder(x))
            h = nc.NCODEBlock(nc.MLPField(16), kind="open", solve=nc.SolveConfig(solver="rk4", dt=0.25))(h)
            return nn.Dense(10)(h)

Its parameters (θ̄, the hypernetwork γ, the feedback g) are one Flax parameter ``ncode`` — the
plain PyTree that :meth:`NCODE.init <ncode_jax.ncode.NCODE.init>` returns — so ``model.init`` /
``model.apply`` / optax work as usual. The block returns ``x(T)`` and sows the solve statistics
(``num_steps``, ``nfe``, ...) into the ``intermediates`` collection under ``solve_stats``; with
``return_stats=True`` it returns ``(x(T), stats)`` instead.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array

from .fields import VectorField
from .ncode import KINDS, NCODE
from .solving.options import SolveConfig

__all__ = ["NCODEBlock"]


class NCODEBlock(nn.Module):
    """``x ↦ x(T)`` of an N-CODE flow started at ``x(0) = augment(x)``.

    Attributes:
      field: any :class:`~ncode_jax.fields.VectorField` (``MLPField``, ``ConvBlockField``,
        ``ModuleField`` — for a Flax module use ``ModuleField.from_flax(module, x_example, key)``).
        Its ``state_shape`` must be one input sample's shape with ``augment`` extra channels.
      kind: ``node``, ``anode``, ``open`` (θ(0) = γ(x(0))), ``closed`` or ``open_closed``.
      augment: zero channels appended to the last axis (ANODE-style).
      hidden, feedback_hidden: widths of γ and g.
      solve: the solver settings, a :class:`~ncode_jax.SolveConfig` (validated when built).
      return_stats: return ``(x(T), stats)`` instead of ``x(T)``.
      param_dtype: dtype of the ``ncode`` parameters (float32).

    Input ``x``: ``(B, *data_shape)``; output ``(B, *field.state_shape)`` (augmented channels
    included). Raises ``TypeError`` for a field that is not a ``VectorField`` (e.g. a raw Flax
    module), ``ValueError`` for an unknown kind, or (at the first call) for an input whose padded
    shape is not the field's state shape and for bad solver settings (raised by ``solve``).
    """

    field: VectorField
    kind: str = "open"
    augment: int = 0
    hidden: tuple[int, ...] = (32,)
    feedback_hidden: tuple[int, ...] = (32,)
    solve: SolveConfig = SolveConfig()
    return_stats: bool = False
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if isinstance(self.field, nn.Module):
            raise TypeError(
                f"NCODEBlock: field is a Flax module ({type(self.field).__name__}); wrap it first: "
                "field=ModuleField.from_flax(module, x_example, key), x_example a batch of states"
            )
        if not isinstance(self.field, VectorField):
            raise TypeError(f"NCODEBlock: field must be a VectorField, got {type(self.field).__name__}")
        if not isinstance(self.solve, SolveConfig):
            raise TypeError(f"NCODEBlock: solve must be a SolveConfig, got {type(self.solve).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"NCODEBlock: unknown kind {self.kind!r}; choose one of {list(KINDS)}")
        super().__post_init__()

    def ncode(self, data_shape: tuple[int, ...]) -> NCODE:
        """The underlying :class:`~ncode_jax.ncode.NCODE` for inputs of one-sample shape ``data_shape``."""
        return NCODE.build(
            self.kind,
            self.field,
            tuple(data_shape),
            augment=self.augment,
            hidden=tuple(self.hidden),
            feedback_hidden=tuple(self.feedback_hidden),
        )

    @nn.compact
    def __call__(self, x: Array):
        if x.ndim < 2:
            raise ValueError(f"NCODEBlock expects a batch (B, *data_shape), got shape {tuple(x.shape)}")
        model = self.ncode(tuple(x.shape[1:]))
        params = self.param("ncode", lambda key: model.init(key, self.param_dtype))
        sol = model(params, x, config=self.solve)
        self.sow("intermediates", "solve_stats", sol.stats)
        return (sol.x, sol.stats) if self.return_stats else sol.x
