"""Orbax checkpoints for training state, and the run-configuration guard used on resume.

:class:`Checkpointer` saves a PyTree of arrays synchronously (``save`` returns once the step is
committed; orbax writes to a temporary directory and renames it, so a kill mid-save leaves the
previous checkpoint intact) and restores the latest one into the structure of a template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _to_host(tree: Any) -> Any:
    """Arrays and Python/NumPy scalars → NumPy arrays (what orbax's StandardSave accepts)."""
    return jax.tree.map(lambda a: np.asarray(a), tree)


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of one run under ``directory``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).resolve()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self._manager.save(int(step), args=ocp.args.StandardSave(_to_host(state)), force=True)
        self._manager.wait_until_finished()

    def restore(self, template: Any) -> Any | None:
        """The latest checkpoint restored into ``template``'s structure, or None if none."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_host(template))
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_raw(self) -> Any | None:
        """The latest checkpoint as saved (nested dicts of NumPy arrays), or None if none: for
        callers that check shapes themselves before building a template."""
        step = self.latest_step()
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.StandardRestore())

    def close(self) -> None:
        self._manager.close()


def check_run_config(path: str | os.PathLike, config: dict, *, ignore: tuple[str, ...] = (),
                     write: bool = True) -> None:
    """Record ``config`` as JSON at ``path`` on first use; on later runs raise if the settings
    (other than those in ``ignore``) differ, so a resume never mixes two experiments.

    ``write=False`` only checks (the other processes of a multi-process run); the file is replaced
    atomically, so a process reading it never sees half of it."""
    path = Path(path)
    config = json.loads(json.dumps(config))  # as it reads back from disk (tuples become lists)
    current = {k: v for k, v in config.items() if k not in ignore}
    if path.exists():
        saved = {k: v for k, v in json.loads(path.read_text()).items() if k not in ignore}
        if saved != current:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
                             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{path.parent} holds a run with a different configuration ({diff}); use another "
                "workdir or delete that directory to start over"
            )
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)
