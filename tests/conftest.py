"""Shared test setup: float64 everywhere (gradient checks need it), a tree_allclose helper."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


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
