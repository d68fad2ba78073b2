"""Config files and command-line overrides for the training entry points.

A config file is a Python module defining ``get_config() -> dict``. Overrides come as
``key=value`` strings; each value is parsed to the type of the default it replaces (numbers,
booleans, ``None``, tuples as ``16,16``), and unknown keys are errors.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return dict(module.get_config())


def _parse(value: str, default: Any, key: str) -> Any:
    if value.lower() == "none":
        return None
    if isinstance(default, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"override {key}={value}: expected true/false")
    if isinstance(default, tuple):
        return tuple(_parse(v, default[0] if default else 0, key) for v in value.split(",") if v)
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"override {key}={value}: expected an integer") from None
    if isinstance(default, float) or default is None:
        try:
            return ast.literal_eval(value) if default is None else float(value)
        except (ValueError, SyntaxError):
            if default is None:
                return value
            raise ValueError(f"override {key}={value}: expected a number") from None
    return value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    config = dict(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if key not in config:
            raise ValueError(f"unknown config key {key!r}; known keys: {sorted(config)}")
        config[key] = _parse(value, config[key], key)
    return config


# --- validation shared by the config dataclasses (ToyConfig, ClassifyConfig, ...) ----------------


def check_choice(what: str, value: Any, choices) -> None:
    """``ValueError`` naming ``what`` and the valid choices unless ``value in choices``."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {sorted(choices)}")


def check_range(config: Any, names, *, minimum: float, strict: bool = False) -> None:
    """``ValueError`` unless each named field of ``config`` is ``>= minimum`` (``>`` if ``strict``)."""
    for name in names:
        value = getattr(config, name)
        ok = value > minimum if strict else value >= minimum
        if not ok:
            bound = f"> {minimum}" if strict else f">= {minimum}"
            raise ValueError(f"config value {name}={value} is out of range: must be {bound}")


def check_dt(dt: float | None, t1: float) -> None:
    """A fixed step must satisfy ``0 < dt <= t1``; ``None`` selects adaptive stepping."""
    if dt is not None and not 0 < dt <= t1:
        raise ValueError(f"config value dt={dt} is out of range: need 0 < dt <= t1={t1} (or None)")
