"""Shared test setup: float64 by default (gradient checks need it), and the marker that turns the
test-time checks of the array annotations (tests/typecheck.py) off for a test.

A test module that must run in float32 (training scripts, as users run them) sets
``X64 = False`` at module level. Shared helpers live in tests/helpers.py.
"""

import os
from pathlib import Path

# On a GPU machine each JAX process would preallocate 75% of the GPU's memory; pytest-xdist starts
# one process per worker (and some tests start more): allocate on demand instead. Set before JAX
# starts its backend, inherited by every subprocess a test starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jaxtyping  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# float32 dots and convolutions in full float32 on every backend (GPUs default to TF32, which
# the tests' 1e-5 float32 comparisons would not meet); no effect on CPU
jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core on CPU machines; at most 4 where a GPU is present (every
    worker is a JAX process on the same GPU)."""
    cores = os.cpu_count() or 1
    return min(cores, 4) if _has_gpu() else cores


@pytest.fixture(autouse=True, scope="module")
def _precision(request):
    """x64 (``X64``), dtype promotion (``DTYPE_PROMOTION``) and rank promotion
    (``RANK_PROMOTION``) of a test module.

    Promotion is strict by default: an operation that mixes dtypes (float32 with float64, an
    integer array with a float array) raises instead of promoting silently, and so does one that
    adds leading axes implicitly (a shared ``(P,)`` θ against a per-sample ``(B, P)`` one): the
    library broadcasts explicitly (``ncode_jax.fields.add_bias``). Python scalars stay weakly
    typed. A module whose tests drive optax or flax modules sets
    ``DTYPE_PROMOTION = "standard"``: optax's Adam mixes a Python float with its int32 step count,
    and flax's Dense promotes float64 inputs against its float32 parameters."""
    jax.config.update("jax_enable_x64", getattr(request.module, "X64", True))
    jax.config.update("jax_numpy_dtype_promotion", getattr(request.module, "DTYPE_PROMOTION", "strict"))
    jax.config.update("jax_numpy_rank_promotion", getattr(request.module, "RANK_PROMOTION", "raise"))
    yield
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _annotation_checks(request):
    """Off for a test marked ``wrong_inputs`` (pyproject.toml's markers)."""
    if request.node.get_closest_marker("wrong_inputs") is None:
        yield
        return
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
