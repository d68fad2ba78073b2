"""The type checker the test run applies to every function, method and dataclass of ``ncode_jax``
(``--jaxtyping-packages`` in pyproject.toml: jaxtyping's import hook wraps each of them in
``jaxtyping.jaxtyped(typechecker=check_array_annotations)``).

It checks the array annotations, ``Float[Array, "B P"]`` and the like (also inside ``X | None``,
tuples and dicts): dtype kind, rank and shape, with each dimension name bound to one size across
the arguments and the return value of a call. Annotations without an array type (``float``,
``Literal[...]``, ``Array`` without dtype and shape) are left to the library's own validation,
whose messages (naming the argument and the fix, surviving ``jax.jit``) are what the tests check
and what users see; several of those annotations also take what a user may pass in their place
(a traced time for a ``float``, a NumPy array for an ``Array``).

Checks run when a function is called, so under ``jax.jit`` once per trace, on the tracers' shapes.
"""

import typing

import beartype
from jaxtyping import AbstractArray

_CONF = beartype.BeartypeConf(strategy=beartype.BeartypeStrategy.On)  # every item, not a sample


def _has_array_type(hint) -> bool:
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(_has_array_type(arg) for arg in typing.get_args(hint))


def check_array_annotations(fn):
    """``fn`` with beartype checks on its array annotations alone (jaxtyping passes each function
    here with its annotations resolved; the return value's is among them)."""
    fn.__annotations__ = {name: hint for name, hint in fn.__annotations__.items() if _has_array_type(hint)}
    return beartype.beartype(conf=_CONF)(fn) if fn.__annotations__ else fn
