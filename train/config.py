"""One configuration mechanism for every training script: frozen, typed config dataclasses filled
from their defaults, a config file (a module with ``get_config() -> dict``), then ``--set k=v``.

Text is parsed by the field's annotation (``int``, ``float``, ``bool``, ``str``, ``X | None`` with
``none``, ``tuple[int, ...]`` as ``16,16``); a nested ``solve: SolveConfig`` is addressed as
``solve.dt`` or, its leaf names being unique, ``dt``. Mistakes raise :class:`UserError` naming
key and input. Adding a key is one line: a field with a default.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import types
import typing
from pathlib import Path
from typing import Any

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


def load_config_file(path: str | Path) -> dict:
    """The dict returned by ``get_config()`` of the Python file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: " + ("is a directory" if path.is_dir() else "no such file"))
    try:
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


def convert(key: str, value: Any, typ) -> Any:
    """``value`` (text from the command line, or a value from a file or JSON) as a ``typ``."""
    kinds, optional = _options(typ)
    if value is None or (isinstance(value, str) and value.lower() == "none" and optional):
        if optional:
            return None
        raise UserError(f"config value {key}=None is not allowed: expected {_name(typ)}")
    for kind in kinds:
        try:
            return _convert_one(value, kind)
        except (ValueError, TypeError, SyntaxError):
            continue
    raise UserError(f"config value {key}={value!r}: expected {_name(typ)}")


def _convert_one(value: Any, kind) -> Any:
    if typing.get_origin(kind) is tuple:
        (item, *_) = typing.get_args(kind)
        if isinstance(value, str):
            text = value.strip().strip("()[]")
            value = [v for v in text.replace(" ", "").split(",") if v]
        if not isinstance(value, list | tuple):
            raise TypeError
        return tuple(_convert_one(v, item) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise TypeError
        return int(value) if not isinstance(value, str) else int(value.strip())
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "nan"):
            return float(value)  # parsed, so that the range checks can name it
        return float(ast.literal_eval(value) if isinstance(value, str) else value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError


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
    :func:`to_dict`); validation errors of the dataclasses become :class:`UserError`."""
    known = leaves(cls)
    values: dict[tuple[str, ...], Any] = {}
    for layer in layers:
        for key, value in _flatten(layer):
            if key not in known:
                raise UserError(f"unknown config key {key!r}; known keys: {sorted(known)}")
            path, typ = known[key]
            values[path] = convert(key, value, typ)
    return _construct(cls, values, ())


def _flatten(layer: dict, prefix: str = ""):
    for key, value in layer.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _construct(cls, values: dict, prefix: tuple, base: Any = None) -> Any:
    """``cls`` from the values under ``prefix``; unset fields keep those of ``base`` (the parent's
    default instance of a nested config), else the class defaults."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(typ):
            if any(p[: len(path)] == path for p in values):
                default = f.default if f.default is not dataclasses.MISSING else None
                kwargs[f.name] = _construct(typ, values, path, default)
        elif path in values:
            kwargs[f.name] = values[path]
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"config: {e}") from None


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
