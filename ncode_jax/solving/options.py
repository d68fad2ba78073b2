"""The solver settings: :class:`SolveConfig` and the one table of rules every setting obeys.

Each :class:`Rule` reads some values, says when they are broken (written once, for NumPy and for
``jax.numpy``) and words the error once. :func:`enforce` applies a table of rules: a rule whose
values are known at trace time raises at once (``ValueError``/``TypeError``); one whose values
are traced (jitted arguments) becomes a run-time check with the same words (see
:mod:`~ncode_jax.solving.guards`). :class:`SolveConfig` enforces :data:`CONFIG_RULES` when it is
built; :func:`~ncode_jax.solve` enforces :data:`SOLVE_RULES` (those that need the state's dtype
or the save times) and turns the config rules that met traced values into run-time checks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..solvers import SOLVERS, solver_info, unknown_choice
from .timegrid import MERGE_ULPS, steps_merged

#: ``checkpoint``: exact gradient of the discrete solve, by recursive checkpointing or, by
#: default with fixed steps that fit :data:`~ncode_jax.STORED_STEPS_MAX_BYTES`, by storing every
#: step; ``stored``: always store every fixed step; ``backsolve``: the continuous adjoint;
#: ``direct``: differentiate through the loop (forward mode too)
ADJOINTS = ("checkpoint", "stored", "backsolve", "direct")
BATCH_MODES = ("system", "vmap")
DEFAULT_ADAPTIVE_MAX_STEPS = 4096


def is_static_number(v) -> bool:
    """A Python or NumPy real scalar (not a traced JAX value, not a bool)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def is_concrete(v) -> bool:
    """A value known at trace time (``None``, a number, a NumPy array or a non-traced JAX array)."""
    if v is None or isinstance(v, str) or is_static_number(v) or isinstance(v, (np.ndarray, bool)):
        return True
    return isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer)


class Rule(NamedTuple):
    """One rule: ``broken(xp, values)`` (``xp`` is ``numpy`` for known values, ``jax.numpy``
    for traced ones) and ``message(values, known)``; ``reads`` names the values that may be
    traced (a rule reading none is decided at trace time); ``applies(values)`` whether the rule
    concerns this solve at all; ``traced=False``: a rule for known values only."""

    reads: tuple[str, ...]
    broken: Callable[[Any, dict], Any]
    message: Callable[[dict, bool], str]
    error: type[Exception] = ValueError
    applies: Callable[[dict], bool] = lambda v: True
    traced: bool = True


def _got(v: dict, known: bool, name: str) -> str:
    return f", got {name}={v[name]!r}" if known else ""


def _real_number(tol) -> bool:
    if isinstance(tol, (bool, np.bool_)) or not (is_concrete(tol) or isinstance(tol, jax.Array)):
        return False
    return not isinstance(tol, str) and bool(jnp.issubdtype(jnp.result_type(tol), jnp.number))


def _finite_scalar(xp, a):
    return (xp.ndim(a) == 0) & xp.all(xp.isfinite(a))


def _tolerance_rules(name: str) -> tuple[Rule, ...]:
    return (
        Rule((), lambda xp, v: not _real_number(v[name]),
             lambda v, k: f"{name} must be a real number, got {type(v[name]).__name__} {v[name]!r}",
         TypeError),
        Rule((name,), lambda xp, v: ~_finite_scalar(xp, v[name]) | xp.any(xp.asarray(v[name]) < 0),
             lambda v, k: f"{name} must be a finite number >= 0" + _got(v, k, name)),
    )


def _count_rules(name: str) -> tuple[Rule, ...]:
    given = lambda v: v[name] is not None  # noqa: E731
    return (
        Rule((), lambda xp, v: not isinstance(v[name], (int, np.integer)) or isinstance(v[name], bool),
             lambda v, k: f"{name} must be an integer, got {type(v[name]).__name__} {v[name]!r}", TypeError,
             given),
        Rule((), lambda xp, v: v[name] < 1, lambda v, k: f"{name} must be >= 1, got {name}={v[name]}",
             applies=given),
    )


def _time_rule(name: str) -> Rule:
    return Rule((name,), lambda xp, v: ~_finite_scalar(xp, v[name]),
                lambda v, k: f"{name} must be a finite number (the time interval)" + _got(v, k, name))


def _fixed(v) -> bool:
    return v["dt"] is not None


def _adaptive(v) -> bool:
    return v["dt"] is None


#: the rules of :class:`SolveConfig`'s fields, in the order they are checked
CONFIG_RULES: tuple[Rule, ...] = (
    Rule((), lambda xp, v: v["solver"] not in SOLVERS,
         lambda v, k: unknown_choice("solver", v["solver"], sorted(SOLVERS))),
    Rule((), lambda xp, v: v["adjoint"] not in ADJOINTS,
         lambda v, k: unknown_choice("adjoint", v["adjoint"], list(ADJOINTS))),
    Rule((), lambda xp, v: v["batch"] not in BATCH_MODES,
         lambda v, k: unknown_choice("batch mode", v["batch"], list(BATCH_MODES))),
    Rule((), lambda xp, v: not solver_info(v["solver"]).adaptive,
         lambda v, k: f"solver {v['solver']!r} has no error estimate, so it cannot choose its own steps: "
                      "pass a fixed step size dt=...", applies=_adaptive),
    Rule((), lambda xp, v: not is_static_number(v["dt"]),
         lambda v, k: "dt must be a Python or NumPy number (it fixes the step count at trace time), "
                      f"got {type(v['dt']).__name__} {v['dt']!r}", TypeError, _fixed),
    Rule((), lambda xp, v: not (math.isfinite(v["dt"]) and v["dt"] > 0),
         lambda v, k: f"dt must be a positive finite number, got dt={v['dt']!r}", applies=_fixed),
    *_tolerance_rules("rtol"),
    *_tolerance_rules("atol"),
    Rule(("rtol", "atol"), lambda xp, v: (xp.asarray(v["rtol"]) == 0) & (xp.asarray(v["atol"]) == 0),
         lambda v, k: "rtol and atol are both 0: the adaptive controller could never accept a step",
         applies=_adaptive),
    _time_rule("t0"),
    _time_rule("t1"),
    *_count_rules("max_steps"),
    *_count_rules("checkpoints"),
    Rule((), lambda xp, v: v["adjoint"] != "checkpoint",
         lambda v, k: f"checkpoints={v['checkpoints']} applies to adjoint='checkpoint' only, not "
                      f"{v['adjoint']!r}", applies=lambda v: v["checkpoints"] is not None),
    Rule((), lambda xp, v: v["adjoint"] == "stored",
         lambda v, k: "adjoint='stored' stores every fixed step: it needs a fixed step size dt=...",
         applies=_adaptive),
    Rule((), lambda xp, v: not (v["adjoint"] == "backsolve" and v["dt"] is None),
         lambda v, k: "seminorm=True changes the step-size control of the backsolve adjoint's backward "
                      "solve: it needs adjoint='backsolve' and adaptive steps (dt=None), got "
                      f"adjoint={v['adjoint']!r}, dt={v['dt']}", applies=lambda v: v["seminorm"]),
    Rule((), lambda xp, v: v["adjoint"] == "backsolve" and solver_info(v["solver"]).order < 2,
         lambda v, k: f"adjoint='backsolve' with the fixed-step {v['solver']!r} solver (order "
                      f"{solver_info(v['solver']).order}) gives gradients with an O(dt) error (1.6% at "
                      "dt=0.1 on the reflection toy, enough to make training diverge); use "
                      "adjoint='checkpoint' (the exact gradient of the discrete solve), or a "
                      "higher-order solver such as 'rk4' for O(1) memory", applies=_fixed),
    Rule(("t0", "t1"), lambda xp, v: v["dt"] > abs(float(v["t1"]) - float(v["t0"])),
         lambda v, k: f"dt={v['dt']} is larger than the interval [t0, t1] = [{v['t0']}, {v['t1']}]: the "
                      f"solve would take one step of {abs(float(v['t1']) - float(v['t0'])):g}, not of dt; "
                      f"use a dt <= {abs(float(v['t1']) - float(v['t0'])):g}", applies=_fixed, traced=False),
)


def _interval(v: dict, known: bool) -> str:
    return f"[{float(v['t0'])}, {float(v['t1'])}]" if known else "[t0, t1]"


def _merge_message(v: dict, known: bool) -> str:
    width = f" ({float(steps_merged(np, v['span'], v['dt'], v['tdtype'])[1]):.3g})" if known else ""
    return (f"dt={v['dt']} is too small for the interval {_interval(v, known)} in "
            f"{np.dtype(v['tdtype']).name} (the solve's time dtype): diffrax merges every step that ends "
            f"within {MERGE_ULPS} ULP{width} of t1 into the last one; use a larger dt, a shorter interval, "
            "or float64 (jax.config.update('jax_enable_x64', True) and float64 inputs)")


def _saves(v) -> bool:
    return v["ts"] is not None


def _outside(xp, v):
    return xp.any((v["ts"] < xp.minimum(v["t0"], v["t1"])) | (v["ts"] > xp.maximum(v["t0"], v["t1"])))


def _direction(xp, v):
    return xp.sign(xp.asarray(v["t1"], v["tdtype"]) - xp.asarray(v["t0"], v["tdtype"]))


#: the rules :func:`~ncode_jax.solve` adds: the interval in the solve's time dtype and the save times
SOLVE_RULES: tuple[Rule, ...] = (
    Rule(("span",), lambda xp, v: xp.asarray(v["span"]) == 0,
         lambda v, k: f"t0 and t1 are equal{' (' + str(float(v['t0'])) + ')' if k else ''} in "
                      f"{np.dtype(v['tdtype']).name}, the solve's time dtype: the time interval is empty"),
    Rule(("span",), lambda xp, v: steps_merged(xp, v["span"], v["dt"], v["tdtype"])[0], _merge_message,
         applies=_fixed),
    Rule((), lambda xp, v: np.ndim(v["ts"]) != 1,
         lambda v, k: f"ts must be a 1-D array of save times, got shape {tuple(np.shape(v['ts']))}",
         applies=_saves),
    Rule((), lambda xp, v: np.shape(v["ts"])[0] == 0,
         lambda v, k: "ts is empty: pass at least one save time, or ts=None for x(t1) only", applies=_saves),
    Rule(("ts",), lambda xp, v: ~xp.all(xp.isfinite(v["ts"])),
         lambda v, k: "ts contains NaN or inf (the save times must be finite)", applies=_saves),
    Rule(("ts", "t0", "t1"), _outside,
         lambda v, k: "ts must lie in [t0, t1]" + (
             f" = {_interval(v, k)}, got {np.min(v['ts'])} to {np.max(v['ts'])}" if k else ""),
         applies=_saves),
    Rule(("ts", "t0", "t1"), lambda xp, v: xp.any(xp.diff(xp.asarray(v["ts"])) * _direction(xp, v) < 0),
         lambda v, k: "ts must run in the direction of integration (increasing if t1 > t0, decreasing if "
                      "t1 < t0)", applies=_saves),
)


def _known(value):
    """A known value as NumPy sees it (scalars as Python floats, arrays in float64)."""
    if value is None or isinstance(value, str) or is_static_number(value):
        return value
    a = np.asarray(value)
    return a.item() if a.ndim == 0 and a.dtype.kind in "fiu" else a


def enforce(rules: tuple[Rule, ...], values: dict, *, known: bool = True,
            traced: bool = True) -> list[tuple[Any, str]]:
    """Apply ``rules`` in order to ``values``: raise the error of the first broken rule whose
    values are known (``known=False``: skip those, already enforced), and return
    ``(predicate, message)`` run-time checks for the rules whose values are traced
    (``traced=False``: none)."""
    checks = []
    for rule in rules:
        if not rule.applies(values):
            continue
        if all(is_concrete(values[name]) for name in rule.reads):
            if known:
                seen = {**values, **{name: _known(values[name]) for name in rule.reads}}
                if bool(rule.broken(np, seen)):
                    raise rule.error(rule.message(seen, True))
        elif traced and rule.traced:
            checks.append((rule.broken(jnp, values), "ncode_jax.solve: " + rule.message(values, False)))
    return checks


@dataclass(frozen=True)
class SolveConfig:
    """The solver settings of :func:`~ncode_jax.solve`, as one frozen value validated when it is
    built (:data:`CONFIG_RULES`; a value traced under ``jax.jit`` is checked when the solve runs,
    with the same words). Models (:class:`~ncode_jax.NCODE`, the classifier, the autoencoder,
    :class:`~ncode_jax.NCODEBlock`) and every training config take one.

    Fields: ``solver`` (a name in :data:`~ncode_jax.SOLVERS`); ``dt`` (fixed step size > 0, or
    ``None`` for adaptive steps controlled by ``rtol``/``atol``, finite and >= 0, not both 0);
    ``adjoint`` (``checkpoint``, ``stored``, ``backsolve``, ``direct``: how gradients are computed,
    see :func:`~ncode_jax.solve`); ``t0``, ``t1`` (the finite time interval, either order);
    ``max_steps`` (step budget; ``None``: 4096 adaptive steps, or exactly the fixed-step count);
    ``checkpoints`` (states diffrax's recursive checkpointing stores, ``checkpoint`` adjoint only);
    ``seminorm`` (backsolve with adaptive steps only); ``batch`` (``system`` or ``vmap``).

    Raises:
      ValueError: an unknown ``solver``/``adjoint``/``batch``; a non-positive, NaN or infinite
        ``dt``, or one larger than ``|t1 - t0|`` (the solve would take one step of the interval,
        and a config would record a step that never ran); an adaptive solve without an error
        estimate; NaN, infinite or negative ``rtol``/``atol``, or both 0; non-finite
        ``t0``/``t1``; ``max_steps`` or ``checkpoints`` < 1; ``checkpoints`` without the
        checkpoint adjoint; ``adjoint='stored'`` without ``dt``; ``seminorm`` without backsolve
        and adaptive steps; backsolve with fixed first-order steps (its gradient error is O(dt)).
      TypeError: ``dt``, ``max_steps``, ``checkpoints``, ``rtol`` or ``atol`` not a number.
    """

    solver: str = "tsit5"
    dt: float | None = None
    rtol: float = 1e-3
    atol: float = 1e-6
    adjoint: str = "checkpoint"
    t0: float = 0.0
    t1: float = 1.0
    max_steps: int | None = None
    checkpoints: int | None = None
    seminorm: bool = False
    batch: str = "system"

    def __post_init__(self):
        enforce(CONFIG_RULES, self.kwargs(), traced=False)

    def kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of :func:`~ncode_jax.solve` (or of a model call)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> SolveConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


#: the names of :class:`SolveConfig`'s fields
SOLVE_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SolveConfig))


def check_options(**options) -> None:
    """Validate :func:`~ncode_jax.solve`'s settings (the fields of :class:`SolveConfig`, defaults
    for those not given) by building a :class:`SolveConfig`.

    Raises:
      ValueError, TypeError: as :class:`SolveConfig`.
    """
    SolveConfig(**options)


def as_config(config: SolveConfig | None, options: dict, who: str) -> SolveConfig:
    """The settings of a call: ``config``, or a :class:`SolveConfig` built once from the loose
    keyword arguments ``options`` (not both)."""
    if config is None:
        return SolveConfig(**options)
    if not isinstance(config, SolveConfig):
        raise TypeError(f"{who}: config must be a SolveConfig, got {type(config).__name__}")
    if options:
        raise TypeError(f"{who}: pass the solver settings either as config=SolveConfig(...) or as keyword "
                        f"arguments, not both (got config and {sorted(options)})")
    return config
