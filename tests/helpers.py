"""Helpers shared by several test modules (imported as ``from helpers import ...``): documented code
blocks, PyTree comparisons, fields that count their evaluations, and the kill-and-resume harness.

The benchmarks count field evaluations with the same fields (``benchmarks.common`` imports them
from here), so this module needs nothing beyond the package's own dependencies.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ncode_jax as nc

ROOT = Path(__file__).resolve().parents[1]


def doc_block(path: str, heading: str, index: int) -> str:
    """The ``index``-th Python code block of the section under ``heading`` of the Markdown file
    ``path`` (relative to the repository root): the tests run documented examples as written."""
    section = (ROOT / path).read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


# --- PyTree comparisons ---------------------------------------------------------------------------


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
    with jax.numpy_dtype_promotion("standard"):  # e.g. a float32 result against a float64 reference
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = jnp.asarray(x), jnp.asarray(y)
            scale = max(float(jnp.linalg.norm(y.ravel())), 1e-30)
            errs.append(float(jnp.linalg.norm((x - y).ravel()) / scale))
    return max(errs)


# --- fields that count their evaluations ----------------------------------------------------------

_EVALUATIONS = [0]


def _bump(_) -> None:
    _EVALUATIONS[0] += 1


def count_evaluation(x) -> None:
    """Inside a traced function (a vector field, a running cost): count one evaluation on the
    host each time XLA runs it. The callback reads one entry of ``x``, which must depend on the
    state: a callback without operands is loop-invariant, and JAX's partial evaluation of a
    differentiated ``lax.scan`` hoists it out of the loop, so it would run once, not once per step.
    Under ``jax.vmap`` (e.g. ``solve(batch="vmap")``) it runs once per mapped element, so divide
    such counts by the batch size."""
    jax.debug.callback(_bump, jnp.ravel(x)[0])


@dataclasses.dataclass(frozen=True)
class CountingMLPField(nc.MLPField):
    """:class:`ncode_jax.MLPField` that counts its evaluations (:func:`count_evaluation`)."""

    def apply(self, t, x, w):
        count_evaluation(x)
        return super().apply(t, x, w)


@dataclasses.dataclass(frozen=True)
class CountingConvField(nc.ConvBlockField):
    """:class:`ncode_jax.ConvBlockField` that counts its evaluations (:func:`count_evaluation`)."""

    def apply(self, t, x, w):
        count_evaluation(x)
        return super().apply(t, x, w)


def counted(fn: Callable, *args):
    """``(fn(*args), the evaluations counted during that call)`` (:func:`count_evaluation`)."""
    jax.effects_barrier()
    _EVALUATIONS[0] = 0
    out = jax.block_until_ready(fn(*args))
    jax.effects_barrier()
    return out, _EVALUATIONS[0]


def evaluations(fn: Callable, *args) -> int:
    """Evaluations counted during one call ``fn(*args)``, after a first call that compiles."""
    jax.block_until_ready(fn(*args))
    return counted(fn, *args)[1]


# --- kill and resume ------------------------------------------------------------------------------


def kill_and_resume(monkeypatch, run: Callable[[], Any], *, kill_after_step: int,
                    on_kill: Callable[[], None] | None = None) -> tuple[list[int], Any]:
    """Run ``run()`` (a training run into a work directory) as if the process were killed right
    after it saved the checkpoint of step ``kill_after_step``, then ``on_kill()`` (checks of what
    the kill left behind), then ``run()`` again: the resume.

    The kill is a ``KeyboardInterrupt`` raised from the checkpoint save, after the save completed.
    Returns ``(the steps saved before the kill, what the resumed run returned)``. Raises
    ``AssertionError`` when the first run ends without reaching that step's save.
    """
    from train.checkpoint import Checkpointer

    real_save, saves = Checkpointer.save, []

    def save_then_die(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        saves.append(step)
        if step == kill_after_step:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    try:
        run()
    except KeyboardInterrupt:
        if saves[-1:] != [kill_after_step]:
            raise  # not the simulated kill
    else:
        raise AssertionError(f"the run ended without saving step {kill_after_step} (saved {saves})")
    finally:
        monkeypatch.setattr(Checkpointer, "save", real_save)
    if on_kill is not None:
        on_kill()
    return saves, run()
