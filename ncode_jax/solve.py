"""The one place that calls :func:`diffrax.diffeqsolve`.

:func:`solve` integrates a :class:`~ncode_jax.dynamics.Dynamics` from ``(x0, θ0)``. It picks the
solver and adjoint by name, uses fixed steps when ``dt`` is given and a PID controller
(``rtol``/``atol``) otherwise, solves the whole batch as one ODE system by default
(docs/design.md, "Batch as one system"), integrates forwards or backwards in time
(``t1 < t0``), returns step and evaluation counts, and turns every failure into an error that
names its cause (see :func:`solve`'s Raises).
:class:`SolveConfig` is the same set of options as one frozen, validated value, for configs,
models and benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from .dynamics import Dynamics, State
from .solvers import solver_info

ADJOINTS = ("checkpoint", "backsolve", "direct")
BATCH_MODES = ("system", "vmap")
DEFAULT_ADAPTIVE_MAX_STEPS = 4096

# ``stats["result"]`` codes (ours, stable; diffrax's own enumeration is private).
RESULT_CODES = {"successful": 0, "max_steps_reached": 1, "failed": 2}

# A step-size controller whose last attempted step is this much smaller than the mean accepted
# step so far has collapsed (it keeps rejecting steps at one time), rather than run out of budget.
_COLLAPSE_RATIO = 1e-3


class Solution(NamedTuple):
    """Result of :func:`solve`.

    ``x``: ``(B, *S)`` at ``t1``, or ``(len(ts), B, *S)`` when ``ts`` was given.
    ``theta``: like ``x`` with trailing ``P`` in closed loop; the constant θ0 otherwise.
    ``cost``: running cost ``c`` — ``(B,)`` or ``(len(ts), B)`` — or None.
    ``ts``: the save times, ``(1,)`` (``t1``) or ``(len(ts),)``, in :func:`time_dtype`.
    ``stats``: ``num_steps`` (accepted + rejected), ``num_accepted_steps``,
    ``num_rejected_steps``, ``nfe`` (forward vector-field evaluations), ``result``
    (:data:`RESULT_CODES`: 0 successful, 1 ``max_steps`` reached, 2 other failure).
    """

    x: Array
    theta: Array
    cost: Array | None
    ts: Array
    stats: dict[str, Array]


# ---------------------------------------------------------------------------------------------
# Option checks, shared by solve() and SolveConfig
# ---------------------------------------------------------------------------------------------


def _is_static_number(v) -> bool:
    """A Python or NumPy real scalar (not a traced JAX value, not a bool)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_concrete(v) -> bool:
    """A value known at trace time (number, NumPy array, or a non-traced JAX array)."""
    if _is_static_number(v) or isinstance(v, np.ndarray):
        return True
    return isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer)


def check_options(
    *,
    solver: str = "tsit5",
    dt: float | None = None,
    rtol: Any = 1e-3,
    atol: Any = 1e-6,
    adjoint: str = "checkpoint",
    t0: Any = 0.0,
    t1: Any = 1.0,
    max_steps: int | None = None,
    checkpoints: int | None = None,
    seminorm: bool = False,
    batch: str = "system",
) -> None:
    """Validate :func:`solve`'s options that are known at trace time.

    Values that are traced (jitted arguments) are checked again at run time by :func:`solve`,
    with the same messages, so a request gets the same answer eagerly and under ``jax.jit``.

    Raises:
      ValueError: unknown ``solver``/``adjoint``/``batch``; a non-positive, NaN or infinite
        ``dt``; an adaptive solve without an error estimate; NaN, infinite or negative
        ``rtol``/``atol``; non-finite ``t0``/``t1``; ``max_steps`` or ``checkpoints`` < 1;
        ``checkpoints`` without the checkpoint adjoint; ``seminorm`` without backsolve and
        adaptive steps; backsolve with fixed first-order steps (its gradient error is O(dt),
        see :func:`solve`).
      TypeError: ``dt``, ``max_steps`` or ``checkpoints`` not a number.
    """
    info = solver_info(solver)
    if adjoint not in ADJOINTS:
        raise ValueError(f"unknown adjoint {adjoint!r}; choose one of {list(ADJOINTS)}")
    if batch not in BATCH_MODES:
        raise ValueError(f"unknown batch mode {batch!r}; choose one of {list(BATCH_MODES)}")
    if dt is None and not info.adaptive:
        raise ValueError(
            f"solver {solver!r} has no error estimate, so it cannot choose its own steps: "
            "pass a fixed step size dt=..."
        )
    if dt is not None:
        if not _is_static_number(dt):
            raise TypeError(
                f"dt must be a Python or NumPy number (it fixes the step count at trace time), "
                f"got {type(dt).__name__} {dt!r}"
            )
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a positive finite number, got dt={dt!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (_is_concrete(tol) or isinstance(tol, jax.Array)) or not jnp.issubdtype(
                jnp.result_type(tol), jnp.number) or isinstance(tol, bool):
            raise TypeError(f"{name} must be a real number, got {type(tol).__name__} {tol!r}")
        if _is_concrete(tol):
            v = np.asarray(tol)
            if v.ndim != 0 or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={tol!r}")
    if dt is None and _is_concrete(rtol) and _is_concrete(atol) and float(rtol) == float(atol) == 0:
        raise ValueError("rtol and atol are both 0: the adaptive controller could never accept a step")
    for name, t in (("t0", t0), ("t1", t1)):
        if _is_concrete(t):
            v = np.asarray(t)
            if v.ndim != 0 or not np.isfinite(v):
                raise ValueError(f"{name} must be a finite number (the time interval), got {name}={t!r}")
    for name, n in (("max_steps", max_steps), ("checkpoints", checkpoints)):
        if n is None:
            continue
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"{name} must be an integer, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={n}")
    if checkpoints is not None and adjoint != "checkpoint":
        raise ValueError(f"checkpoints={checkpoints} applies to adjoint='checkpoint' only, not {adjoint!r}")
    if seminorm and not (adjoint == "backsolve" and dt is None):
        raise ValueError(
            "seminorm=True changes the step-size control of the backsolve adjoint's backward solve: "
            f"it needs adjoint='backsolve' and adaptive steps (dt=None), got adjoint={adjoint!r}, dt={dt}"
        )
    if adjoint == "backsolve" and dt is not None and info.order < 2:
        raise ValueError(
            f"adjoint='backsolve' with the fixed-step {solver!r} solver (order {info.order}) gives "
            "gradients with an O(dt) error (1.6% at dt=0.1 on the reflection toy, enough to make "
            "training diverge); use adjoint='checkpoint' (the exact gradient of the discrete solve), "
            "or a higher-order solver such as 'rk4' for O(1) memory"
        )


@dataclass(frozen=True)
class SolveConfig:
    """:func:`solve`'s options as one frozen value, validated on construction.

    ``solve(dynamics, x0, theta0, params, **cfg.kwargs())``, ``model(params, x0, **cfg.kwargs())``.
    Fields and defaults are :func:`solve`'s; see there for their meaning.

    Raises:
      ValueError, TypeError: as :func:`check_options`, naming the field; ``ValueError`` also for
        a fixed ``dt`` larger than ``|t1 - t0|`` (the solve would take one step of the interval,
        and a config would record a step that never ran).
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
        check_options(**self.kwargs())
        span = abs(float(self.t1) - float(self.t0))
        if self.dt is not None and self.dt > span:
            raise ValueError(
                f"dt={self.dt} is larger than the interval [t0, t1] = [{self.t0}, {self.t1}]: the solve "
                f"would take one step of {span:g}, not of dt; use a dt <= {span:g}")

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`solve`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> SolveConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _fma(a, b, c):
    """``a·b + c`` rounded once, elementwise (XLA:CPU contracts diffrax's step-end formula to a
    fused multiply-add), through float64 for float32 and ``np.longdouble`` for float64: the two
    roundings can leave it 1 ULP off."""
    wide = np.float64 if np.asarray(a).dtype == np.float32 else np.longdouble
    return (np.asarray(a, wide) * np.asarray(b, wide) + np.asarray(c, wide)).astype(np.asarray(a).dtype)


def _flipped(t0: float, t1: float, dt: float, dtype):
    """diffrax's increasing frame ``s = ±t``: ``(sign, s0, s1, h, n)`` in ``dtype``, with
    ``n = ceil((s1 - s0) / nextafter(h))`` its ``ConstantStepSize`` step count."""
    sign = 1 if t1 > t0 else -1
    s0, s1, h = (np.asarray(v, dtype) for v in (sign * t0, sign * t1, dt))
    n = int(np.ceil((s1 - s0) / np.nextafter(h, np.asarray(np.inf, dtype))))
    return sign, s0, s1, h, max(n, 1)


def fixed_step_count(t0: float, t1: float, dt: float, dtype) -> int:
    """The number of steps diffrax's ``ConstantStepSize`` takes from ``t0`` to ``t1`` with step
    ``dt > 0`` in the time dtype ``dtype`` (the solve's step budget; :func:`fixed_step_grid` has
    the times): ``n = ceil(|t1 - t0| / nextafter(dt))`` in that dtype — 3 for ``dt = 1/3`` or
    ``0.33333333`` on [0, 1] in float32, 4 for ``dt = 0.3`` — except that ``n = 1`` with
    ``t0 + dt`` rounding to just short of ``t1`` takes 2 steps (the second ends at ``t1``). With
    millions of steps the 100-ULP clip may end the grid a step or so early: an upper bound then
    (:func:`solve` refuses such grids). :func:`solve` steps ``s = t - t0``: its count is
    ``fixed_step_count(0, t1 - t0, dt, time_dtype(x0.dtype))`` (``t1 - t0`` rounded from float64)."""
    dtype = np.dtype(dtype)
    _, s0, s1, h, n = _flipped(t0, t1, dt, dtype)
    return 2 if n == 1 and s0 + h < s1 else n


def fixed_step_grid(t0: float, t1: float, dt: float, dtype) -> np.ndarray:
    """The times diffrax's ``ConstantStepSize`` steps through from ``t0`` to ``t1`` with step
    ``dt > 0`` in the time dtype ``dtype``: ``(steps + 1,)``, first ``t0``, last ``t1``.

    diffrax 0.7 (``ConstantStepSize.init``/``adapt_step_size``, ``_clip_to_end`` and the first
    step in ``diffrax/_integrate.py``) works on ``s = ±t`` (increasing) with
    ``n =`` :func:`fixed_step_count`, makes its first step ``dt`` (cut at ``t1``) and ends step
    ``k ≥ 2`` at ``s0 + (s1 - s0)·k/n`` (``s1`` for ``k = n``, or where that lies within 100 ULP
    of ``s1``). So a ``dt`` that does not divide the interval gives an even grid after the first
    step (``dt = 0.3`` on [0, 1]: 0, 0.3, 0.5, 0.75, 1), and one that divides it up to rounding
    (``1/3``, ``0.33333333`` in float32) gives ``n`` equal steps. Computed in NumPy with the same
    float operations: the same number of steps as diffrax, times equal to its own up to the
    rounding of one fused multiply-add (1 ULP, or a few ULP of a time near 0 on an interval
    around 0: ~1e-17 absolute in float64).
    """
    dtype = np.dtype(dtype)
    sign, s0, s1, h, n = _flipped(t0, t1, dt, dtype)
    first = min(s0 + h, s1)
    if first == s1:
        return (np.asarray([s0, s1], dtype) * sign).astype(dtype)
    floor = s1
    for _ in range(100):  # diffrax: t1 - 100 ULP, above which a step end is rounded to t1
        floor = np.nextafter(floor, np.asarray(-np.inf, dtype))
    m = max(n, 2)  # n = 1 with t0 + dt short of t1: the second step's end (s0 + 2·span) is clipped
    k = np.arange(2, m + 1)
    ends = _fma(np.full(k.shape, s1 - s0, dtype), k.astype(dtype) / np.asarray(n, dtype), s0)
    last = np.flatnonzero((ends > floor) | (k == m))[0]  # k = m is always there
    grid = np.concatenate([[s0, first], ends[:last], [s1]]).astype(dtype)
    return (grid * sign).astype(dtype)


#: the default ``checkpoints=None`` of a fixed-step ``checkpoint`` solve stores every step (the
#: stored-steps path) when :func:`stored_steps_bytes` is at most this, and otherwise leaves the
#: steps to diffrax's recursive checkpointing (O(log n) stored states, recomputation)
STORED_STEPS_MAX_BYTES = 512 * 2**20


def stored_steps_bytes(steps: int, stages: int, x0: Array, theta0: Array) -> int:
    """The memory the stored-steps path keeps for the backward pass, estimated as one copy of the
    state ``z = (x, θ)`` per stage of every step: ``steps · stages · (|x0| + |θ0|) · itemsize``
    bytes. A field's own residuals come on top (the conv block's are two hidden-width activations
    per pixel and stage, ~3× the state of the paper's classifier)."""
    size = int(np.prod(x0.shape)) + int(np.prod(theta0.shape))
    return steps * stages * size * np.dtype(x0.dtype).itemsize


def _stored_steps(term, solver, grid: np.ndarray, z0, args) -> tuple[State, dict]:
    """The fixed steps ``grid[k] -> grid[k + 1]`` of ``solver`` (:func:`fixed_step_grid`) as one
    ``lax.scan``: the state at ``grid[-1]`` and diffrax-style stats. Reverse mode stores every
    stage's residuals (memory O(steps)); nothing is recomputed.

    An explicit Runge–Kutta solver's step is written out stage by stage from its Butcher tableau
    (:func:`_erk_step`): diffrax's own ``step`` runs the stages in a checkpointed loop, whose
    reverse pass evaluates every stage's field a second time. Other solvers (Euler) take their own
    ``step``."""
    tableau = getattr(solver, "tableau", None)
    erk = isinstance(tableau, diffrax.ButcherTableau) and isinstance(solver, diffrax.AbstractERK)
    t0 = jnp.asarray(grid[0])
    if erk:
        f0 = term.vf(t0, z0, args) if tableau.fsal else None
        carry0 = (z0, f0)
    else:
        carry0 = (z0, solver.init(term, t0, jnp.asarray(grid[1]), z0, args))

    def body(carry, times):
        z, aux = carry
        ta, tb = times
        if erk:
            z, aux = _erk_step(tableau, term, ta, tb, z, args, aux)
        else:
            z, _, _, aux, _ = solver.step(term, ta, tb, z, args, aux, made_jump=False)
        return (z, aux), None

    (z, _), _ = jax.lax.scan(body, carry0, (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])))
    steps = jnp.asarray(len(grid) - 1, jnp.int32)
    return z, {"num_steps": steps, "num_accepted_steps": steps, "num_rejected_steps": jnp.zeros_like(steps)}


def _erk_step(tableau: diffrax.ButcherTableau, term, ta, tb, z, args, f0):
    """One explicit Runge–Kutta step from ``ta`` to ``tb`` with every stage written out:
    ``k_i = f(ta + c_i h, z + h Σ_j a_ij k_j)``, ``z₁ = z + h Σ_i b_i k_i`` (Butcher tableau
    ``(a, b, c)``; zero coefficients are skipped). First-same-as-last tableaux (last row of ``a``
    equal to ``b``) take ``k_1 = f0``, the previous step's last stage, and return their last
    stage for the next step; others take and return ``None``. Returns ``(z₁, f0_next)``."""
    h = tb - ta

    def combine(coeffs):  # z + h Σ_j coeffs[j] k_j over the nonzero coefficients
        terms = [(float(a), k) for a, k in zip(coeffs, ks) if a != 0]
        if not terms:
            return z
        return jax.tree.map(lambda y, *kk: y + h * sum(a * ki for (a, _), ki in zip(terms, kk)),
                            z, *(k for _, k in terms))

    ks = [f0 if tableau.fsal else term.vf(ta, z, args)]
    for c, a_row in zip(tableau.c, tableau.a_lower):
        z_stage = combine(a_row)
        t_stage = tb if c == 1 else ta + float(c) * h  # exactly tb, as diffrax evaluates it
        ks.append(term.vf(t_stage, z_stage, args))
    if tableau.fsal:  # the last stage was evaluated at (tb, z₁)
        return z_stage, ks[-1]
    return combine(tableau.b_sol), None


def _adjoint(name: str, checkpoints: int | None, backward_controller, throw: bool) -> diffrax.AbstractAdjoint:
    if name == "checkpoint":
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
    if name == "backsolve":
        # the backward solve raises diffrax's own error if it fails (e.g. runs out of max_steps):
        # solve() calls diffeqsolve with throw=False, which the backward solve would inherit, and a
        # failed backward solve is a wrong gradient
        kwargs = {"throw": throw}
        if backward_controller is not None:
            kwargs["stepsize_controller"] = backward_controller
        return diffrax.BacksolveAdjoint(**kwargs)
    return diffrax.DirectAdjoint()


# ---------------------------------------------------------------------------------------------
# Run-time checks that survive jit, grad, value_and_grad and vmap
# ---------------------------------------------------------------------------------------------


def _error_token(preds: Array, msgs: tuple[str, ...]) -> Array:
    """A scalar 0 that raises ``msgs[i]`` for the first true ``preds[i]`` (one conditional).

    Under a mesh of several devices (``jax.set_mesh``) the check runs on every device (in a
    ``shard_map`` over the mesh, on the predicates every device holds whole): left to XLA, the
    conditional is pinned to one device, which raises alone while the others wait in the next
    collective until XLA aborts the process. Inside a ``shard_map`` (a solve of each device's own
    rows) the predicates are first combined over the manual axes (``pmax``): every device then
    raises the same message, or none does."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.manual_axes:  # inside a shard_map: every device its own predicates
        agreed = jax.lax.pmax(preds.astype(jnp.int32), tuple(mesh.manual_axes)) > 0
        return _local_error_token(agreed, msgs)
    if not mesh.empty and mesh.size > 1:
        return jax.shard_map(lambda p: _local_error_token(p, msgs), mesh=mesh, in_specs=P(),
                             out_specs=P(), check_vma=False)(preds)
    return _local_error_token(preds, msgs)


def _local_error_token(preds: Array, msgs: tuple[str, ...]) -> Array:
    if len(msgs) == 1:
        return eqx.error_if(jnp.zeros(()), preds[0], msgs[0])
    index = jnp.argmax(preds)  # the first true check names the cause
    return eqx.branched_error_if(jnp.zeros(()), jnp.any(preds), index, msgs)


def _add_token(tree, token: Array):
    return jax.tree.map(lambda a: a + token.astype(a.dtype) if _inexact(a) else a, tree)


def _error_if(tree, pred: Array, msg: str):
    """``eqx.error_if(tree, pred, msg)``, but the check's conditional carries a scalar that is then
    added (as 0) to ``tree``: the conditional is pinned to one device, and carrying a batch-sharded
    array through it would gather the whole batch there in every data-parallel step."""
    return _add_token(tree, _error_token(jnp.reshape(pred, (1,)), (msg,)))


def _inexact(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _guard_impl(tree, preds: Array, msgs: tuple[str, ...]):
    return _add_token(tree, _error_token(preds, msgs))


@_guard_impl.defjvp
def _guard_jvp(msgs, primals, tangents):
    tree, preds = primals
    tree_dot, _ = tangents
    token = _error_token(preds, msgs)
    out_dot = jax.tree.map(
        lambda a, da: da * (1 + token.astype(da.dtype)) if _inexact(a) else da, tree, tree_dot
    )
    return _add_token(tree, token), out_dot


def _guard(tree, checks: list[tuple[Array, str]]):
    """Raise the message of the first failing ``(pred, msg)`` check, in one conditional; the
    check also survives every transformation.

    ``eqx.error_if`` passes tangents through untouched, so under ``jax.jit(jax.grad(f))``
    nothing that the gradient needs depends on the check and XLA removes it. Here the tangent is
    scaled by ``1 + token`` (``token`` is the check's output, 0): still linear in the tangent, so
    forward and reverse mode both work, and the backward pass needs ``token`` as a residual.
    """
    preds = jnp.stack([jnp.asarray(p, bool).reshape(()) for p, _ in checks])
    # only floating leaves go through the custom JVP: integer leaves (PRNG keys, seeds in a running
    # cost's args) must stay unperturbed for diffrax's checkpointed loop
    leaves, treedef = jax.tree.flatten(tree)
    floats = [i for i, a in enumerate(leaves) if _inexact(a)]
    guarded = _guard_impl([leaves[i] for i in floats], preds, tuple(m for _, m in checks))
    for i, a in zip(floats, guarded):
        leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _grad_check(tree, msg: str):
    """Identity whose backward pass raises ``msg`` if the cotangent has NaN or inf."""
    return tree


def _grad_check_fwd(tree, msg):
    return tree, None


def _grad_check_bwd(msg, _, ct):
    return (_error_if(ct, _not_finite(ct), msg),)


_grad_check.defvjp(_grad_check_fwd, _grad_check_bwd)


def _not_finite(tree) -> Array:
    leaves = [a for a in jax.tree.leaves(tree) if _inexact(a)]
    if not leaves:
        return jnp.asarray(False)
    return ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


# ---------------------------------------------------------------------------------------------
# A step-size controller wrapper that remembers why a solve failed
# ---------------------------------------------------------------------------------------------


class _Monitor(diffrax.AbstractStepSizeController):
    """Delegates to ``inner`` and records, in its state: whether any attempted step produced a
    non-finite candidate, the current time and the last attempted step size. :func:`solve`
    reads it back to name the cause of a failure."""

    inner: diffrax.AbstractStepSizeController

    def wrap(self, direction):
        return _Monitor(self.inner.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, inner_state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
        t = jnp.asarray(t0)
        return t_next, (inner_state, jnp.asarray(False), t, t_next - t)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner_state, bad, t_now, _ = controller_state
        keep, next_t0, next_t1, jump, new_inner, result = self.inner.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
        )
        # diffrax's PID controller computes part of its state in the default float dtype; keep the
        # loop carry's dtypes fixed (float32 times under jax_enable_x64 would otherwise change it)
        inner_state = jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)),
                                   new_inner, inner_state)
        now_bad = _not_finite(y1_candidate) | _not_finite(y_error)
        state = (inner_state, bad | now_bad, jnp.asarray(next_t0, t_now.dtype),
                 jnp.asarray(next_t1 - next_t0, t_now.dtype))
        return keep, next_t0, next_t1, jump, state, result


# ---------------------------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------------------------


def nfe_count(solver: str, num_steps: Array) -> Array:
    """Forward vector-field evaluations for ``num_steps`` steps (accepted + rejected).

    Explicit RK: ``stages`` per step, minus one when first-same-as-last, plus one initial
    evaluation for FSAL methods. (diffrax 0.7's automatic initial step size adds no evaluation
    that reaches the field; ``tests/test_solve.py`` checks this formula against a counter.)
    """
    info = solver_info(solver)
    per_step = info.stages - int(info.fsal)
    return num_steps * per_step + int(info.fsal)


def _ad_modes(tree) -> tuple[bool, int]:
    """``(forward, reverse_levels)``: whether any leaf is being differentiated in forward mode
    (``jax.jvp``/``jacfwd``), and how many reverse-mode (``grad``/``vjp``) levels wrap it.

    Reads the tracer chain by class name; if JAX renames its tracers this finds nothing and
    diffrax's own error is raised instead."""
    forward, reverse = False, 0
    for leaf in jax.tree.leaves(tree):
        depth, x = 0, leaf
        while isinstance(x, jax.core.Tracer):
            name = type(x).__name__
            if name == "JVPTracer":
                forward = True
            elif name == "LinearizeTracer":
                depth += 1
            x = getattr(x, "primal", getattr(x, "val", None))
        reverse = max(reverse, depth)
    return forward, reverse


def _check_derivatives(adjoint: str, check_grads: bool, inputs, times) -> bool:
    """Refuse derivatives ``adjoint`` cannot give (forward mode; time derivatives with
    backsolve); returns whether the solve is under two or more reverse-mode levels (its inputs are
    then passed through :func:`_first_order_only`)."""
    forward, reverse = _ad_modes((inputs, times))
    if forward and check_grads:
        raise TypeError("ncode_jax.solve: check_grads=True checks reverse-mode gradients only; "
                        "forward-mode derivatives (jax.jvp, jax.jacfwd, jax.hessian) need check_grads=False")
    if adjoint == "direct":
        return False
    if forward:
        raise TypeError(
            f"ncode_jax.solve: adjoint={adjoint!r} supports reverse-mode derivatives only "
            "(jax.grad, jax.vjp, jax.jacrev); forward mode (jax.jvp, jax.jacfwd, jax.hessian, "
            "jax.linearize of jvp) needs adjoint='direct'"
        )
    if adjoint == "backsolve" and any(_ad_modes(t) != (False, 0) for t in times):
        raise TypeError(
            "ncode_jax.solve: adjoint='backsolve' gives no derivatives with respect to t0, t1 or ts; "
            "use adjoint='checkpoint' or 'direct' to differentiate the times"
        )
    if reverse >= 2 and adjoint == "backsolve":  # diffrax's backsolve loop takes no outer tangents
        raise TypeError(
            "ncode_jax.solve: adjoint='backsolve' works under one reverse-mode level only: jax.grad "
            "of a function that itself calls jax.grad needs adjoint='direct' (or adjoint='checkpoint' "
            "when the inner gradient is under stop_gradient: first-order meta-learning)"
        )
    return reverse >= 2


def _second_order_message(adjoint: str) -> str:
    return (f"ncode_jax.solve: adjoint={adjoint!r} gives first derivatives only; second-order "
            "reverse mode (jax.grad of jax.grad) needs adjoint='direct'")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _first_order_only(tree, adjoint: str):
    """Identity on a solve's inputs under two reverse-mode levels. Its backward pass (the inner
    gradient) passes the cotangents through :func:`_not_differentiated`, so a second reverse pass
    that differentiates the inner gradient (``grad`` of ``grad``: the adjoint's backward loop
    cannot be transposed) raises a clear ``TypeError`` before it reaches that loop, while one that
    does not (first-order meta-learning: ``stop_gradient`` of the inner gradient) never calls it."""
    return tree


def _first_order_only_fwd(tree, adjoint):
    return tree, None


def _first_order_only_bwd(adjoint, _, ct):
    return (_not_differentiated(ct, adjoint),)


_first_order_only.defvjp(_first_order_only_fwd, _first_order_only_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _not_differentiated(tree, adjoint: str):
    """Identity whose backward pass raises: a gradient that must not be differentiated again."""
    return tree


def _not_differentiated_fwd(tree, adjoint):
    return tree, None


def _not_differentiated_bwd(adjoint, _, ct):
    raise TypeError(_second_order_message(adjoint))


_not_differentiated.defvjp(_not_differentiated_fwd, _not_differentiated_bwd)


def _as_array(a, who: str):
    """Lists and NumPy arrays become JAX arrays; anything else that is not an array is refused."""
    if isinstance(a, (list, tuple, np.ndarray, np.generic)):
        return jnp.asarray(a)
    if not isinstance(a, jax.Array):
        raise TypeError(f"{who} must be an array, got {type(a).__name__}")
    return a


def _check_dtypes(x0, theta0, feedback) -> None:
    if not jnp.issubdtype(theta0.dtype, jnp.floating):
        raise TypeError(f"theta0 must be a floating-point array, got dtype {theta0.dtype}")
    if theta0.dtype != x0.dtype:
        raise TypeError(
            f"x0 is {x0.dtype} but theta0 is {theta0.dtype}: the state and the weights must share one "
            "floating dtype (cast the data or initialise the model with that dtype)"
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(feedback):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating) and dtype != x0.dtype:
            raise TypeError(
                f"params['feedback']{jax.tree_util.keystr(path)} is {dtype} but x0 is {x0.dtype}: "
                "the controller g's parameters must share the state's dtype"
            )


def _static_times_checks(t0, t1, ts) -> None:
    """Checks of the time grid that can be made at trace time."""
    if _is_concrete(t0) and _is_concrete(t1) and float(t0) == float(t1):
        raise ValueError(f"t0 and t1 are equal ({float(t0)}): the time interval is empty")
    if ts is None:
        return
    if np.ndim(ts) != 1:
        raise ValueError(f"ts must be a 1-D array of save times, got shape {tuple(np.shape(ts))}")
    if np.shape(ts)[0] == 0:
        raise ValueError("ts is empty: pass at least one save time, or ts=None for x(t1) only")
    if _is_concrete(ts) and _is_concrete(t0) and _is_concrete(t1):
        v = np.asarray(ts, dtype=np.float64)
        lo, hi = sorted((float(t0), float(t1)))
        if not np.all(np.isfinite(v)):
            raise ValueError("ts contains NaN or inf (the save times must be finite)")
        if np.any(v < lo) or np.any(v > hi):
            raise ValueError(f"ts must lie in [t0, t1] = [{t0}, {t1}], got {v.min()} to {v.max()}")
        steps = np.diff(v) * np.sign(float(t1) - float(t0))
        if np.any(steps < 0):
            raise ValueError("ts must run in the direction of integration (increasing if t1 > t0, "
                             "decreasing if t1 < t0)")


def time_dtype(dtype) -> np.dtype:
    """The dtype :func:`solve` keeps its times in for a state of ``dtype``: the state's own when it
    is float32 or wider, float32 for bfloat16 and float16 (whose 8- and 11-bit significands cannot
    hold a time grid: diffrax merges every step that ends within 100 ULP of ``t1`` into the last,
    0.39 of [0, 1] in bfloat16)."""
    dtype = np.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else np.dtype(np.float32)


def _merge_width(span, dtype):
    """How far below ``|span|`` diffrax rounds a step end up to it: 100 ULP (``t1_clip_floor``)."""
    a = np.abs(np.asarray(span, dtype))
    return np.asarray(100, dtype) * (a - np.nextafter(a, np.asarray(0, dtype)))


def _grid_merged(span: Array, dt: float) -> Array:
    """Traced :func:`_check_grid`: True when fixed steps of ``dt`` over ``span`` would be merged."""
    a = jnp.abs(span)
    width = 100 * (a - jnp.nextafter(a, jnp.zeros_like(a)))
    n = jnp.maximum(jnp.ceil(a / jnp.nextafter(jnp.asarray(dt, a.dtype), jnp.asarray(jnp.inf, a.dtype))), 1)
    return (n > 1) & (a / n <= width)


def _check_grid(span: float, dt: float, dtype, t0, t1) -> None:
    """Refuse fixed steps that the time dtype cannot represent over ``[t0, t1]``: diffrax rounds
    every step end within 100 ULP of the interval's end up to it, so steps shorter than that would
    be merged into the last one."""
    n = fixed_step_count(0.0, abs(span), dt, dtype)
    width = float(_merge_width(span, dtype))
    if n > 1 and abs(span) / n <= width:
        raise ValueError(
            f"dt={dt} is too small for the interval [{float(t0)}, {float(t1)}] in "
            f"{np.dtype(dtype).name} (the solve's time dtype): diffrax merges every step that ends "
            f"within 100 ULP ({width:.3g}) of t1 into the last one; use a larger dt, a shorter "
            "interval, or float64 (jax.config.update('jax_enable_x64', True) and float64 inputs)")


class _Field(eqx.Module):
    """The dynamics on the solver's time ``s = t - t0`` (``t0`` None: 0) and state: the field
    sees ``t0 + s`` and, when the solver carries a wider dtype than the state's (bfloat16 and
    float16 states are solved with float32 times, to which diffrax promotes the state), the state
    and time in the state's ``dtype``; its output is cast back to the solver's."""

    dynamics: Dynamics  # a leaf, as when diffrax.ODETerm held it directly
    t0: Array | None
    dtype: Any = eqx.field(static=True)

    def __call__(self, s, z, args):
        t = s if self.t0 is None else self.t0 + s
        if self.dtype is None:
            return self.dynamics(t, z, args)
        narrow = jax.tree.map(lambda a: a.astype(self.dtype), z)
        out = self.dynamics(jnp.asarray(t).astype(self.dtype), narrow, args)
        return jax.tree.map(lambda a, c: a.astype(c.dtype), out, z)


def solve(
    dynamics: Dynamics,
    x0: Array,
    theta0: Array,
    params: dict[str, Any] | None = None,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    ts: Array | None = None,
    solver: str = "tsit5",
    dt: float | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    max_steps: int | None = None,
    adjoint: Literal["checkpoint", "backsolve", "direct"] = "checkpoint",
    checkpoints: int | None = None,
    seminorm: bool = False,
    batch: Literal["system", "vmap"] = "system",
    throw: bool = True,
    check_grads: bool = False,
) -> Solution:
    """Solve ``dz/dt = h(t, z)`` from ``z(t0) = (x0, θ0)`` to ``t1``.

    ``t1 < t0`` integrates backwards in time (e.g. to recover ``x(0)`` from ``x(T)``, see
    :meth:`~ncode_jax.NCODE.inverse`): with fixed steps the solver steps by ``-dt``; ``ts`` must
    then decrease. ``x``, ``theta`` and ``cost`` keep the dtype of ``x0`` and ``θ0`` (a float32
    model stays float32 under ``jax_enable_x64``). The solver's times are in :func:`time_dtype`
    (the state's dtype, but float32 for bfloat16 and float16 states, whose state the solver then
    carries in float32 while the field sees its own dtype) and relative to ``t0`` (it steps
    ``s = t - t0`` from 0 to ``t1 - t0``, the field sees ``t0 + s``), so the step grid of
    ``[1e4, 1e4 + 1]`` is that of ``[0, 1]``; fixed steps that the time dtype still cannot
    represent (diffrax merges every step that ends within 100 ULP of ``t1`` into the last) are
    refused.

    Args:
      dynamics: the augmented field (field f, optional feedback g, optional running cost ℓ).
      x0: ``(B, *S)`` initial states, ``S = dynamics.field.state_shape``; ``B >= 1``.
      theta0: ``(P,)`` shared or ``(B, P)`` per-sample initial weights, same dtype as ``x0``.
      params: ``{"feedback": g's params, "cost": ℓ's args}`` as needed (differentiable).
      t0, t1: the time interval (``t1 != t0``; either order).
      ts: optional 1-D save times between ``t0`` and ``t1``, in the direction of integration;
        outputs then gain a leading time axis.
      solver: ``euler`` (order 1), ``midpoint``, ``heun`` (2), ``bosh3`` (3), ``rk4`` (4, the 3/8
        rule), ``tsit5``, ``dopri5`` (5), ``dopri8`` (8).
      dt: fixed step size (> 0, the sign follows ``t1 - t0``); ``None`` means adaptive steps
        controlled by ``rtol``/``atol`` (finite, >= 0).
      max_steps: step budget; default 4096 (adaptive) or exactly the fixed-step count.
      adjoint: how gradients are computed —

        * ``checkpoint`` (discretise-then-optimise, diffrax's ``RecursiveCheckpointAdjoint``):
          the exact gradient of the discrete solve that was computed (it matches central finite
          differences to ~1e-9 in float64, ``tests/test_gradients.py``). Memory grows with the
          number of steps (O(log n) checkpoints, recomputing the rest); ``checkpoints=n`` stores
          ``n`` states instead. With fixed steps, no ``ts`` and ``checkpoints >=`` their number
          (:func:`fixed_step_count`) — or the default ``checkpoints=None`` while the stored states
          fit :data:`STORED_STEPS_MAX_BYTES` (:func:`stored_steps_bytes`; pass ``checkpoints=1``
          for diffrax's recomputing loop instead) — the solve is one ``lax.scan`` over diffrax's
          own step times (:func:`fixed_step_grid`) of explicit Runge–Kutta steps
          written out stage by stage from the solver's Butcher tableau, which stores every
          stage's residuals and evaluates the field once per stage, backward pass included
          (memory O(steps); diffrax's checkpointed loop evaluates the field 3.5× per stage in a
          training step, and even diffrax's own ``step`` in a scan 2×, its stages being a
          checkpointed loop; ``tests/test_stored_steps.py`` counts them;
          docs/design.md, "Stored steps", has the timings).
        * ``backsolve`` (optimise-then-discretise, the continuous adjoint of Chen et al. 2018,
          used by the paper): O(1) memory in the number of steps, but it re-solves the state
          backwards and integrates the adjoint ODE with the same method, so its gradient is an
          approximation with error O(dt^p) for a method of order p (or of the order of the
          tolerances with adaptive steps). Measured on the closed-loop reflection toy (float64):
          Euler dt=0.1 1.6% from the exact gradient, rk4 4e-8 to 7e-6, tsit5 rtol=1e-3 about 3%
          (docs/design.md, "What each adjoint computes"; ``tests/test_adjoint_order.py`` checks
          the O(dt^p) rate).
          Fixed-step Euler with backsolve is refused (the 1.6% made training diverge: loss 9.5e2
          vs 1.3e-5 with checkpoint); fixed order-2 and order-3 methods warn. ``seminorm=True``
          (adaptive steps only) lets the backward step-size control ignore the parameter-gradient
          channels (Kidger et al. 2021, ``diffrax.adjoint_rms_seminorm``): fewer backward steps,
          same tolerance on the state and its adjoint.
        * ``direct`` (differentiate through the loop): supports forward mode (``jax.jvp``,
          ``jax.jacfwd``, ``jax.hessian``) as well as reverse mode; most memory.

        Forward-mode derivatives and second-order reverse mode need ``direct``: with
        ``checkpoint`` or ``backsolve`` they raise a ``TypeError`` that names the adjoint and
        the alternative (``checkpoint`` raises it when the outer gradient reaches the inner
        one, so first-order meta-learning, an inner gradient under ``stop_gradient``, is
        computed; ``backsolve`` works under one reverse-mode level only). Under
        ``jax.checkpoint``/``nn.remat`` every adjoint works.
      batch: ``system`` solves the batch as one ODE (shared step sizes); ``vmap`` gives every
        sample its own adaptive steps (slower on CPU: lock-step while loops).
      throw: raise on failure (default). With ``False``, failures are reported only in
        ``stats["result"]`` (:data:`RESULT_CODES`) and outputs may hold NaN/inf.
      check_grads: also raise, in the backward pass, if the gradient reaching ``x0``, ``θ0`` or
        ``params`` contains NaN or inf (it names which). Off by default: a finite forward solve
        can still give a non-finite gradient (e.g. ``sqrt`` at 0 in the field). Reverse mode
        only (with forward mode it raises ``TypeError``).

    Returns:
      A :class:`Solution`.

    Raises:
      ValueError, TypeError: at trace time, for bad options (:func:`check_options`), fixed steps
        too small for the interval in the time dtype (naming dtype and interval), shapes or
        dtypes (``x0`` and ``θ0`` must share a floating dtype), a closed-loop dynamics without
        ``params["feedback"]``, an empty interval, ``ts`` not 1-D, outside ``[t0, t1]`` or not
        monotone in the direction of integration.
      equinox.EquinoxRuntimeError: (``throw=True``; under ``jax.jit`` too, and again in the
        backward pass of ``jax.grad``): with a message that names the cause, one of —
        non-finite inputs (``x0``, ``θ0``, ``params``, times, ``ts``, tolerances); traced times
        whose interval the fixed ``dt`` is too small for in the time dtype; the dynamics
        produced NaN/inf (with the time of the first non-finite step); the step size collapsed
        (the solver kept rejecting steps at one time: stiff or non-smooth dynamics); the step
        budget ran out (``max_steps``, with how to raise it); and, with ``check_grads``, a
        non-finite gradient.
    """
    params = {} if params is None else params
    check_options(solver=solver, dt=dt, rtol=rtol, atol=atol, adjoint=adjoint, t0=t0, t1=t1,
                  max_steps=max_steps, checkpoints=checkpoints, seminorm=seminorm, batch=batch)
    info = solver_info(solver)
    field = dynamics.field
    x0, theta0 = _as_array(x0, "x0"), _as_array(theta0, "theta0")
    field.check_x(x0, "x0")
    if x0.shape[0] == 0:
        raise ValueError(f"x0 has an empty batch (shape {tuple(x0.shape)}): pass at least one sample")
    field.check_theta(theta0, x0.shape[0], "theta0")
    if dynamics.closed_loop and params.get("feedback") is None:
        raise ValueError(
            "closed-loop dynamics need params['feedback'] (the controller g's parameters, from "
            "model.init(...)['feedback'])"
        )
    _check_dtypes(x0, theta0, params.get("feedback"))
    if _check_derivatives(adjoint, check_grads, (x0, theta0, params), (t0, t1, ts)):
        leaves, treedef = jax.tree.flatten((x0, theta0, params))
        floats = [i for i, a in enumerate(leaves) if _inexact(a)]  # integer leaves have no gradient
        for i, a in zip(floats, _first_order_only([leaves[i] for i in floats], adjoint)):
            leaves[i] = a
        x0, theta0, params = jax.tree.unflatten(treedef, leaves)
    _static_times_checks(t0, t1, ts)
    if adjoint == "backsolve" and dt is not None and info.order < 4:
        warnings.warn(
            f"adjoint='backsolve' with fixed-step {solver!r} (order {info.order}): the continuous "
            "adjoint's gradient error is O(dt^order) and may be far from the exact gradient of the "
            "discrete solve; prefer adjoint='checkpoint' or solver='rk4'",
            stacklevel=2,
        )

    dtype = x0.dtype
    tdtype = time_dtype(dtype)  # the solver's times: at least float32 (bfloat16 cannot hold a grid)
    # known at trace time? (asked before jnp.asarray, which under jit returns a tracer)
    static_times = _is_concrete(t0) and _is_concrete(t1)
    shift = None if static_times and float(t0) == 0 else t0  # what the field adds to the solver's s
    if static_times:  # the solver runs on s = t - t0 in [0, t1 - t0], computed in float64 first
        span_ = float(np.asarray(float(t1) - float(t0), tdtype))
        if span_ == 0:
            raise ValueError(f"t0={float(t0)!r} and t1={float(t1)!r} are equal in {np.dtype(tdtype).name}, "
                             "the solve's time dtype: the time interval is empty")
        if dt is not None:
            _check_grid(span_, dt, tdtype, t0, t1)
    forward = span_ > 0 if static_times else None
    t0 = jnp.asarray(t0, tdtype)
    t1 = jnp.asarray(t1, tdtype)
    ts = None if ts is None else jnp.asarray(ts, tdtype)
    fixed_steps = None  # diffrax's number of fixed steps, when known at trace time
    if dt is not None and static_times:
        fixed_steps = fixed_step_count(0.0, span_, dt, tdtype)  # the solve's step budget
    if max_steps is None:
        max_steps = fixed_steps if fixed_steps is not None else DEFAULT_ADAPTIVE_MAX_STEPS
    # checkpoint adjoint, fixed steps, every step checkpointed (asked for, or by default when the
    # stored states fit STORED_STEPS_MAX_BYTES) and nothing saved but x(t1): one lax.scan of
    # written-out RK steps, differentiated by JAX with every stage's residuals stored (diffrax's
    # checkpointed loop evaluates each stage 3.5 times in a training step)
    store_all = (adjoint == "checkpoint" and fixed_steps is not None and ts is None
                 and max_steps >= fixed_steps
                 and (checkpoints >= fixed_steps if checkpoints is not None else
                      stored_steps_bytes(fixed_steps, info.stages, x0, theta0) <= STORED_STEPS_MAX_BYTES))
    grid = fixed_step_grid(0.0, span_, dt, tdtype) if store_all else None  # diffrax's own times
    if dt is None:
        dt0 = None
    elif forward is None:
        dt0 = jnp.where(t1 > t0, dt, -dt).astype(tdtype)
    else:
        dt0 = float(dt) if forward else -float(dt)  # a Python float: times in the time dtype, as in the grid

    budget = (  # advice for a solve that ran out of steps (worded before tolerances are traced)
        f"use a larger dt (now {dt}; {max_steps} steps cover {max_steps * dt:g} time units)"
        if dt is not None
        else "loosen rtol/atol" + (f" (now {rtol}/{atol})" if _is_concrete(rtol + atol) else "")
    )
    feedback, cost_args = params.get("feedback"), params.get("cost")
    if throw:
        # Everything the solve reads passes through the checks, so that they run before diffrax's
        # own (data dependence orders them) and the first message names the real cause.
        traced_tols = dt is None and not _is_concrete(rtol + atol)
        tols = (rtol, atol) if traced_tols else (None, None)
        inputs = (x0, theta0, feedback, cost_args, t0, t1, ts, tols)
        checks = [
            (_not_finite(x0), "x0 contains NaN or inf"),
            (_not_finite(theta0), "theta0 contains NaN or inf (the initial weights θ(0) from the "
             "controller; during training this means the parameters became non-finite: check the "
             "learning rate and the gradients)"),
            (_not_finite(feedback), "params['feedback'] (the controller g's parameters) contains NaN or inf"),
            (_not_finite(cost_args), "params['cost'] (the running cost's arguments) contains NaN or inf"),
            (~jnp.isfinite(t0) | ~jnp.isfinite(t1), "t0/t1 must be finite (the solve's time interval)"),
            (t0 == t1, "t0 and t1 are equal: the time interval is empty"),
            (~jnp.isfinite(jnp.asarray(rtol)) | (jnp.asarray(rtol) < 0), "rtol must be a finite number >= 0"),
            (~jnp.isfinite(jnp.asarray(atol)) | (jnp.asarray(atol) < 0), "atol must be a finite number >= 0"),
        ]
        if dt is None:
            checks.append(((jnp.asarray(rtol) == 0) & (jnp.asarray(atol) == 0),
                           "rtol and atol are both 0: the adaptive controller could never accept a step"))
        if dt is not None and not static_times:
            checks.append((_grid_merged(t1 - t0, dt),
                           f"dt={dt} is too small for the interval [t0, t1] in {np.dtype(tdtype).name} "
                           "(the solve's time dtype): diffrax merges every step that ends within 100 ULP "
                           "of t1 into the last one; use a larger dt or a shorter interval"))
        if ts is not None:
            lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
            direction = jnp.sign(t1 - t0)
            checks += [
                (_not_finite(ts), "ts contains NaN or inf (the save times must be finite)"),
                (jnp.any((ts < lo) | (ts > hi)), "ts must lie in [t0, t1]"),
                (jnp.any(jnp.diff(ts) * direction < 0), "ts must run in the direction of integration"),
            ]
        inputs = _guard(inputs, [(pred, f"ncode_jax.solve: {what}") for pred, what in checks])
        x0, theta0, feedback, cost_args, t0, t1, ts, tols = inputs
        if traced_tols:
            rtol, atol = tols
    if check_grads:
        x0 = _grad_check(x0, f"ncode_jax.solve: the gradient with respect to x0 contains NaN or inf "
                             f"({adjoint} adjoint)")
        theta0 = _grad_check(theta0, "ncode_jax.solve: the gradient with respect to theta0 contains NaN "
                                     f"or inf ({adjoint} adjoint)")
        if feedback is not None:
            feedback = _grad_check(feedback, "ncode_jax.solve: the gradient with respect to "
                                             f"params['feedback'] contains NaN or inf ({adjoint} adjoint)")
        if cost_args is not None:
            cost_args = _grad_check(cost_args, "ncode_jax.solve: the gradient with respect to "
                                               f"params['cost'] contains NaN or inf ({adjoint} adjoint)")

    if dt is not None:
        controller = diffrax.ConstantStepSize()
        backward_controller = None
    else:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        backward_controller = (
            diffrax.PIDController(rtol=rtol, atol=atol, norm=diffrax.adjoint_rms_seminorm)
            if seminorm else None
        )
    adj = _adjoint(adjoint, checkpoints, backward_controller, throw)
    # the solver's time is s = t - t0, from 0 to s1 = t1 - t0 (the field sees t0 + s): a grid far
    # from t = 0 keeps the precision of its length, not of its position
    s1 = jnp.asarray(span_, tdtype) if static_times else t1 - t0
    s_ts = None if ts is None else (ts if shift is None else
                                    jnp.clip(ts - t0, jnp.minimum(s1, 0), jnp.maximum(s1, 0)))
    if adjoint == "backsolve":
        # backsolve differentiates no time (refused above), and takes them as non-differentiable
        # arguments: the zero tangents the checks give them under jax.checkpoint/nn.remat must go
        s1, s_ts = jax.lax.stop_gradient((s1, s_ts))
    saveat = diffrax.SaveAt(t1=True if ts is None else False, ts=s_ts, controller_state=True)
    term = diffrax.ODETerm(_Field(dynamics, None if shift is None else t0,
                                  None if tdtype == dtype else dtype))

    def one_system(x0_, theta0_):
        z0, theta_const = dynamics.initial_state(x0_, theta0_)
        z0 = jax.tree.map(lambda a: a.astype(tdtype), z0)  # as diffrax promotes it to the time dtype
        args = {"theta": theta_const, "feedback": feedback, "cost": cost_args}
        if store_all:
            ys, sol_stats = _stored_steps(term, info.make(), grid, z0, args)
            ys = jax.tree.map(lambda a: a.astype(dtype), ys)
            bad_ys = _not_finite(ys)
            ok, nonfinite, t_now, last_dt = ~bad_ys, bad_ys, s1, dt0
            result = diffrax.RESULTS.successful  # a NaN state is named through nonfinite and bad_ys
        else:
            sol = diffrax.diffeqsolve(
                term, info.make(), jnp.zeros((), tdtype), s1, dt0, z0, args,
                saveat=saveat, stepsize_controller=_Monitor(controller), adjoint=adj,
                max_steps=max_steps, throw=False,
            )
            ys: State = sol.ys if ts is not None else jax.tree.map(lambda a: a[0], sol.ys)
            ys = jax.tree.map(lambda a: a.astype(dtype), ys)
            sol_stats, result = sol.stats, sol.result
            _, nonfinite, t_now, last_dt = sol.controller_state
            t_now = t_now * jnp.sign(s1)  # the monitor sees diffrax's direction-normalised times
            ok = result == diffrax.RESULTS.successful
            bad_ys = _not_finite(ys)
        # a rejected non-finite candidate the solver recovered from is no failure
        nonfinite = nonfinite & (~ok | bad_ys)
        mean_step = jnp.abs(t_now) / jnp.maximum(sol_stats["num_accepted_steps"], 1).astype(t_now.dtype)
        collapsed = ~ok & ~nonfinite & (jnp.abs(last_dt) < _COLLAPSE_RATIO * mean_step)
        budget_out = (result == diffrax.RESULTS.max_steps_reached) & ~nonfinite & ~collapsed
        if throw:
            ys = _guard(ys, [  # in order: the first true one names the cause
                (nonfinite,
                 "ncode_jax.solve: the dynamics produced NaN or inf from finite inputs: the vector "
                 "field is undefined or overflows at a state the solver tried (e.g. sqrt/log of a "
                 "negative value, exp overflow) — fix the field or its weights; more steps will not help"),
                (collapsed,
                 f"ncode_jax.solve: the step size collapsed: the {solver} solver kept rejecting steps "
                 "at one time (stiff or non-smooth dynamics, or a solution that blows up in finite "
                 "time); more max_steps will not help — use a solver suited to the dynamics, looser "
                 "tolerances, or smoother dynamics"),
                (budget_out,
                 f"ncode_jax.solve: the {solver} solver used all max_steps={max_steps} steps before "
                 f"reaching t1 while still making progress; raise it with solve(..., max_steps=N) or "
                 f"{budget} (if the steps are tiny because the dynamics are stiff, an explicit solver "
                 "will need very many)"),
                (~ok, "ncode_jax.solve: diffrax could not finish the solve"),
                (bad_ys, "ncode_jax.solve: the solution contains NaN or inf"),
            ])
        n = sol_stats["num_steps"]
        code = jnp.where(ok & ~bad_ys, RESULT_CODES["successful"],
                         jnp.where(budget_out, RESULT_CODES["max_steps_reached"], RESULT_CODES["failed"]))
        stats = {
            "num_steps": n,
            "num_accepted_steps": sol_stats["num_accepted_steps"],
            "num_rejected_steps": sol_stats["num_rejected_steps"],
            "nfe": nfe_count(solver, n),
            "result": code.astype(jnp.int32),
        }
        theta = ys.theta if dynamics.closed_loop else theta_const
        return ys.x, theta, ys.cost, stats

    try:
        if batch == "system":
            x, theta, cost, stats = one_system(x0, theta0)
        else:
            per_sample_theta = theta0.ndim == 2

            def single(x0_i, theta0_i):
                th = theta0_i[None] if per_sample_theta else theta0_i
                return one_system(x0_i[None], th)

            x, theta, cost, stats = jax.vmap(single, in_axes=(0, 0 if per_sample_theta else None))(
                x0, theta0
            )
            # vmap adds the sample axis in front; move it back behind the time axis and drop the
            # singleton batch axis of each inner solve.
            squeeze = (lambda a: a[:, 0]) if ts is None else (lambda a: jnp.swapaxes(a[:, :, 0], 0, 1))
            x = squeeze(x)
            cost = None if cost is None else squeeze(cost)
            theta = squeeze(theta) if dynamics.closed_loop else theta0
    except TypeError as e:
        if "forward-mode autodiff" in str(e):  # a path _check_derivatives did not see
            raise TypeError(
                f"ncode_jax.solve: adjoint={adjoint!r} supports reverse-mode derivatives only "
                "(jax.grad, jax.vjp, jax.jacrev); forward mode (jax.jvp, jax.jacfwd, jax.hessian, "
                "jax.linearize) needs adjoint='direct'"
            ) from e
        raise
    save_ts = t1[None] if ts is None else ts
    return Solution(x=x, theta=theta, cost=cost, ts=save_ts, stats=stats)
