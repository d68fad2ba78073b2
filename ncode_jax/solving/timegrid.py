"""Time grids: the solve's time dtype and a mirror of diffrax's fixed-step grid.

diffrax's ``ConstantStepSize`` decides how many steps a fixed-step solve takes and where they end
with a few float operations of its own (a ``nextafter``, a clip to ``t1`` within 100 ULP, a fused
multiply-add). The stored-steps integrator must step through exactly those times, and the
solve's step budget must be exactly their number, so this module computes them in NumPy with the
same operations; ``tests/test_time_grid.py`` pins the mirror against ``diffeqsolve``'s own step
times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: how far below the end of the interval diffrax rounds a step end up to it, in ULP of the end
MERGE_ULPS = 100


def time_dtype(dtype) -> np.dtype:
    """The dtype :func:`~ncode_jax.solve` keeps its times in for a state of ``dtype``: the state's
    own when it is float32 or wider, float32 for bfloat16 and float16 (whose 8- and 11-bit
    significands cannot hold a time grid: diffrax merges every step that ends within 100 ULP of
    ``t1`` into the last, 0.39 of [0, 1] in bfloat16)."""
    dtype = np.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else np.dtype(np.float32)


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


def steps_merged(xp, span, dt: float, dtype):
    """Whether fixed steps of ``dt`` over an interval of length ``span`` (in ``dtype``) would be
    merged into the last step: diffrax rounds every step end within 100 ULP of the interval's
    end up to it. ``xp`` is ``numpy`` (a known span) or ``jax.numpy`` (a traced one); returns
    ``(merged, width)``, ``width`` the rounding zone's length."""
    a = xp.abs(xp.asarray(span, dtype))
    if xp is not np:  # a check on the times: no derivative goes through it (nextafter has none)
        a, dt = jax.lax.stop_gradient((a, dt))
    width = MERGE_ULPS * (a - xp.nextafter(a, xp.zeros_like(a)))
    n = xp.maximum(xp.ceil(a / xp.nextafter(xp.asarray(dt, dtype), xp.asarray(np.inf, dtype))), 1)
    return (n > 1) & (a / n <= width), width
