"""Timing helpers for benchmarks: warm-up, medians, machine/version records."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax

RESULTS = Path(__file__).parent / "results"


def time_fn(fn: Callable, *args, repeats: int = 20) -> dict:
    """Compile time (first call) and the median/min of ``repeats`` timed calls, in ms."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return {"compile_s": round(compile_s, 3), "median_ms": round(statistics.median(times), 3),
            "min_ms": round(min(times), 3), "repeats": repeats}


def machine() -> dict:
    import diffrax
    import equinox

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "diffrax": diffrax.__version__,
            "equinox": equinox.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return out
