"""Control any network: a :class:`~ncode_jax.fields.VectorField` made from a researcher's own module.

:class:`ModuleField` turns any pure function ``apply_fn(params, t, x) -> dx/dt`` (one sample ``x``
of ``state_shape``, ``params`` any PyTree of float arrays, e.g. an Equinox module's arrays) or any
Flax linen module (:meth:`ModuleField.from_flax`) into a field whose weights θ are the flattened
parameter PyTree. Every controller (:class:`~ncode_jax.control.StaticInit`,
:class:`~ncode_jax.control.Hypernetwork`, :class:`~ncode_jax.control.Feedback`), every solver and
every adjoint then work on it unchanged: N-CODE around any network.

Design notes: how per-sample parameters are vectorised and what it costs
-------------------------------------------------------------------------

*Layout.* θ is the concatenation of the PyTree's leaves in ``jax.tree_util`` order (for a Flax
module: ``params`` sorted by module and parameter name), each leaf flattened in C order — the same
order as :func:`jax.flatten_util.ravel_pytree`. The layout (:class:`ModuleLayout`) is static: the
tree structure, leaf shapes and names; cutting θ back into the PyTree is slicing and reshaping, no
copies beyond XLA's own. Leaves take θ's dtype (a module built in float32 runs in float64 when θ is
float64), as the hand-written fields do.

*Shared θ* ``(P,)``: one parameter PyTree for the whole batch. A Flax module is applied to the batch
as it is (``module.apply(variables, x)``); a pure function is ``vmap``-ed over the samples with the
parameters unbatched (``in_axes=(None, None, 0)``), so a dense layer becomes one ``(B, I) @ (I, O)``
matrix product.

*Per-sample θ* ``(B, P)``: every sample has its own PyTree. The per-sample function is
``jax.vmap``-ed over ``(params, x)`` together. ``vmap`` of a matrix product whose both operands carry
the batch axis is a ``dot_general`` with a batch dimension — a batched matrix product
``einsum('bi,bio->bo')``, exactly what the hand-written :class:`~ncode_jax.fields.MLPField` writes by
hand, so dense layers cost the same FLOPs (``2·B·I·O`` per layer) and run as one XLA operation; no
Python loop over samples ever runs. ``benchmarks/module_field.py`` measures the generic path against
the hand-written field (forward + backward, batch 256).

*What it costs.* Batched matrix-vector products cannot reuse a weight across samples, so they are
memory-bound (each weight is read once per sample) where a shared-weight GEMM is compute-bound:
that is the price of N-CODE's per-sample weights, the same for the hand-written fields. Layers
that ``vmap`` badly are the ones where JAX has no batched primitive of the same shape: a
convolution with a per-sample kernel becomes a grouped convolution (``feature_group_count = B``),
measured 30× slower than shared kernels on CPU (docs/design.md, "Per-sample convolutions");
for per-sample convolutions use
:class:`~ncode_jax.conv.ConvBlockField`, which has a hand-written fast path. Normalisation layers
are per sample already (LayerNorm) or must not be used (BatchNorm mixes samples and carries mutable
state: :meth:`ModuleField.from_flax` refuses modules with collections other than ``params``).

*Initial θ.* ``layout.init(key)`` (used by the controllers) re-draws the module's own initialisers
for a Flax module (``module.init(key, x)``) and returns the given parameters for a pure function
(unless ``init_fn`` is given); ``layout.init_std()`` — the scale of the hypernetwork's last layer —
is, per leaf, the standard deviation of the parameters the field was built from (≈ 1/√fan-in for
LeCun-normal kernels, 0 for constant leaves such as zero biases or unit LayerNorm scales).

Everything stays hashable and array-free in the traced sense: the field holds functions, shapes,
the tree structure and a frozen NumPy copy of the initial θ (hashed once by content), so it can be a
static argument and passes through diffrax as part of the (static) vector field. Differentiable θ
always arrives as an argument (docs/design.md, "Parameters through args").
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .fields import VectorField
from .layout import ParamLayout, ParamSpec

__all__ = ["ModuleField", "ModuleLayout"]


class _FrozenArray:
    """A read-only NumPy array, hashed and compared by content (digest computed once)."""

    __slots__ = ("array", "_digest")

    def __init__(self, array: np.ndarray):
        a = np.array(array, copy=True)
        a.setflags(write=False)
        self.array = a
        self._digest = hashlib.sha1(
            a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()
        ).hexdigest()

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, _FrozenArray) and self._digest == other._digest

    def __repr__(self):
        return f"_FrozenArray(shape={self.array.shape}, dtype={self.array.dtype}, sha1={self._digest[:8]})"


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/") or "leaf"


@dataclass(frozen=True)
class ModuleLayout(ParamLayout):
    """The :class:`~ncode_jax.layout.ParamLayout` of a parameter PyTree.

    ``specs`` has one entry per leaf (name = the leaf's path, e.g. ``Dense_0/kernel``), in
    ``jax.tree_util`` order; ``treedef`` rebuilds the PyTree. ``initial`` is the flat θ the field
    was built from, ``init_fn(key) -> params`` (optional) re-draws a PyTree of the same structure.
    """

    treedef: Any = None
    initial: _FrozenArray | None = None
    init_fn: Callable[[PRNGKeyArray], Any] | None = None

    def unflatten_tree(self, theta: Float[Array, "*batch P"]) -> Any:
        """Cut ``theta`` ``(*batch, P)`` into the parameter PyTree, leaves ``(*batch, *shape)``."""
        return jax.tree_util.tree_unflatten(self.treedef, list(self.unflatten(theta).values()))

    def flatten_tree(self, params: Any, who: str = "params") -> Float[Array, "*batch P"]:
        """Inverse of :meth:`unflatten_tree`: a PyTree (leaves ``(*batch, *shape)``) to θ."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self.treedef:
            raise ValueError(
                f"{who} has tree structure {treedef}, but this layout was built for {self.treedef}"
            )
        first = self.specs[0]
        batch = jnp.shape(leaves[0])[: jnp.ndim(leaves[0]) - len(first.shape)]
        parts = []
        for s, w in zip(self.specs, leaves):
            w = jnp.asarray(w)
            if tuple(w.shape) != (*batch, *s.shape):
                raise ValueError(
                    f"{who} leaf {s.name!r} has shape {tuple(w.shape)}, expected {(*batch, *s.shape)}"
                )
            parts.append(w.reshape(*batch, s.size))
        dtype = jnp.result_type(*parts)
        return jnp.concatenate([p.astype(dtype) for p in parts], axis=-1)

    def init(self, key: PRNGKeyArray, dtype=jnp.float32) -> Float[Array, " P"]:
        """θ̄: ``init_fn(key)`` flattened when given (a Flax module re-draws its own initialisers),
        else the parameters the field was built from (``key`` unused)."""
        if self.init_fn is not None:
            return self.flatten_tree(self.init_fn(key), "init_fn(key)").astype(dtype)
        return jnp.asarray(self.initial.array, dtype)

    def init_std(self, dtype=jnp.float32) -> Float[Array, " P"]:
        """Per entry: the standard deviation of its leaf's initial values (pooled over 8 draws of
        ``init_fn`` when given, else over the one PyTree the field was built from)."""
        return jnp.asarray(_layout_std(self), dtype)


@functools.lru_cache(maxsize=64)
def _layout_std(layout: ModuleLayout) -> np.ndarray:
    """Computed once per layout, on first use (layouts are hashable), not at construction."""
    draws = layout.initial.array[None]
    if layout.init_fn is not None:
        with jax.ensure_compile_time_eval():  # constants only: runs eagerly even inside jit(model.init)
            keys = jax.random.split(jax.random.key(0), 8)
            draws = np.asarray(
                jax.vmap(lambda k: layout.flatten_tree(layout.init_fn(k), "init_fn(key)"))(keys)
            )
    return _leaf_std(layout.specs, np.asarray(draws, np.float64))


def _leaf_std(specs, draws: np.ndarray) -> np.ndarray:
    """``draws`` ``(K, P)``: per leaf, the std of all its entries over all draws, repeated."""
    parts, start = [], 0
    for s in specs:
        leaf = draws[:, start : start + s.size]
        parts.append(np.full((s.size,), float(np.std(leaf)) if leaf.size > 1 else 0.0))
        start += s.size
    return np.concatenate(parts)


@dataclass(frozen=True)
class _FlaxBatch:
    """Apply a linen module that maps a batch: ``module.apply({'params': p}, x[, t=t])``."""

    module: Any
    time_kw: bool

    def __call__(self, params, t, x):
        kw = {"t": t} if self.time_kw else {}
        return self.module.apply({"params": params}, x, **kw)


@dataclass(frozen=True)
class _FlaxSample:
    """The same module on one sample: ``batch(p, t, x[None])[0]`` (``vmap`` adds the batch back)."""

    batch: _FlaxBatch

    def __call__(self, params, t, x):
        return self.batch(params, t, x[None])[0]


@dataclass(frozen=True)
class _FlaxInit:
    module: Any
    x_shape: tuple[int, ...]
    x_dtype: Any
    time_kw: bool

    def __call__(self, key):
        kw = {"t": jnp.zeros((), self.x_dtype)} if self.time_kw else {}
        return self.module.init(key, jnp.zeros(self.x_shape, self.x_dtype), **kw)["params"]


def _accepts_t(module) -> bool:
    try:
        return "t" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def _describe(tree) -> str:
    return str(jax.tree.map(lambda a: f"{jnp.dtype(a.dtype).name}{list(a.shape)}", tree))


class ModuleField(VectorField):
    """``f(t, x, θ) = apply_fn(params(θ), t, x)``: any module as a controlled vector field.

    Args:
      apply_fn: pure ``apply_fn(params, t, x) -> dx`` for **one** sample ``x`` of shape
        ``state_shape``, returning the same shape (and a floating dtype). It must be a function
        of its arguments only (close over constants, never over differentiable arrays).
      params: a PyTree of floating-point arrays matching ``apply_fn`` (e.g. an Equinox module's
        arrays, ``eqx.partition(module, eqx.is_array)[0]``); its leaves define θ's layout and the
        initial θ̄ (``layout.init``) when ``init_fn`` is not given.
      state_shape: the per-sample state shape ``S``; the field is called on ``x`` of shape
        ``(B, *S)`` with θ ``(P,)`` (shared) or ``(B, P)`` (per sample).
      init_fn: optional ``init_fn(key) -> params`` (same structure) that ``layout.init(key)`` uses to
        draw a fresh θ̄.
      batch_apply_fn: optional ``batch_apply_fn(params, t, x) -> dx`` on a whole batch ``x``
        ``(B, *S)`` with shared ``params``; used for shared θ instead of ``vmap(apply_fn)``.

    Raises at construction (never later, under ``jit``):
      TypeError: ``apply_fn`` is not callable, or a parameter leaf is not a floating-point array
        (integer/bool state cannot be a controlled weight; keep it out of ``params``).
      ValueError: ``params`` has no leaves; ``apply_fn(params, t, x)`` fails on ``params`` and an
        ``x`` of ``state_shape`` (the params do not match the function: the error is chained);
        the output's shape differs from ``state_shape`` (a vector field maps a state to its time
        derivative, same shape), or its dtype is not floating.

    The per-sample path is ``jax.vmap`` over ``(params, x)`` (batched matrix products for dense
    layers; see the module docstring for costs).
    """

    __slots__ = ("apply_fn", "batch_apply_fn", "_state_shape", "_layout")

    def __init__(
        self,
        apply_fn: Callable[[Any, Any, Array], Array],
        params: Any,
        state_shape: tuple[int, ...],
        *,
        init_fn: Callable[[PRNGKeyArray], Any] | None = None,
        batch_apply_fn: Callable[[Any, Any, Array], Array] | None = None,
    ):
        if not callable(apply_fn):
            raise TypeError(f"ModuleField: apply_fn must be callable, got {type(apply_fn).__name__}")
        state_shape = tuple(int(s) for s in state_shape)
        if any(s < 1 for s in state_shape):
            raise ValueError(f"ModuleField: state_shape must have positive sizes, got {state_shape}")
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        if not flat:
            raise ValueError("ModuleField: params has no array leaves, so there is nothing to control")
        specs = []
        for path, leaf in flat:
            name = _leaf_name(path)
            if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
                raise TypeError(
                    f"ModuleField: parameter leaf {name!r} is a {type(leaf).__name__}, not an array; "
                    "params must be a PyTree of floating-point arrays (partition non-array fields out)"
                )
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(
                    f"ModuleField: parameter leaf {name!r} has dtype {leaf.dtype}; θ can only hold "
                    "floating-point weights (keep integer or boolean state out of params)"
                )
            specs.append(ParamSpec(name, tuple(int(d) for d in leaf.shape)))
        try:
            initial = np.concatenate([np.asarray(leaf, np.float64).reshape(-1) for _, leaf in flat])
        except jax.errors.TracerArrayConversionError:
            raise TypeError(
                "ModuleField: build the field outside jit/grad/vmap (its params are traced here); "
                "the field is a static description, θ is what gets traced"
            ) from None
        self.apply_fn = apply_fn
        self.batch_apply_fn = batch_apply_fn
        self._state_shape = state_shape
        self._layout = ModuleLayout(
            tuple(specs), treedef=treedef, initial=_FrozenArray(initial), init_fn=init_fn
        )
        self._check_apply(params)

    # ---- immutability, equality, hashing (fields are static arguments) -----------------------
    def __setattr__(self, name, value):
        if hasattr(self, "_layout"):
            raise AttributeError("ModuleField is immutable")
        object.__setattr__(self, name, value)

    def _key(self):
        return (self.apply_fn, self.batch_apply_fn, self._state_shape, self._layout)

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (
            f"ModuleField(state_shape={self._state_shape}, P={self._layout.size}, "
            f"apply_fn={self.apply_fn!r})"
        )

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self._state_shape

    @property
    def layout(self) -> ModuleLayout:
        return self._layout

    # ---- construction checks -----------------------------------------------------------------
    def _check_apply(self, params) -> None:
        leaves = jax.tree.leaves(params)
        dtype = jnp.result_type(*[leaf.dtype for leaf in leaves])
        x = jax.ShapeDtypeStruct(self._state_shape, dtype)
        t = jax.ShapeDtypeStruct((), dtype)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        calls = [("apply_fn(params, t, x)", self.apply_fn, x, self._state_shape)]
        if self.batch_apply_fn is not None:  # checked first: a Flax module is written for batches
            xb = jax.ShapeDtypeStruct((2, *self._state_shape), dtype)
            calls.insert(0, ("batch_apply_fn(params, t, x)", self.batch_apply_fn, xb, xb.shape))
        for what, fn, xs, want in calls:
            try:
                out = jax.eval_shape(fn, abstract, t, xs)
            except Exception as e:  # noqa: BLE001 - any failure here means params and fn disagree
                raise ValueError(
                    f"ModuleField: {what} failed for params {_describe(abstract)} and x of shape "
                    f"{tuple(xs.shape)}: the params pytree does not match the function "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from e
            if not hasattr(out, "shape"):
                raise ValueError(
                    f"ModuleField: {what} must return one array, got {jax.tree.structure(out)}"
                )
            if tuple(out.shape) != tuple(want):
                raise ValueError(
                    f"ModuleField: {what} returns shape {tuple(out.shape)} for x of shape "
                    f"{tuple(xs.shape)}; a vector field must return dx/dt of the same shape as x"
                )
            if not jnp.issubdtype(out.dtype, jnp.floating):
                raise ValueError(f"ModuleField: {what} returns dtype {out.dtype}; dx/dt must be floating")

    # ---- Flax ---------------------------------------------------------------------------------
    @classmethod
    def from_flax(
        cls,
        module,
        x_example: Array,
        key: PRNGKeyArray,
        *,
        time_dependent: bool | None = None,
    ) -> ModuleField:
        """A field from a Flax linen ``module`` with ``module.apply(variables, x) -> dx/dt`` on a
        **batch** ``x`` of shape ``(B, *S)`` (``x_example``; its values only feed ``module.init``).

        ``time_dependent``: pass ``t`` as a keyword (``module.apply(variables, x, t=t)``); ``None``
        (default) means: when the module's ``__call__`` has a parameter named ``t``. θ is
        ``variables['params']``; ``layout.init(key)`` re-runs ``module.init``. Samples must not
        interact inside the module (the per-sample path applies it to one sample at a time).

        Raises ``ValueError`` when the module has variable collections other than ``params``
        (mutable state such as BatchNorm statistics cannot ride along a solve), when ``x_example``
        has no batch axis, or any of :class:`ModuleField`'s construction errors.
        """
        x_example = jnp.asarray(x_example)
        if x_example.ndim < 2:
            raise ValueError(
                f"ModuleField.from_flax: x_example must be a batch of states (B, *state_shape), "
                f"got shape {tuple(x_example.shape)}"
            )
        if not jnp.issubdtype(x_example.dtype, jnp.floating):
            raise TypeError(f"ModuleField.from_flax: x_example must be floating, got {x_example.dtype}")
        time_kw = _accepts_t(module) if time_dependent is None else bool(time_dependent)
        init = _FlaxInit(module, tuple(x_example.shape), jnp.dtype(x_example.dtype), time_kw)
        kw = {"t": jnp.zeros((), x_example.dtype)} if time_kw else {}
        try:
            variables = module.init(key, x_example, **kw)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"ModuleField.from_flax: {type(module).__name__}.init(key, x) failed for x of shape "
                f"{tuple(x_example.shape)} ({type(e).__name__}: {e})"
            ) from e
        other = sorted(set(variables) - {"params"})
        if other:
            raise ValueError(
                f"ModuleField.from_flax: {type(module).__name__} has variable collections {other} "
                "besides 'params'; only stateless modules can be controlled (θ replaces 'params', and "
                "mutable state such as batch statistics cannot be carried through the ODE solve)"
            )
        if "params" not in variables:
            raise ValueError(f"ModuleField.from_flax: {type(module).__name__} has no parameters")
        sample = _FlaxSample(_FlaxBatch(module, time_kw))
        return cls(
            sample,
            variables["params"],
            tuple(x_example.shape[1:]),
            init_fn=init,
            batch_apply_fn=sample.batch,
        )

    # ---- θ <-> params ------------------------------------------------------------------------
    def unflatten(self, theta: Float[Array, "*batch P"]) -> Any:
        """θ ``(*batch, P)`` → the parameter PyTree with leaves ``(*batch, *shape)`` (θ's dtype)."""
        return self._layout.unflatten_tree(theta)

    def flatten(self, params: Any) -> Float[Array, "*batch P"]:
        """The parameter PyTree (leaves ``(*batch, *shape)``) → θ ``(*batch, P)``."""
        return self._layout.flatten_tree(params)

    @property
    def initial_params(self) -> Any:
        """The parameter PyTree the field was built from (leaves in JAX's default float dtype)."""
        return self.unflatten(jnp.asarray(self._layout.initial.array))

    # ---- evaluation ---------------------------------------------------------------------------
    def __call__(self, t, x: Array, theta: Float[Array, "*batch P"]) -> Array:
        """``dx/dt`` ``(B, *S)`` for θ shared ``(P,)`` or per sample ``(B, P)``.

        Raises ValueError/TypeError (from :class:`~ncode_jax.fields.VectorField`) for an ``x`` of
        the wrong shape or dtype, or a θ of the wrong size, batch or dtype.
        """
        self.check_x(x)
        self.check_theta(theta, x.shape[0])
        return self.evaluate(t, x, theta)

    def evaluate(self, t, x: Array, theta: Float[Array, "*batch P"]) -> Array:
        """``dx/dt`` without checks (what a solve calls at every stage)."""
        params = self._layout.unflatten_tree(theta)
        if theta.ndim == 1:
            if self.batch_apply_fn is not None:
                return self.batch_apply_fn(params, t, x)
            return jax.vmap(self.apply_fn, in_axes=(None, None, 0))(params, t, x)
        return jax.vmap(self.apply_fn, in_axes=(0, None, 0))(params, t, x)

    def apply(self, t, x, w):  # pragma: no cover - evaluate is overridden
        raise NotImplementedError("ModuleField evaluates through evaluate")

