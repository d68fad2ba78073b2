"""Small training utilities shared by the entry points: JSON-lines metrics, atomic checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    """Append one JSON object per line to ``path`` (flushed at every write)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """Save a PyTree of arrays and Python values (converted to NumPy) atomically."""
    host = jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array) else a, state)
    atomic_write_bytes(path, pickle.dumps(host))


def load_checkpoint(path: str | os.PathLike) -> Any | None:
    """The state saved at ``path``, or None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)
