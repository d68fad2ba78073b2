"""Solvers by name, including classical fourth-order Runge–Kutta (3/8 rule).

diffrax ships no classical RK4; torchdiffeq's ``rk4`` is the 3/8 rule, so :class:`RK4` uses the
same Butcher tableau — both frameworks then take identical steps (docs/design.md, "rk4 is the
3/8 rule"). It has no embedded error estimate and is fixed-step only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import diffrax
import numpy as np


class RK4(diffrax.AbstractERK):
    """Classical 4th-order Runge–Kutta, 3/8 rule (torchdiffeq's ``rk4``). Fixed step only."""

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
        b_error=np.zeros(4),
        a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
    )
    interpolation_cls: ClassVar[Callable[..., diffrax.ThirdOrderHermitePolynomialInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        del terms
        return 4


@dataclass(frozen=True)
class SolverInfo:
    """What :func:`~ncode_jax.solve.solve` needs to know about a named solver."""

    make: Callable[[], diffrax.AbstractSolver]
    adaptive: bool  # has an embedded error estimate

    @property
    def stages(self) -> int:
        """Vector-field evaluations per step, before first-same-as-last reuse."""
        tableau = getattr(self.make, "tableau", None)
        return 1 if tableau is None else tableau.num_stages

    @property
    def order(self) -> int:
        """The method's order of accuracy p (global error O(dt^p))."""
        return int(self.make().order(None))

    @property
    def fsal(self) -> bool:
        """Whether a step's first stage reuses the previous step's last evaluation."""
        tableau = getattr(self.make, "tableau", None)
        return bool(tableau is not None and tableau.fsal)


SOLVERS: dict[str, SolverInfo] = {
    "euler": SolverInfo(diffrax.Euler, False),
    "midpoint": SolverInfo(diffrax.Midpoint, True),
    "heun": SolverInfo(diffrax.Heun, True),
    "rk4": SolverInfo(RK4, False),
    "bosh3": SolverInfo(diffrax.Bosh3, True),
    "tsit5": SolverInfo(diffrax.Tsit5, True),
    "dopri5": SolverInfo(diffrax.Dopri5, True),
    "dopri8": SolverInfo(diffrax.Dopri8, True),
}


def unknown_choice(what: str, name, choices: list) -> str:
    """The error text for a name that is not one of ``choices``."""
    return f"unknown {what} {name!r}; choose one of {choices}"


def solver_info(name: str) -> SolverInfo:
    """The :class:`SolverInfo` of a solver name in :data:`SOLVERS`.

    Raises:
      ValueError: an unknown name (listing the known ones).
    """
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(unknown_choice("solver", name, sorted(SOLVERS))) from None


def nfe_count(solver: str, num_steps):
    """Forward vector-field evaluations for ``num_steps`` steps (accepted + rejected).

    Explicit RK: ``stages`` per step, minus one when first-same-as-last, plus one initial
    evaluation for FSAL methods. (diffrax 0.7's automatic initial step size adds no evaluation
    that reaches the field; ``tests/test_solve.py`` checks this formula against a counter.)
    """
    info = solver_info(solver)
    per_step = info.stages - int(info.fsal)
    return num_steps * per_step + int(info.fsal)
