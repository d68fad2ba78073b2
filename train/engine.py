"""The one run engine under every training script: train state, step, loop, workdir, CLI.

A task (:class:`Task`) supplies its model, data, loss and evaluation; :func:`fit` does the rest
for all of them:

* **train state** — :class:`TrainState` ``(step, params, extra (e.g. batch statistics), opt_state,
  rng)``, one PyTree, built by :func:`init_state` (its shapes, for a restore, by ``jax.eval_shape``
  of the same function); step keys ``fold_in(rng, step)`` and a data order that is a pure function
  of ``(seed, epoch)`` make a resumed run bit-identical to an uninterrupted one;
* **step** — :func:`make_step` gives ``step(state, batch) -> (state, metrics)``;
  :func:`compile_step` jits it on the data-parallel mesh with the state donated;
* **loop** — metrics every ``log_every`` steps; evaluation every ``task.eval_every`` steps and at
  the end; checkpoints (the whole train state, the data position and the wall time) every
  ``checkpoint_every`` steps and after each evaluation; a progress bar;
* **workdir** — exclusive lock; ``config.json`` written with the first checkpoint, once config,
  data and checkpoint were accepted; only keys outside each config's ``RESUMABLE`` compared on
  resume; verified checkpoints with fallback; ``metrics.jsonl`` append-only, fsynced before the
  checkpoint that covers its rows (:func:`read_metrics` skips torn lines and replayed rows);
  ``summary.json`` with ``finished``.

:func:`load_run` rebuilds model, trained parameters and config of any run directory; :func:`main`
is every script's command line (``--config``, ``--workdir``, ``--set k=v``, ``--<key> value``,
``--no-progress``, multi-host flags); a :class:`~train.config.UserError` ends it with one
``error: …`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from ncode_jax.data.images import BatchIterator, load_dataset

from . import parallel
from .checkpoint import Checkpointer, CheckpointError, WorkdirLock, host_array
from .config import UserError, build, leaves, load_config_file, parse_overrides, to_dict

#: run-record name -> module of this package defining ``Task`` (for :func:`load_run`)
TASKS = {"toy": ".toy", "classify": ".classify", "autoencode": ".autoencode",
         "digit_features": ".digit_features"}


class Task:
    """What a training task supplies; the engine does everything else.

    Subclasses set ``name`` (a key of :data:`TASKS`), ``config_class`` and, in ``__init__``,
    ``self.config``, ``self.model``, ``self.train`` and ``self.test`` (datasets with ``images``
    and ``labels`` arrays, first axis the examples: :class:`~ncode_jax.data.Dataset`,
    :class:`~ncode_jax.data.ToySplit`), and define :meth:`init`, :meth:`loss` (the training loss
    and metrics) and :meth:`eval_sums` (held-out sums)."""

    name: str
    config_class: type
    #: summary metrics whose paired differences between groups (same seeds) a sweep reports
    compare: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config

    def load(self, dataset: str, splits=("train", "test"), train_examples=None, **kw) -> None:
        """``self.train``, ``self.test`` from :func:`load_dataset` (the first ``train_examples``)."""
        self.train, self.test = (load_dataset(dataset, s, data_dir=self.config.data_dir, **kw)
                                 for s in splits)
        if train_examples is not None:
            if train_examples < self.config.batch_size:
                raise ValueError(f"train_examples={train_examples} is smaller than batch_size")
            available = self.train.images.shape[0]
            if train_examples > available:  # it would train on fewer than the config records
                raise ValueError(f"train_examples={train_examples} is more than the {available} examples of "
                                 f"{dataset!r} split {splits[0]!r}: use at most {available}, or none for all")
            self.train = self.train._replace(images=self.train.images[:train_examples],
                                             labels=self.train.labels[:train_examples])

    @property
    def steps_per_epoch(self) -> int:
        return self.train.images.shape[0] // self.config.batch_size

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def eval_every(self) -> int:
        """Steps between evaluations (0: only at the end)."""
        return self.steps_per_epoch

    def batches(self) -> BatchIterator:
        return BatchIterator(self.train, self.config.batch_size, seed=self.config.seed)

    def prepare(self, batch, step: int) -> tuple:  # host arrays: a pure function of batch and step
        return batch.images, batch.labels

    def optimizer(self, total_steps: int) -> optax.GradientTransformation:
        return optax.adam(self.config.lr)

    def init(self, key) -> tuple[Any, Any]:  # (trained params, other model state)
        raise NotImplementedError

    def loss(self, params, extra, batch: tuple, key) -> tuple[jax.Array, tuple[dict, Any]]:
        """``(loss, (metrics, new extra))`` of one batch (jitted, differentiated in ``params``)."""
        raise NotImplementedError

    def eval_sums(self, params, extra, images, labels, mask) -> dict:
        """Sums over the real (``mask``) rows of a held-out batch; ``*nfe`` keys are averaged."""
        raise NotImplementedError

    def row(self) -> dict:  # fields naming the run in every metrics row and the summary
        return {"model": self.config.model}

    def variables(self, params, extra) -> Any:  # what a user applies the model to (load_run)
        return params

    def describe(self, step: int, ev: dict) -> str:
        return " ".join(map(str, self.row().values())) + f" step {step}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in ev.items())


class Run(NamedTuple):
    """A run directory loaded by :func:`load_run`."""

    model: Any
    params: Any  # trained parameters (or variables) as the model takes them
    config: Any
    step: int
    finished: bool
    task: Task


# --- metrics ----------------------------------------------------------------------------------


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append JSON lines in one write and fsync; a torn last line (a kill mid-write) is isolated on
    its own line and skipped by :func:`read_metrics`. The file is never rewritten."""
    if not rows:
        return
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            text = text if f.read(1) == b"\n" else "\n" + text
    with open(path, "ab") as f:
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl``: torn lines skipped, and for rows of the same kind and step
    (replayed after a resume) the last one kept, in step order."""
    path = Path(path)
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.pop((row.get("kind"), row["step"]), None)
            rows[(row.get("kind"), row["step"])] = row
    return sorted(rows.values(), key=lambda r: r["step"])


def markdown_table(header: list[str], rows: list[list]) -> str:
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header), *rows])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# --- the run ------------------------------------------------------------------------------------


def _experiment(config) -> dict:
    skip = set(getattr(config, "RESUMABLE", ()))
    return {k: v for k, v in to_dict(config).items() if k not in skip}


def _identity(task: Task) -> dict:
    """What a checkpoint records about the run that wrote it: task and whole configuration."""
    return json.loads(json.dumps({"task": task.name, "config": to_dict(task.config)}))


def _differs(name: str, config):
    """``identity -> difference``: the non-resumable config keys (or the task) in which a
    checkpoint's recorded identity differs from task ``name`` with ``config``, as
    ``key: old -> new`` ('' if none)."""
    def diff(identity: dict) -> str:
        if identity.get("task") != name:
            return f"task {identity.get('task')!r}, not {name!r}"
        try:
            old = build(type(config), identity["config"])
        except (KeyError, TypeError, UserError) as e:
            return f"a configuration this version cannot read: {e}"
        a, b = (_flat_experiment(c) for c in (old, config))
        return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                         if a.get(k) != b.get(k))
    return diff


def _flat_experiment(config) -> dict:
    out = {}
    for key, value in _experiment(config).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def check_recorded_config(workdir: Path, task: Task) -> None:
    """Raise :class:`UserError` if ``workdir`` holds a run of another experiment."""
    path = workdir / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        old = build(task.config_class, saved["config"]) if saved.get("task") == task.name else None
    except (ValueError, KeyError, UserError):
        old = None
    if old is None:
        raise UserError(f"{workdir} holds a run this version cannot read or of another task ({path}); "
                        "use another workdir")
    a, b = _experiment(old), _experiment(task.config)
    if a != b:
        diff = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a) if a.get(k) != b.get(k))
        raise UserError(f"{workdir} holds a run with a different configuration ({diff}); use another "
                        "workdir, or delete that directory to start over")


# --- the train state and one step -------------------------------------------------------------


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes, one PyTree (checkpointed whole).

    ``step``: int32 scalar, the number of steps taken; ``params``: the trained parameters;
    ``extra``: the model's other state (e.g. batch statistics; ``{}`` if none); ``opt_state``: the
    optimizer's state; ``rng``: the run's key as ``jax.random.key_data`` (uint32), step ``k``
    drawing with ``fold_in(rng, k)``, so that a resumed run draws the keys of an uninterrupted one."""

    step: jax.Array
    params: Any
    extra: Any
    opt_state: Any
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        """The key of the next step, ``fold_in(rng, step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def init_state(task: Task, optimizer: optax.GradientTransformation) -> TrainState:
    """The state before the first step: ``task.init(key(seed))`` and the optimizer's first state."""
    key = jax.random.key(task.config.seed)
    params, extra = task.init(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(key))


def make_step(task: Task, optimizer: optax.GradientTransformation):
    """``step(state, batch) -> (state, metrics)``, not jitted: one ``optimizer`` update on the
    gradient of ``task.loss`` at the state's key; ``metrics`` are the scalars ``loss`` and the
    task's training metrics (:meth:`Task.loss`'s)."""

    def step(state: TrainState, batch: tuple) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(task.loss, has_aux=True)
        (loss, (metrics, extra)), grads = grad_fn(state.params, state.extra, batch, state.key)
        # value: the loss, for transformations that read it (optax.contrib.reduce_on_plateau)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=loss)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            extra=extra, opt_state=opt_state)
        return new, {"loss": loss, **metrics}

    return step


def compile_step(task: Task, optimizer, dp: parallel.DataParallel):
    """:func:`make_step` compiled on ``dp``'s mesh (batch sharded, state replicated and donated),
    returning also the largest ``|value|`` of the new parameters (NaN or inf if one is not finite),
    the engine's watch on them without copying them to the host."""
    step = make_step(task, optimizer)

    def watched(state: TrainState, batch: tuple) -> tuple[TrainState, dict, jax.Array]:
        state, metrics = step(state, batch)
        largest = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(state.params)
                   if jnp.issubdtype(x.dtype, jnp.floating) and x.size]
        return state, metrics, functools.reduce(jnp.maximum, largest, jnp.zeros(()))

    return dp.jit(watched, batch_argnums=(1,), donate_argnums=(0,))


def _saved(state: TrainState, position: dict, wall_time) -> dict:
    """What a checkpoint holds: the whole train state, the data position (``epoch``, ``index``) and
    the wall time so far. The one spelling of it: saves and the restore template both use it."""
    return {"state": state, "data": {k: np.asarray(position[k]) for k in ("epoch", "index")},
            "wall_time": np.asarray(wall_time, np.float64)}


def _template(task: Task, optimizer) -> dict:
    """Shapes and dtypes of a checkpoint (``jax.eval_shape``: nothing is initialised)."""
    return _saved(jax.eval_shape(lambda: init_state(task, optimizer)), {"epoch": 0, "index": 0}, 0.0)


class Fitted(NamedTuple):
    """What :func:`fit` returns: the run's summary and its final :class:`TrainState`."""

    summary: dict
    state: TrainState


def fit(task: Task, workdir: str | os.PathLike, *, progress: bool = True) -> Fitted:
    """Train ``task`` in ``workdir`` (resuming from its checkpoint), evaluate; the summary (also
    written to ``summary.json``) and the final train state."""
    workdir = Path(workdir)
    dp = parallel.DataParallel.create(getattr(task.config, "num_devices", None))
    try:
        dp.check_batch(task.config.batch_size, "batch_size")
    except ValueError as e:
        raise UserError(str(e)) from None
    lock = WorkdirLock(workdir) if dp.is_main else None
    try:
        loop = _Loop(task, workdir, dp, progress)
        state = loop.resume()
        while loop.step < loop.total:
            state = loop.advance(state)
        return Fitted(loop.finish(state), state)
    finally:
        if lock is not None:
            lock.release()


def train_and_evaluate(task: Task, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """:func:`fit`'s summary."""
    return fit(task, workdir, progress=progress).summary


class _Loop:
    """One run of :func:`fit`: resume, steps with their metrics rows, evaluations, checkpoints
    (each only after the rows it covers are on disk) and the summary."""

    def __init__(self, task: Task, workdir: Path, dp: parallel.DataParallel, progress: bool):
        self.t_start, self.prior_wall = time.perf_counter(), 0.0
        self.task, self.workdir, self.dp, self.progress = task, workdir, dp, progress
        check_recorded_config(workdir, task)
        self.total = task.total_steps
        self.optimizer = task.optimizer(self.total)
        self.ckpt = Checkpointer(workdir / "checkpoints", write=dp.is_main, identity=_identity(task))
        self.metrics_path, self.pending, self.last_eval = workdir / "metrics.jsonl", [], None
        self.it = task.batches()
        self.failed = StepFailure(task, workdir, init_scale=lambda: _max_abs(
            task.init(jax.random.key(task.config.seed))[0]))
        self.train_step = compile_step(task, self.optimizer, dp)
        self.eval_step = dp.jit(lambda p, e, batch: task.eval_sums(p, e, *batch), batch_argnums=(2,))

    def resume(self) -> TrainState:
        """The newest checkpoint's state (a fresh one without), placed on the mesh; the data
        iterator, step and wall time set from it."""
        task = self.task
        restored = self.ckpt.restore(_template(task, self.optimizer), _differs(task.name, task.config))
        if restored is None:
            state, position = init_state(task, self.optimizer), {"epoch": 0, "index": 0}
        else:
            state, position = restored["state"], {k: int(v) for k, v in restored["data"].items()}
            self.prior_wall = float(restored["wall_time"])
        self.it.restore(position)
        self.step, self.scale = int(state.step), _max_abs(state.params)
        self.saved = self.ckpt.steps()[0] if self.ckpt.steps() else None  # what a failure leaves
        self.bar = tqdm(total=self.total, initial=min(self.step, self.total), file=sys.stderr,
                        disable=not (self.progress and self.dp.is_main), dynamic_ncols=True,
                        desc=" ".join(map(str, task.row().values())))
        return self.dp.replicate(state)

    def wall(self) -> float:
        return round(self.prior_wall + time.perf_counter() - self.t_start, 2)

    def advance(self, state: TrainState) -> TrainState:
        """One training step; its metrics row, evaluation and checkpoint when they are due. The
        state passed in is donated (its buffers are reused): use the one returned."""
        task, where = self.task, f"training step {self.step + 1}"
        batch = self.dp.shard_batch(*task.prepare(next(self.it), self.step))
        with self.failed.catch(where, self.scale, self.saved):
            state, metrics, scale = self.train_step(state, batch)
            loss = float(metrics["loss"])  # waits for the step: a failure is named with its step number
        if not np.isfinite(loss):
            raise self.failed.error(where, f"the training loss became {loss}", self.scale, self.saved)
        self.step, self.scale = self.step + 1, float(scale)
        self.bar.update(1)
        if self.step % task.config.log_every == 0 or self.step == self.total:
            self.bar.set_postfix(loss=f"{loss:.4g}")
            self.pending.append({**task.row(), "kind": "train", "step": self.step,
                                 "epoch": self.step / task.steps_per_epoch,
                                 **{k: float(v) for k, v in metrics.items()}, "wall_time": self.wall()})
        is_eval = self.step == self.total or (task.eval_every and self.step % task.eval_every == 0)
        if is_eval:
            self.last_eval = self.evaluate(state)
            self.pending.append({**task.row(), "kind": "eval", "step": self.step,
                                 "epoch": self.step // task.steps_per_epoch, **self.last_eval,
                                 "wall_time": self.wall()})
            if self.dp.is_main and self.progress:
                self.bar.write(task.describe(self.step, self.last_eval))
        if is_eval or self.step % task.config.checkpoint_every == 0:
            if not np.isfinite(self.scale):  # never save parameters that cannot be resumed
                raise self.failed.error(where, "the parameters became NaN or inf", self.scale, self.saved)
            self.save(state)
        return state

    def evaluate(self, state: TrainState) -> dict:
        with self.failed.catch(f"the evaluation after step {self.step}", self.scale, self.saved):
            return evaluate(self.task, self.eval_step, state.params, state.extra, self.dp)

    def save(self, state: TrainState) -> None:
        """The run's record (``config.json`` first: a run that fails before its first save records
        nothing), the pending metrics rows, then the checkpoint of this step."""
        record = self.workdir / "config.json"
        first = not record.exists() and not self.ckpt.steps()
        had_metrics = self.metrics_path.exists()
        failed = None
        try:
            if self.dp.is_main:
                _write_json(record, {"task": self.task.name, "config": to_dict(self.task.config)})
                append_rows(self.metrics_path, self.pending)
            self.pending = []
            self.ckpt.save(self.step, _saved(state, self.it.state(), self.wall()))
        except (CheckpointError, OSError) as e:
            failed = e if isinstance(e, CheckpointError) else CheckpointError(
                f"cannot write the run's record in {self.workdir}: {e.strerror or e}")
            if first and self.dp.is_main:  # nothing to resume: leave the workdir as the command found it
                record.unlink(missing_ok=True)
                if not had_metrics:
                    self.metrics_path.unlink(missing_ok=True)
        # process 0 alone writes: every process must learn that it failed, or the others would wait
        # in the next step's collectives for a process that has gone
        if _any_process(failed is not None):
            raise failed or CheckpointError(f"process 0 could not save step {self.step} in {self.workdir} "
                                            "(its own error line says why)")
        self.saved = self.step

    def finish(self, state: TrainState) -> dict:
        """The summary (written to ``summary.json``); a finished run resumed is evaluated once more."""
        self.bar.close()
        if self.last_eval is None:
            self.last_eval = self.evaluate(state)
        task = self.task
        summary = {**task.row(), "steps": self.step, "finished": self.step >= self.total, **self.last_eval,
                   "wall_time_s": self.wall(),
                   "num_params": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
                   "train_examples": int(task.train.images.shape[0]),
                   "test_examples": int(task.test.images.shape[0]),
                   "num_devices": self.dp.num_devices, "num_processes": jax.process_count()}
        if self.dp.is_main:
            _write_json(self.workdir / "summary.json", summary)
        return summary


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _max_abs(tree) -> float:
    """The largest ``|value|`` over the floating leaves of ``tree`` (inf or NaN if any is not finite)."""
    out = 0.0
    for leaf in jax.tree.leaves(tree):
        a = host_array(leaf)
        if a.size and np.issubdtype(a.dtype, np.floating):
            m = float(np.max(np.abs(a)))
            out = m if not np.isfinite(m) else max(out, m)
            if not np.isfinite(out):
                return out
    return out


#: a run-time check that failed inside a jitted step, as JAX reports it: the library's own
#: (``ncode_jax.solve: …``) or, failing that, one of diffrax/equinox (e.g. the backsolve
#: adjoint's backward solve running out of ``max_steps``)
_LIBRARY_MESSAGE = re.compile(r"ncode_jax\.\w+: [^\n]*")
_EQUINOX_MESSAGE = re.compile(r"EquinoxRuntimeError: ([^\n]*)")


def library_message(e: BaseException) -> str | None:
    """The message of the run-time check that ``e`` reports, or None."""
    if found := _LIBRARY_MESSAGE.search(str(e)):
        return found.group(0)
    if found := _EQUINOX_MESSAGE.search(str(e)):
        return "diffrax: " + found.group(1).strip()
    return None


class TrainingFailed(UserError):
    """A training step or evaluation failed at run time: one ``error:`` line (exit code 2) with the
    step, what failed and its likely cause; no checkpoint is written for the failed step."""


class StepFailure:
    """Turns a failure inside a jitted training step or evaluation into :class:`TrainingFailed`.

    The likely cause: parameters that grew over 100x their largest initial magnitude, or became
    non-finite -> the learning rate; else the solver's step budget (the message names
    ``max_steps``) -> that config key; otherwise the library's own message names it."""

    def __init__(self, task: Task, workdir: Path, *, init_scale: Callable[[], float]):
        self.task, self.workdir, self._init_scale, self.init_scale = task, workdir, init_scale, None

    @contextlib.contextmanager
    def catch(self, where: str, scale: float, saved: int | None):
        """Inside: a library check that fails (or XLA running out of memory) becomes
        :class:`TrainingFailed` naming ``where``; ``scale`` is the largest ``|value|`` of the
        parameters that what failed was given."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - JAX re-raises run-time failures as several types
            found = library_message(e)
            if found is None and "RESOURCE_EXHAUSTED" not in str(e):
                raise  # not a failure of the computation's checks: a bug, with its traceback
            what = found if found else ("out of memory: " + str(e).splitlines()[0] +
                                                 " (lower batch_size or the number of steps)")
            raise self.error(where, what, scale, saved) from None

    def error(self, where: str, what: str, scale: float, saved: int | None) -> TrainingFailed:
        """The failure of ``where`` (``what`` failed; the parameters' largest ``|value|`` was
        ``scale``; ``saved``: the step of the intact checkpoint) with its likely cause."""
        cfg = self.task.config
        keys = leaves(type(cfg))
        budget = min((k for k, (path, _) in keys.items() if path[-1] == "max_steps"), key=len, default=None)
        if self.init_scale is None:  # only a failure needs it: the initial parameters, rebuilt
            self.init_scale = self._init_scale()
        what = what.split("; raise it with")[0]  # the library's advice names solve()'s argument
        if not np.isfinite(scale) or scale > 100 * max(self.init_scale, 1e-6):
            lr = f"lr={cfg.lr} " if hasattr(cfg, "lr") else ""
            cause = (f"the parameters blew up (largest |value| {scale:.3g}, {self.init_scale:.3g} at "
                     f"initialisation): the learning rate {lr}is likely too large; lower it")
        elif "max_steps" in what and budget is not None:
            now = cfg
            for part in keys[budget][0]:
                now = getattr(now, part)
            now = "unset: the solve's default" if now is None else now
            cause = (f"the solver's step budget: raise the config value {budget} (now {now}; "
                     f"--set {budget}=N) or loosen the solver's tolerances or step")
        else:
            cause = None
        kept = (f"the checkpoint of step {saved} in {self.workdir} is intact" if saved is not None
                else f"nothing was saved in {self.workdir}")
        cause = "" if cause is None else f"; likely cause: {cause}"
        return TrainingFailed(f"{where} failed: {what.rstrip('.')}{cause}; {kept}")


def evaluate(task: Task, eval_step, params, extra, dp: parallel.DataParallel) -> dict:
    """:meth:`Task.eval_sums` over the whole held-out set in padded, masked batches (padded up to a
    multiple of the device count), divided by the number of examples."""
    n = task.test.images.shape[0]
    size = dp.round_up(min(getattr(task.config, "eval_batch_size", n), n))
    totals, nfes, count = {}, {}, 0
    for b in BatchIterator(task.test, size, seed=0, shuffle=False, drop_remainder=False, num_epochs=1):
        out = eval_step(params, extra, dp.shard_batch(b.images, b.labels, b.mask))
        for k, v in out.items():
            (nfes if k.endswith("nfe") else totals).setdefault(k, []).append(float(v))
        count += int(b.mask.sum())
    means = {k: float(np.mean(v)) for k, v in nfes.items()}
    return {**{k: sum(v) / count for k, v in totals.items()}, **means}


def recorded_runs(workdir: str | os.PathLike, task: str) -> list[tuple[dict, Path]]:
    """``(config, run directory)`` of every run of ``task`` (``"classify"``, ``"autoencode"``, …)
    recorded under ``workdir`` by its ``config.json``, in path order; unreadable records are
    skipped."""
    out = []
    for path in sorted(Path(workdir).glob("**/config.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("task") == task:
            out.append((record.get("config", {}), path.parent))
    return out


def load_run(workdir: str | os.PathLike, **overrides) -> Run:
    """The model, trained parameters and config of a run directory of any training script.

    The run's configuration is its ``config.json`` or, without one, the identity recorded with its
    checkpoint; ``overrides`` replace config values (as ``--set`` would). A checkpoint that does
    not fit the rebuilt model, or was written by another experiment than ``config.json`` records,
    raises :class:`~train.checkpoint.CheckpointError`. ``Run.finished`` is False for a run stopped
    before its last step (readers must refuse or label it)."""
    workdir = Path(workdir)
    path = workdir / "config.json"
    ckpt = Checkpointer(workdir / "checkpoints", write=False)
    try:
        record = json.loads(path.read_text()) if path.is_file() else ckpt.recorded_identity()
    except ValueError:
        record = {}
    if record is None:
        raise UserError(f"{workdir} holds no run (no config.json, and no checkpoint that records its run)")
    if not isinstance(record, dict) or record.get("task") not in TASKS:
        raise UserError(f"{path}: not written by a training script of this version")
    task_cls = importlib.import_module(TASKS[record["task"]], __package__).Task  # train or its installed name
    recorded = build(task_cls.config_class, record["config"])
    task = task_cls(build(task_cls.config_class, record["config"], overrides))
    optimizer = task.optimizer(task.total_steps)
    restored = ckpt.restore(_template(task, optimizer), _differs(record["task"], recorded))
    if restored is None:
        raise UserError(f"{workdir} holds no checkpoint")
    state = restored["state"]
    step = int(state.step)
    return Run(task.model, task.variables(state.params, state.extra), task.config, step,
               step >= task.total_steps, task)


# --- the command line -----------------------------------------------------------------------------


def parse_args(argv, *, doc: str, config_class, default_config: str | None = None,
               default_workdir: str | None = None, training: bool = True) -> argparse.Namespace:
    """``--config`` (``default_config=""``: none), ``--workdir``, ``--set KEY=VALUE``, one
    ``--<key> VALUE`` per config key (a bool key alone means true) and, for ``training``,
    ``--no-progress`` and the multi-host flags."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=False)
    if default_config != "":
        p.add_argument("--config", default=default_config, required=default_config is None,
                       help="a train/configs/*.py file")
    p.add_argument("--workdir", default=default_workdir, required=default_workdir is None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value (repeatable); model may be a comma list or 'all'")
    if training:
        p.add_argument("--no-progress", action="store_true")
        parallel.add_distributed_flags(p)
    g = p.add_argument_group("config keys (each the same as --set KEY=VALUE)")
    for key, (_, typ) in leaves(config_class).items():
        flag = f"--{key.replace('_', '-')}"
        if "." not in key and flag not in p._option_string_actions:
            g.add_argument(flag, dest="overrides", metavar="VALUE", action=_Override, key=key,
                           **({"nargs": "?", "const": "true"} if typ is bool else {}))
    return p.parse_args(argv)


class _Override(argparse.Action):  # --<key> VALUE -> one more "key=VALUE" in namespace.overrides
    def __init__(self, *args, key: str, **kwargs):
        self.key = key
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.overrides = [*namespace.overrides, f"{self.key}={value}"]


def expand(raw: dict, sweep: dict[str, tuple]) -> list[dict]:
    """One raw config per combination of the ``sweep`` keys given as ``all`` or ``a,b`` (``seed``
    is swept by every script: ``seed=0,1,2``; a key with no listed choices has no ``all``)."""
    out = [raw]
    for key, choices in sweep.items():
        value = raw.get(key)
        if not isinstance(value, str) or ("," not in value and value.strip() != "all"):
            continue
        if value.strip() == "all" and not choices:
            raise UserError(f"{key}=all: list the values instead, e.g. {key}=0,1,2")
        values = (list(choices) if value.strip() == "all"
                  else [v.strip() for v in value.split(",") if v.strip()])
        if twice := sorted({v for v in map(str, values) if list(map(str, values)).count(v) > 1}):
            raise UserError(f"--set {key}={value}: names {', '.join(map(repr, twice))} more than once (each "
                            "value is one run, in its own directory)")
        out = [{**r, key: v} for r in out for v in values]
    return out


def run_configs(task_class, configs: list, workdir: str | os.PathLike, *, subdir, table, report=None,
                progress: bool = True) -> list[dict]:
    """Train every config (``workdir / subdir(task)`` each, ``/ seed<k>`` below it when the configs
    hold several seeds; under a lock on ``workdir``), then write ``summary.json``
    (:func:`train.stats.summary`: the runs, each with its ``seed`` and ``run_dir`` relative to
    ``workdir``, per-group mean ± std over seeds and the paired differences of
    ``task_class.compare``), ``results.md`` (``table(runs)``) and call ``report(workdir, tasks,
    summaries, states)`` (``states``: each run's final :class:`TrainState`). Returns the runs'
    summaries."""
    from . import stats

    tasks = [make_task(task_class, c) for c in configs]
    several = len({t.config.seed for t in tasks}) > 1

    def where(t: Task) -> Path:
        return Path(workdir) / subdir(t) / (f"seed{t.config.seed}" if several else "")

    dirs = [where(t).as_posix() for t in tasks]
    if twice := sorted({d for d in dirs if dirs.count(d) > 1}):
        raise UserError(f"several configurations would train in the same directory {twice[0]!r}: "
                        "give each run its own configuration")
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        fitted = [fit(t, where(t), progress=progress) for t in tasks]
    finally:
        if lock is not None:
            lock.release()
    summaries = [{**f.summary, "seed": t.config.seed, "run_dir": where(t).relative_to(workdir).as_posix()}
                 for t, f in zip(tasks, fitted, strict=True)]
    if jax.process_index() == 0:
        keys = list(tasks[0].row()) if tasks else []
        try:
            _write_json(Path(workdir) / "summary.json", stats.summary(summaries, keys, task_class.compare))
        except ValueError as e:  # e.g. the same run listed twice
            raise UserError(str(e)) from None
        (Path(workdir) / "results.md").write_text(table(summaries) + "\n")
        if report is not None:
            report(Path(workdir), tasks, summaries, [f.state for f in fitted])
    return summaries


def train(task_class, config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train one config of ``task_class`` in ``workdir`` (resuming) and return its summary."""
    return train_and_evaluate(make_task(task_class, config), workdir, progress=progress)


def main(argv, *, doc: str, task_class, sweep: dict, subdir, table, report=None, **defaults) -> int:
    """The command line of a training script: parse, validate, :func:`run_configs` every config
    (``sweep`` keys given as ``all`` or a comma list expand), print the table."""
    args = parse_args(argv, doc=doc, config_class=task_class.config_class, **defaults)
    quiet_callback_logs()
    try:
        parallel.initialize_from_args(args)  # before anything else starts JAX's backend
        raw = {**load_config_file(args.config), **parse_overrides(args.overrides)}
        parallel.ensure_cpu_devices(raw.get("num_devices"))  # before the configs touch JAX
        configs = [build(task_class.config_class, r) for r in expand(raw, {**sweep, "seed": ()})]
        summaries = run_configs(task_class, configs, args.workdir, subdir=subdir, table=table, report=report,
                                progress=not args.no_progress)
        if jax.process_index() == 0:
            print(table(summaries) + f"\n\nwrote {args.workdir}/summary.json, results.md and the runs")
    except (UserError, ValueError) as e:
        return error(e, 2)
    except KeyboardInterrupt:
        return error("interrupted: the same command resumes from the last saved checkpoint", 130)
    except Exception as e:  # noqa: BLE001 - out of memory is the user's sizes; anything else, a bug
        if not (isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return error(f"out of memory ({first}): lower the sizes in the configuration (batch, widths, "
                     "examples)", 2)
    return 0


def quiet_callback_logs() -> None:
    """A check that fails inside a jitted step is reported once, as the command's error line: not
    also as the traceback JAX logs for every failed host callback."""
    logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)


def error(e: BaseException, code: int) -> int:
    """Print ``e`` as one ``error: …`` line on stderr; returns ``code``."""
    print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
    return code


def make_task(task_class, config) -> Task:
    """``task_class(config)`` with data and model errors (unknown split, set not prepared, ...)
    reported as :class:`UserError`."""
    try:
        return task_class(config)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise UserError(str(e)) from None
