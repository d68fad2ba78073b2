"""One configuration mechanism for every training script: frozen, typed config dataclasses filled
from their defaults, a config file (a module with ``get_config() -> dict``), then ``--set k=v``.

Values are checked and converted to the field's annotation by pydantic (``TypeAdapter`` of the
dataclass: text ``"3"`` for an int, ``"1e-3"`` for a float, ``true``/``no`` for a bool), plus the
command-line spellings ``none`` (``X | None``) and ``16,16`` (``tuple[int, ...]``); a nested
``solve: SolveConfig`` is addressed as ``solve.dt`` or, its leaf names being unique, ``dt``.
Mistakes raise :class:`UserError` naming key and input. Adding a key is one line: a field with a
default. (A library for the command line itself, tyro or ml_collections, would change every
documented command to ``--config.key`` or absl flags; pydantic does the typing under ours.)
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import importlib.util
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pydantic

from ncode_jax import SolveConfig  # noqa: F401  (the configs' solver settings)


class UserError(ValueError):
    """A mistake in what the user gave (flags, config, workdir, data): ``error: …``, exit code 2."""


class Config:
    """Base of the config dataclasses: :meth:`from_dict` and the ``RESUMABLE`` keys (those that may
    change when a run is resumed)."""

    RESUMABLE: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, config: dict):
        return build(cls, config)


#: the shipped config files: loaded as modules of this package, so that they import each other
#: relatively, whichever name the package has (``train`` in the repository, or its installed name)
CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config_file(path: str | Path) -> dict:
    """The dict returned by ``get_config()`` of the Python file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: " + ("is a directory" if path.is_dir() else "no such file"))
    try:
        if path.resolve().parent == CONFIGS and path.stem.isidentifier():
            module = importlib.import_module(f"{__package__}.configs.{path.stem}")
        else:
            spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        config = dict(module.get_config())
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported as such
        raise UserError(f"--config {path}: cannot load it ({type(e).__name__}: {e})") from None
    return config


def leaves(cls) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every key of a config class: dotted name -> (field path, annotation); unique leaf names of
    nested dataclasses are also keys of their own (``dt`` for ``solve.dt``)."""
    out, counts = {}, {}
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            for sub, (path, t) in leaves(typ).items():
                out[f"{f.name}.{sub}"] = ((f.name, *path), t)
                counts[sub] = counts.get(sub, 0) + 1
        else:
            out[f.name] = ((f.name,), typ)
    for path, typ in list(out.values()):
        short = path[-1]
        if len(path) > 1 and counts.get(short) == 1 and short not in out:
            out[short] = (path, typ)
    return out


def _options(typ) -> tuple[list, bool]:
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = typing.get_args(typ)
        return [a for a in args if a is not type(None)], type(None) in args
    return [typ], False


_FRACTION = re.compile(r"\s*[-+]?\d+\s*/\s*\d+\s*")


def _text(value: Any, typ) -> Any:
    """Command-line spellings pydantic does not read: ``none`` for None, ``16,16`` for tuples,
    ``1/3`` for a float (a fraction of integers, e.g. a step size ``dt=1/3``)."""
    kinds, optional = _options(typ)
    if isinstance(value, str):
        if optional and value.strip().lower() == "none":
            return None
        if any(typing.get_origin(k) is tuple for k in kinds):
            return [v for v in value.strip().strip("()[]").replace(" ", "").split(",") if v]
        if float in kinds and _FRACTION.fullmatch(value):
            try:
                return float(fractions.Fraction(value.replace(" ", "")))
            except (ZeroDivisionError, OverflowError, ValueError):
                return value  # pydantic then refuses it in one line, naming key and value
    return value


def _name(typ) -> str:
    kinds, optional = _options(typ)
    names = [getattr(k, "__name__", str(k)) if typing.get_origin(k) is not tuple else "a comma list of "
             + getattr(typing.get_args(k)[0], "__name__", "values") + "s" for k in kinds]
    return " or ".join(names + (["none"] if optional else []))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: value}`` (later ones win)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def build(cls, *layers: dict) -> Any:
    """An instance of the config class ``cls`` from the defaults updated by each layer in turn
    (dicts of ``key -> value``, keys as in :func:`leaves` or nested dicts as written by
    :func:`to_dict`). Types are checked and converted by pydantic (strict about e.g. ``3.5`` for
    an int, lax about ``"3"``); every mistake, the dataclasses' own checks included, becomes a
    one-line :class:`UserError` naming key and input."""
    known = leaves(cls)
    given: dict = {}
    raw: dict = {}  # field path -> the value as the user wrote it
    for layer in layers:
        for key, value in _flatten(layer):
            if key not in known:
                raise UserError(f"unknown config key {key!r}; known keys: {sorted(known)}")
            path, typ = known[key]
            if value is None and not _options(typ)[1]:
                raise UserError(f"config value {key}=None is not allowed: expected {_name(typ)}")
            if isinstance(value, bool) and bool not in _options(typ)[0]:  # pydantic would read 1/0
                raise UserError(f"config value {key}={value!r}: expected {_name(typ)}")
            if len(path) == 2:  # a nested config starts from the parent's default instance
                given.setdefault(path[0], dataclasses.asdict(cls.__dataclass_fields__[path[0]].default))
            (given[path[0]] if len(path) == 2 else given)[path[-1]] = _text(value, typ)
            raw[path] = value
    try:
        config = _adapter(cls).validate_python(given)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "value_error":  # a check of the dataclass itself
            raise UserError("config: " + err["msg"].removeprefix("Value error, ")) from None
        loc = tuple(str(x) for x in err["loc"])
        key, (path, typ) = next((k, v) for k, v in known.items() if v[0] == loc[: len(v[0])])
        value = raw.get(path, err["input"])
        raise UserError(f"config value {key}={value!r}: expected {_name(typ)}") from None
    _check_edges(config)
    return config


_INT64 = 2**63
_SEED = 2**32  # jax.random.key and NumPy's generators take seeds in [0, 2**32) on every platform
_FLOAT32_MAX, _FLOAT32_MIN = float(np.finfo(np.float32).max), float(np.finfo(np.float32).smallest_subnormal)


def _check_edges(config, prefix: str = "") -> None:
    """Values at the edges of their types, refused in one line: integers outside 64 bits (seeds
    outside [0, 2**32)), and floats that float32 (the training dtype) turns into inf or 0."""
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_edges(value, f"{key}.")
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, bool):
                continue
            if isinstance(v, int):
                limit = _SEED if f.name.endswith("seed") else _INT64
                if not -limit <= v < limit:
                    raise UserError(f"config value {key}={value!r} is out of range: must be below "
                                    f"{'2**32' if limit == _SEED else '2**63'} in magnitude")
            elif isinstance(v, float) and math.isfinite(v) and v != 0:
                if abs(v) > _FLOAT32_MAX or abs(v) < _FLOAT32_MIN:
                    raise UserError(f"config value {key}={value!r} is out of range: float32, in which "
                                    f"training runs, makes it {'inf' if abs(v) > 1 else '0'}")


@functools.cache
def _adapter(cls) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def _flatten(layer: dict, prefix: str = ""):
    for key, value in layer.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


to_dict = dataclasses.asdict  # the config as nested dicts


def check(ok: bool, message: str) -> None:
    """``ValueError(message)`` unless ``ok`` (validation inside the config dataclasses)."""
    if not ok:
        raise ValueError(message)


def check_choice(what: str, value: Any, choices) -> None:
    check(value in choices, f"unknown {what} {value!r}; choose one of {sorted(choices)}")


def check_range(config: Any, names, *, minimum: float, strict: bool = False) -> None:
    """``ValueError`` unless each named field (if not None) is ``>= minimum`` (``>`` if strict)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (value > minimum if strict else value >= minimum):
            bound = f"> {minimum}" if strict else f">= {minimum}"
            raise ValueError(f"config value {name}={value} is out of range: must be {bound}")
        if isinstance(value, float) and not math.isfinite(value):  # e.g. lr=inf
            raise ValueError(f"config value {name}={value} is out of range: must be finite")
