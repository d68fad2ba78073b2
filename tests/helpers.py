"""Helpers shared by several test modules (imported as ``from helpers import ...``): documented code
blocks, PyTree comparisons, and the kill-and-resume harness. The fields that count their
evaluations live in :mod:`ncode_jax.evaluations` (the benchmarks use them too) and are re-exported
here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ncode_jax.evaluations import (  # noqa: F401  re-exported for the tests
    CountingConvField,
    CountingMLPField,
    count_evaluation,
    counted,
    evaluations,
)

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
