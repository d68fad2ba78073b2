"""Regularisers of the flow itself, as running costs: ``∫₀ᵀ ℓ(t, x, θ) dt`` per sample.

Finlay et al. 2020 ("How to train your neural ODE: the world of Jacobian and kinetic
regularization", ICML) add to the task loss

* the kinetic energy ``∫₀ᵀ ‖f(t, x(t), θ(t))‖² dt`` (:func:`kinetic_energy`), which favours
  straight, constant-speed trajectories, and
* the Jacobian Frobenius norm ``∫₀ᵀ ‖∂f/∂x (t, x(t), θ(t))‖²_F dt`` (:func:`jacobian_frobenius`),
  which favours a smooth field,

and report training with 2–3× fewer function evaluations of an adaptive solver at similar
accuracy. Both fit the running-cost channel of :class:`~ncode_jax.dynamics.Dynamics` (paper
eq. 5, Theorem 1): the cost ``c`` with ``dc/dt = ℓ`` is integrated with the state, ``sol.cost``
holds ``c(T)`` of shape ``(B,)``, and every adjoint differentiates it. The objects here have
``sees_field = True``, so the dynamics hands them the field's output ``dx = f(t, x, θ)`` (the
kinetic energy costs no extra field evaluation) and ``field_fn = lambda x: f(t, x, θ)`` (for the
Jacobian-vector product).

The Frobenius norm uses Hutchinson's trace estimator (Hutchinson 1989): for a probe ``ε`` with
``E[ε εᵀ] = I`` (Rademacher ±1 or standard Gaussian entries),

    ‖J‖²_F = tr(Jᵀ J) = E_ε ‖J ε‖² = E_ε ‖εᵀ J‖²,

estimated with ``num_probes`` probes per sample. The probes are drawn from a seed passed in the
cost arguments (``cost_args[key_name]``, made from a PRNG key by :func:`regularizer_args`; see
:func:`probe_key` for why it is a float), once per solve: every evaluation of ``ℓ`` in one
solve (all stages, all steps, and the backward pass) sees the same ``ε``, so ``ℓ`` is a
deterministic function of ``(t, x, θ)`` as an adaptive solver and the adjoints need, and a resumed
run that derives the key from ``(seed, step)`` replays the same probes.

Usage::

    cost = nc.kinetic_energy(0.01) + nc.jacobian_frobenius(0.01)      # or nc.regularization(...)
    model = nc.NCODE.build("open", field, (2,), running_cost=cost)
    key = jax.random.fold_in(jax.random.key(seed), step)               # replayable
    sol = model(params, x, cost_args=nc.regularizer_args(cost, key), solver="dopri5")
    loss = task_loss(sol.x) + jnp.mean(sol.cost)

A user running cost ``ℓ(t, x, θ, cost_args)`` (any hashable callable, e.g. a module-level
function) composes with ``+`` or :func:`combine`; all terms receive the same ``cost_args`` (use
a dict and let :func:`regularizer_args` add the probe key to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jaxtyping import Array, Float, PRNGKeyArray

PROBES = ("rademacher", "gaussian")
MODES = ("auto", "jvp", "vjp")
DEFAULT_KEY_NAME = "jacobian_key"
_SEED_RANGE = 2**24  # integers a float32 holds exactly


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_weight(who: str, weight) -> float:
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{who}: weight must be a Python or NumPy real number (it is part of the static model "
            f"description), got {type(weight).__name__} {weight!r}"
        )
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{who}: weight must be a finite number >= 0, got weight={weight!r}")
    return w


def _check_state(who: str, x: Array, dx: Array | None) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{who}: the state x has dtype {x.dtype}; the regulariser needs a floating-point state "
            "(∂f/∂x and ‖f‖² are not defined for integer or boolean states)"
        )
    if x.ndim < 1:
        raise ValueError(f"{who}: x must be batched, shape (B, *S); got a scalar")
    if dx is not None and not jnp.issubdtype(dx.dtype, jnp.floating):
        raise TypeError(f"{who}: the field's output has dtype {dx.dtype}; it must be floating-point")


def probe_key(seed) -> PRNGKeyArray:
    """The PRNG key of the probes from what ``cost_args`` holds: a PRNG key (typed or raw
    ``uint32[2]``) as is, or a float scalar seed (what :func:`regularizer_args` stores), an
    integer in ``[0, 2**24)`` carried as a float.

    Why a float: every leaf of ``cost_args`` passes through :func:`~ncode_jax.solve`'s run-time
    error guards (a ``custom_vjp``) when ``throw=True``; an integer leaf comes out of them marked
    as perturbed, and equinox's checkpointed while loop (``adjoint="checkpoint"``) then rejects
    it (``AssertionError`` in ``_get_value_assert_unperturbed``). A float leaf is an ordinary
    differentiable argument with a zero gradient (``stop_gradient`` below).
    """
    seed = jnp.asarray(seed)
    if jnp.issubdtype(seed.dtype, jnp.floating):
        if seed.shape != ():
            raise ValueError(f"jacobian_frobenius: a float probe seed must be a scalar, got shape "
                             f"{seed.shape}")
        return jax.random.key(jax.lax.stop_gradient(seed).astype(jnp.uint32))
    return seed


def _per_sample_sq(v: Float[Array, "B ..."]) -> Float[Array, " B"]:
    """``‖v_b‖²`` summed over every non-batch axis."""
    return jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)))


def _depends_on_input(fn: Callable[[Array], Array], example: Array) -> bool:
    """Whether ``fn``'s output is, structurally, a function of its input (a forward dependency
    walk over the jaxpr; a sub-computation counts as dependent if any of its inputs is)."""
    closed = jax.make_jaxpr(fn)(example)
    reached = set(closed.jaxpr.invars)
    for eqn in closed.jaxpr.eqns:
        if any(isinstance(v, jex_core.Var) and v in reached for v in eqn.invars):
            reached.update(eqn.outvars)
    return any(isinstance(v, jex_core.Var) and v in reached for v in closed.jaxpr.outvars)


# ---------------------------------------------------------------------------------------------
# The terms
# ---------------------------------------------------------------------------------------------


class RegularizerTerm:
    """Base of the running costs in this module: ``sees_field``, ``+`` composition, probe keys."""

    sees_field: ClassVar[bool] = True

    def key_names(self) -> tuple[str, ...]:
        """Names of the PRNG keys this cost reads from ``cost_args`` (see :func:`regularizer_args`)."""
        return ()

    def __add__(self, other):
        return combine(self, other)

    def __radd__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return combine(other, self)


@dataclass(frozen=True)
class KineticEnergy(RegularizerTerm):
    """``ℓ = weight · ‖f(t, x, θ)‖²`` per sample (sum over all state entries), shape ``(B,)``.

    Integrated over ``[t0, t1]`` it is Finlay et al.'s (2020) kinetic energy ``∫ ‖f‖² dt``. Uses the
    field evaluation the solver step already made (``dx``): no extra function evaluation.
    """

    weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "weight", _check_weight("kinetic_energy", self.weight))

    def __call__(self, t, x, theta, cost_args, *, dx: Array, field_fn=None) -> Float[Array, " B"]:
        del t, theta, cost_args, field_fn
        _check_state("kinetic_energy", x, dx)
        if dx.shape != x.shape:
            raise ValueError(f"kinetic_energy: dx has shape {tuple(dx.shape)} but x has {tuple(x.shape)}")
        return self.weight * _per_sample_sq(dx)


@dataclass(frozen=True)
class JacobianFrobenius(RegularizerTerm):
    """``ℓ = weight · (1/M) Σ_m ‖(∂f/∂x) ε_m‖²`` per sample, shape ``(B,)``: Hutchinson's unbiased
    estimate of ``weight · ‖∂f/∂x‖²_F`` (Finlay et al. 2020; Hutchinson 1989).

    Only the per-sample block of the Jacobian counts: the field acts on every sample alone, so
    ``∂f_b/∂x_{b'} = 0`` for ``b ≠ b'`` and the batched product ``J ε`` is ``J_b ε_b`` row by row.
    Probes are independent across samples with ``batch="system"`` (the default); with
    ``solve(..., batch="vmap")`` every per-sample solve draws from the same seed, so all samples
    share one probe (each estimate is still unbiased, but they are correlated).

    Args:
      weight: finite ``>= 0``.
      num_probes: ``M >= 1`` probes per sample (variance falls as ``1/M``; cost grows as ``M``).
      probe: ``"rademacher"`` (entries ±1, the lower-variance choice) or ``"gaussian"``.
      mode: how ``J ε`` is computed — ``"jvp"`` (forward mode, ``jax.jvp``: about one extra field
        evaluation), ``"vjp"`` (reverse mode, ``εᵀ J`` through ``jax.vjp``; for fields that are
        reverse-mode only, e.g. :class:`~ncode_jax.ConvBlockField`'s fast path), or ``"auto"``
        (``jvp``, falling back to ``vjp`` at trace time when the field has a custom VJP).
      key_name: where the PRNG key lives in ``cost_args`` (a dict).

    Raises (at construction): ``TypeError``/``ValueError`` for a weight that is not a finite
    number ``>= 0``, ``num_probes`` not an integer ``>= 1``, an unknown ``probe`` or ``mode``.
    Raises (at trace time): ``TypeError`` for a non-floating state or field output, or
    ``mode="jvp"`` on a reverse-mode-only field; ``ValueError`` when ``cost_args`` has no key
    under ``key_name``, or when ``∂f/∂x`` is structurally zero (the field is not differentiable
    in ``x``: ``stop_gradient``, rounding, integer casts, or no dependence on ``x``).
    """

    weight: float = 1.0
    num_probes: int = 1
    probe: str = "rademacher"
    mode: str = "auto"
    key_name: str = DEFAULT_KEY_NAME

    def __post_init__(self):
        object.__setattr__(self, "weight", _check_weight("jacobian_frobenius", self.weight))
        n = self.num_probes
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise TypeError(
                f"jacobian_frobenius: num_probes must be an integer, got {type(n).__name__} {n!r}"
            )
        if n < 1:
            raise ValueError(f"jacobian_frobenius: num_probes must be >= 1, got num_probes={n}")
        object.__setattr__(self, "num_probes", int(n))
        if self.probe not in PROBES:
            raise ValueError(
                f"jacobian_frobenius: unknown probe {self.probe!r}; choose one of {list(PROBES)}"
            )
        if self.mode not in MODES:
            raise ValueError(f"jacobian_frobenius: unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if not isinstance(self.key_name, str) or not self.key_name:
            raise TypeError(f"jacobian_frobenius: key_name must be a non-empty string, got {self.key_name!r}")

    def key_names(self) -> tuple[str, ...]:
        return (self.key_name,)

    def probes(self, key: PRNGKeyArray, x_shape: tuple[int, ...], dtype) -> Array:
        """The ``(num_probes, *x_shape)`` probes drawn from ``key`` (``E[ε εᵀ] = I``)."""
        shape = (self.num_probes, *x_shape)
        if self.probe == "rademacher":
            return jax.random.rademacher(key, shape, dtype)
        return jax.random.normal(key, shape, dtype)

    def _key(self, cost_args):
        if not isinstance(cost_args, dict) or self.key_name not in cost_args:
            got = (f"a dict with keys {sorted(cost_args)}" if isinstance(cost_args, dict)
                   else type(cost_args).__name__)
            raise ValueError(
                f"jacobian_frobenius: cost_args must be a dict holding a probe seed or PRNG key under "
                f"{self.key_name!r} (the Hutchinson probes are drawn from it), got {got}; pass "
                f"cost_args=ncode_jax.regularizer_args(cost, key[, your_cost_args])"
            )
        return probe_key(cost_args[self.key_name])

    def squared_norms(self, field_fn: Callable[[Array], Array], x: Array, eps: Array) -> Array:
        """``‖J ε_m‖²`` (or ``‖εᵀ J‖²``) per probe and sample: ``(num_probes, B)``."""
        mode = self.mode
        if mode == "auto":
            try:
                return self._squared_norms(field_fn, x, eps, "jvp")
            except TypeError as e:
                if "custom_vjp" not in str(e):
                    raise
                mode = "vjp"
        try:
            return self._squared_norms(field_fn, x, eps, mode)
        except TypeError as e:
            if "custom_vjp" in str(e):
                raise TypeError(
                    "jacobian_frobenius(mode='jvp'): the field is reverse-mode only (it has a custom "
                    "VJP, e.g. ConvBlockField's fast path); use mode='vjp' or mode='auto'"
                ) from e
            raise

    @staticmethod
    def _squared_norms(field_fn, x, eps, mode):
        if mode == "jvp":
            def product(e):
                return jax.jvp(field_fn, (x,), (e,))[1]
        else:
            _, pullback = jax.vjp(field_fn, x)

            def product(e):
                return pullback(e)[0]
        if not _depends_on_input(product, eps[0]):
            raise ValueError(
                "jacobian_frobenius: the field is not differentiable in x (∂f/∂x is structurally "
                "zero: stop_gradient, rounding, integer casts, or no dependence on x), so its "
                "Jacobian norm is identically 0; remove the regulariser or fix the field"
            )
        return jax.vmap(lambda e: _per_sample_sq(product(e)))(eps)

    def __call__(self, t, x, theta, cost_args, *, dx: Array | None = None,
                 field_fn: Callable[[Array], Array] | None = None) -> Float[Array, " B"]:
        del t, theta
        _check_state("jacobian_frobenius", x, dx)
        if field_fn is None:
            raise ValueError(
                "jacobian_frobenius needs field_fn (lambda x: f(t, x, θ)); it is passed by "
                "ncode_jax.Dynamics to running costs with sees_field=True"
            )
        eps = self.probes(self._key(cost_args), tuple(x.shape), x.dtype)
        return self.weight * jnp.mean(self.squared_norms(field_fn, x, eps), axis=0)


@dataclass(frozen=True)
class CombinedCost(RegularizerTerm):
    """``ℓ = Σ_i ℓ_i``: regularisers and/or user running costs, all given the same ``cost_args``.

    A term with a true ``sees_field`` attribute is called with ``dx`` and ``field_fn``; any other
    callable as ``ℓ_i(t, x, θ, cost_args)``. Each term's value is broadcast to ``(B,)``.
    """

    terms: tuple

    def key_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for term in self.terms:
            for n in getattr(term, "key_names", lambda: ())():
                if n not in names:
                    names.append(n)
        return tuple(names)

    def __call__(self, t, x, theta, cost_args, *, dx: Array | None = None,
                 field_fn: Callable[[Array], Array] | None = None) -> Float[Array, " B"]:
        total = jnp.zeros((x.shape[0],), x.dtype)
        for term in self.terms:
            if getattr(term, "sees_field", False):
                value = term(t, x, theta, cost_args, dx=dx, field_fn=field_fn)
            else:
                value = term(t, x, theta, cost_args)
            total = total + jnp.broadcast_to(value, (x.shape[0],)).astype(x.dtype)
        return total


# ---------------------------------------------------------------------------------------------
# Public constructors and helpers
# ---------------------------------------------------------------------------------------------


def kinetic_energy(weight: float = 1.0) -> KineticEnergy:
    """Running cost ``weight · ‖f(t, x, θ)‖²`` per sample; ``sol.cost = weight · ∫ ‖f‖² dt``,
    shape ``(B,)`` (Finlay et al. 2020). Raises ``TypeError``/``ValueError`` if ``weight`` is not
    a finite real number ``>= 0``."""
    return KineticEnergy(weight)


def jacobian_frobenius(weight: float = 1.0, num_probes: int = 1, probe: str = "rademacher", *,
                       mode: str = "auto", key_name: str = DEFAULT_KEY_NAME) -> JacobianFrobenius:
    """Running cost ``weight · ‖∂f/∂x‖²_F`` per sample, estimated by Hutchinson's estimator with
    ``num_probes`` Rademacher or Gaussian probes drawn from ``cost_args[key_name]``;
    ``sol.cost ≈ weight · ∫ ‖∂f/∂x‖²_F dt``, shape ``(B,)`` (Finlay et al. 2020; Hutchinson 1989).
    See :class:`JacobianFrobenius` for the arguments and errors."""
    return JacobianFrobenius(weight, num_probes, probe, mode, key_name)


def _check_cost(term) -> None:
    if not callable(term):
        raise TypeError(f"combine: a running cost must be callable, got {type(term).__name__} {term!r}")
    try:
        hash(term)
    except TypeError:
        raise TypeError(
            f"combine: running costs must be hashable (Dynamics is a static argument of jit); "
            f"{type(term).__name__} is not — use a module-level function or a frozen dataclass"
        ) from None


def combine(*costs) -> CombinedCost | Any:
    """Sum of running costs (regularisers from this module and/or user costs
    ``ℓ(t, x, θ, cost_args)``); ``None`` entries are skipped, nested sums flattened. Returns the
    single cost unchanged when only one remains, ``None`` when none does.

    Raises ``TypeError`` for an entry that is not a hashable callable."""
    terms: list = []
    for c in costs:
        if c is None:
            continue
        _check_cost(c)
        terms.extend(c.terms if isinstance(c, CombinedCost) else (c,))
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return CombinedCost(tuple(terms))


def regularization(kinetic: float = 0.0, jacobian: float = 0.0, *, num_probes: int = 1,
                   probe: str = "rademacher", mode: str = "auto", running_cost=None):
    """The running cost for config weights ``kinetic`` and ``jacobian`` (0 switches a term off),
    plus an optional user ``running_cost``; ``None`` when nothing is on. One line in a training
    config: ``running_cost=regularization(kinetic=cfg.kinetic, jacobian=cfg.jacobian)``.

    Raises as :func:`kinetic_energy` and :func:`jacobian_frobenius` (negative weights etc.)."""
    ke = kinetic_energy(kinetic) if _check_weight("kinetic", kinetic) > 0 else None
    jf = (jacobian_frobenius(jacobian, num_probes, probe, mode=mode)
          if _check_weight("jacobian", jacobian) > 0 else None)
    return combine(running_cost, ke, jf)


def regularizer_args(cost, key: PRNGKeyArray | None, cost_args: dict | None = None) -> dict | None:
    """The ``cost_args`` that ``cost`` needs: ``cost_args`` (a dict, or ``None``) plus one probe
    seed per name in ``cost.key_names()`` (drawn from ``key``; a float32 scalar holding an integer
    in ``[0, 2**24)``, see :func:`probe_key`). Derive ``key`` from ``(seed, step)``,
    e.g. ``jax.random.fold_in(jax.random.key(seed), step)``, so a resumed run replays its probes.

    Returns ``cost_args`` unchanged when ``cost`` needs no key.

    Raises:
      ValueError: the cost needs a key but ``key`` is None, or ``cost_args`` already holds one
        of the key names.
      TypeError: keys are needed but ``cost_args`` is not a dict.
    """
    names = getattr(cost, "key_names", lambda: ())() if cost is not None else ()
    if not names:
        return cost_args
    if key is None:
        raise ValueError(f"regularizer_args: the running cost draws random probes ({list(names)}); pass a "
                         "PRNG key")
    if cost_args is not None and not isinstance(cost_args, dict):
        raise TypeError(f"regularizer_args: cost_args must be a dict (or None) to hold the probe keys, got "
                        f"{type(cost_args).__name__}")
    out = dict(cost_args or {})
    clash = [n for n in names if n in out]
    if clash:
        raise ValueError(f"regularizer_args: cost_args already has the key name(s) {clash}")
    keys = jax.random.split(key, len(names))
    # float seeds, not keys: see probe_key for why
    out.update({n: jax.random.randint(k, (), 0, _SEED_RANGE).astype(jnp.float32)
                for n, k in zip(names, keys)})
    return out
