"""Checkpoints verified on restore, and an exclusive workdir lock.

Checkpoint ``step_<s>/``: ``arrays.npz`` (the state's leaves) and ``manifest.json`` (checkpoint
format :data:`FORMAT`, step, PyTree paths, shapes, dtypes, SHA-256 of ``arrays.npz``, and the run's
identity: task and configuration,
so that a resume is compared with what wrote the checkpoint even without the run's record),
written to a temporary directory, fsynced and renamed (a kill mid-save leaves the older ones
intact). A failed save raises :class:`CheckpointError` at once (no background threads to hang the
process). Restore takes the newest intact checkpoint (an older one, with a message, when the
newest is damaged) and checks format, identity, paths, shapes and dtypes against the model. Process 0
alone writes; every process reads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .config import UserError

#: the layout of what a checkpoint holds; a checkpoint of another format is refused, not converted.
#: 1 (no ``format`` in the manifest): parameters, optimizer state and loop counters as loose entries;
#: 2: the engine's whole :class:`~train.engine.TrainState` with the data position and wall time
FORMAT = 2


class CheckpointError(UserError):
    """A checkpoint could not be written or no intact checkpoint fits the model."""


def host_array(x) -> np.ndarray:
    """A replicated (or host) array as a NumPy array on this process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # replicated: every device holds the whole value
    return np.asarray(x)


def _flat(tree: Any) -> tuple[list[str], list, Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in leaves], [v for _, v in leaves], treedef


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_check(manifest: dict) -> str:
    """SHA-256 of the manifest's own content (all but ``check``): an edited manifest is detected."""
    body = {k: v for k, v in manifest.items() if k != "check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """The last ``max_to_keep`` checkpoints of one run under ``directory``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2, *, write: bool = True,
                 identity: dict | None = None):
        self.directory = Path(directory)
        self.max_to_keep = max_to_keep
        self.write = write
        self.identity = identity  # recorded with every checkpoint saved

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, newest first (intact or not)."""
        if not self.directory.is_dir():
            return []
        return sorted((int(p.name[5:]) for p in self.directory.glob("step_*") if p.name[5:].isdigit()),
                      reverse=True)

    def save(self, step: int, state: Any) -> None:
        """Write ``state`` (a PyTree of arrays) as the checkpoint of ``step``, with the
        checkpointer's ``identity`` (a JSON-able dict: what wrote it) in its manifest; returns once
        it is committed. Raises :class:`CheckpointError` naming the directory if it cannot be written."""
        identity = self.identity
        if not self.write:
            return
        names, values, _ = _flat(state)
        arrays = {n: host_array(v) for n, v in zip(names, values)}
        final = self.directory / f"step_{int(step):08d}"
        tmp = self.directory / f".tmp_step_{int(step):08d}_{os.getpid()}"
        try:
            for stale in self.directory.glob(".tmp_step_*"):  # left by a save that was killed
                if stale.name != tmp.name:
                    shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
            with open(tmp / "arrays.npz", "wb") as f:
                np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays.values())})
                f.flush()
                os.fsync(f.fileno())
            manifest = {"format": FORMAT, "step": int(step), "sha256": _sha256(tmp / "arrays.npz"),
                        "time": time.time(),
                        "leaves": [[n, list(a.shape), a.dtype.str] for n, a in arrays.items()],
                        **({} if identity is None else {"identity": identity})}
            manifest["check"] = _manifest_check(manifest)
            (tmp / "manifest.json").write_text(json.dumps(manifest))
            _fsync(tmp / "manifest.json")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.directory)
            for old in self.steps()[self.max_to_keep:]:
                shutil.rmtree(self.directory / f"step_{old:08d}", ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write the checkpoint of step {step} to {self.directory}: "
                                  f"{e.strerror or e}") from None

    def _read(self, step: int) -> tuple[dict, list[np.ndarray]]:
        d = self.directory / f"step_{step:08d}"
        manifest = json.loads((d / "manifest.json").read_text())
        if not isinstance(manifest, dict):
            raise ValueError("its manifest.json is not a JSON object")
        if "check" in manifest and manifest["check"] != _manifest_check(manifest):
            raise ValueError("its manifest.json was edited or damaged (its check does not match)")
        if manifest["step"] != step:
            raise ValueError(f"its manifest.json names step {manifest['step']}")
        if _sha256(d / "arrays.npz") != manifest["sha256"]:
            raise ValueError("its arrays.npz does not match the SHA-256 in manifest.json")
        with np.load(d / "arrays.npz", allow_pickle=False) as data:
            arrays = [data[f"a{i}"] for i in range(len(manifest["leaves"]))]
            if len(data.files) != len(arrays):
                raise ValueError("its arrays.npz holds other arrays than manifest.json lists")
        for (name, shape, dtype), a in zip(manifest["leaves"], arrays, strict=True):
            if [list(a.shape), a.dtype.str] != [list(shape), dtype]:
                raise ValueError(f"manifest.json does not describe arrays.npz ({name})")
        return manifest, arrays

    def recorded_identity(self) -> dict | None:
        """The identity recorded with the newest intact checkpoint (None: no checkpoint, or one
        written without it)."""
        for step in self.steps():
            try:
                return self._read(step)[0].get("identity")
            except (OSError, ValueError, KeyError, EOFError, TypeError):
                continue
        return None

    def restore(self, template: Any, same: Any = None) -> Any | None:
        """The newest intact checkpoint in ``template``'s structure (None if there is none).

        ``template``'s leaves need only ``shape`` and ``dtype`` (arrays or ``jax.ShapeDtypeStruct``,
        e.g. from ``jax.eval_shape``). Raises :class:`CheckpointError` for a checkpoint of another
        :data:`FORMAT`, of another model (paths, shapes or dtypes differ), or whose recorded
        identity ``same(identity)`` answers with a difference (a string)."""
        names, values, treedef = _flat(template)
        damaged = []
        for step in self.steps():
            try:
                manifest, arrays = self._read(step)
            except (OSError, ValueError, KeyError, EOFError, TypeError) as e:
                damaged.append(step)
                print(f"warning: checkpoint {self.directory}/step_{step:08d} is damaged ({e}); "
                      "trying the previous one", file=sys.stderr, flush=True)
                continue
            if manifest.get("format", 1) != FORMAT:
                raise CheckpointError(
                    f"the checkpoint {self.directory}/step_{step:08d} is in checkpoint format "
                    f"{manifest.get('format', 1)}, which this version does not read (it reads format "
                    f"{FORMAT}); use another workdir, or delete that directory to start over")
            want = [[n, list(v.shape), np.dtype(v.dtype).str] for n, v in zip(names, values)]
            if manifest["leaves"] != want:
                got = manifest["leaves"] + [None] * len(want)
                diff = next((f"{g} vs {w}" for g, w in zip(got, want) if g != w), "extra arrays")
                raise CheckpointError(
                    f"the checkpoint {self.directory}/step_{step:08d} does not fit this model "
                    f"(saved [path, shape, dtype] vs the model's: {diff}); this workdir holds "
                    "another experiment: use another workdir")
            if same is not None and "identity" in manifest and (diff := same(manifest["identity"])):
                raise CheckpointError(
                    f"the checkpoint {self.directory}/step_{step:08d} was written by another experiment "
                    f"({diff}); use another workdir, or delete that directory to start over")
            if damaged:
                print(f"warning: resuming {self.directory} from step {step} instead of damaged "
                      f"step(s) {damaged}", file=sys.stderr, flush=True)
            return jax.tree_util.tree_unflatten(treedef, arrays)
        if damaged:
            raise CheckpointError(f"every checkpoint in {self.directory} is damaged (steps {damaged}); "
                                  "delete them to start over")
        return None


class WorkdirLock:
    """An exclusive ``flock`` on ``<directory>/lock`` naming its holder (pid, host, command, time);
    a second holder gets a :class:`UserError` quoting it. The kernel drops it when the process dies."""

    _held: set[str] = set()  # locks this process holds: taking one again is a no-op

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / "lock"
        self._fd = None
        if str(self.path.resolve()) in self._held:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use the workdir {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise UserError(f"the workdir {self.path.parent} is in use by {holder}; wait for it to end "
                            "or use another workdir") from None
        info = (f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)}), started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.encode(), 0)
        self._held.add(str(self.path.resolve()))

    def release(self) -> None:
        if self._fd is not None:
            self._held.discard(str(self.path.resolve()))
            os.close(self._fd)
            self._fd = None
