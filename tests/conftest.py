"""Shared test setup: float64 by default (gradient checks need it), a tree_allclose helper.

A test module that must run in float32 (training scripts, as users run them) sets
``X64 = False`` at module level.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _precision(request):
    jax.config.update("jax_enable_x64", getattr(request.module, "X64", True))
    yield
    jax.config.update("jax_enable_x64", True)


def tree_allclose(a, b, *, rtol=1e-7, atol=0.0) -> bool:
    """True when two PyTrees have the same structure and all leaves are allclose."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))


def tree_rel_err(a, b) -> float:
    """max over leaves of ||a - b|| / max(||b||, tiny)."""
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = jnp.asarray(x), jnp.asarray(y)
        errs.append(float(jnp.linalg.norm((x - y).ravel()) / max(float(jnp.linalg.norm(y.ravel())), 1e-30)))
    return max(errs)
