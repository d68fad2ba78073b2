"""The one run engine under every training script: train state, loop, workdir, CLI.

A task (:class:`Task`) supplies its model, data, loss and evaluation; :func:`train_and_evaluate`
does the rest for all of them:

* **train state** ``{params, extra (e.g. batch statistics), opt_state, step, data (epoch, index),
  rng, wall_time}``; step keys ``fold_in(key(seed), step)`` and a data order that is a pure
  function of ``(seed, epoch)`` make a resumed run bit-identical to an uninterrupted one;
* **loop** — jitted, data-parallel train step; metrics every ``log_every`` steps; evaluation
  every ``task.eval_every`` steps and at the end; checkpoints every ``checkpoint_every`` steps and
  after each evaluation; a progress bar;
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
import importlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from ncode_jax.data.images import BatchIterator, load_dataset

from . import parallel
from .checkpoint import Checkpointer, CheckpointError, WorkdirLock, host_array
from .config import UserError, build, leaves, load_config_file, parse_overrides, to_dict

#: run-record name -> module defining ``Task`` (for :func:`load_run`)
TASKS = {"toy": "train.toy", "classify": "train.classify", "autoencode": "train.autoencode",
         "digit_features": "train.digit_features"}


class Task:
    """What a training task supplies; the engine does everything else.

    Subclasses set ``name`` (a key of :data:`TASKS`), ``config_class`` and, in ``__init__``,
    ``self.config``, ``self.model``, ``self.train`` and ``self.test`` (datasets with ``images``
    and ``labels`` arrays), and define :meth:`init`, :meth:`loss` and :meth:`eval_sums`."""

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


def _template(task: Task, optimizer) -> dict:
    key = jax.random.key(task.config.seed)
    params, extra = task.init(key)
    return {"params": params, "extra": extra, "opt_state": optimizer.init(params),
            "step": np.asarray(0), "data": {"epoch": np.asarray(0), "index": np.asarray(0)},
            "rng": np.asarray(jax.random.key_data(key)), "wall_time": np.asarray(0.0)}


def train_and_evaluate(task: Task, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train ``task`` in ``workdir`` (resuming from its checkpoint), evaluate, return the summary."""
    workdir = Path(workdir)
    dp = parallel.DataParallel.create(getattr(task.config, "num_devices", None))
    try:
        dp.check_batch(task.config.batch_size, "batch_size")
    except ValueError as e:
        raise UserError(str(e)) from None
    lock = WorkdirLock(workdir) if dp.is_main else None
    try:
        return _run(task, workdir, dp, progress)
    finally:
        if lock is not None:
            lock.release()


def _run(task: Task, workdir: Path, dp: parallel.DataParallel, progress: bool) -> dict:
    t_start = time.perf_counter()
    cfg = task.config
    check_recorded_config(workdir, task)
    total = task.total_steps
    optimizer = task.optimizer(total)
    ckpt = Checkpointer(workdir / "checkpoints", write=dp.is_main, identity=_identity(task))
    state = ckpt.restore(template := _template(task, optimizer), _differs(task.name, task.config)) or template
    step, prior_wall = int(state["step"]), float(state["wall_time"])
    it = task.batches()
    it.restore({"epoch": int(state["data"]["epoch"]), "index": int(state["data"]["index"])})
    params, extra, opt_state = dp.replicate((state["params"], state["extra"], state["opt_state"]))
    rng = jax.random.wrap_key_data(np.asarray(state["rng"]))

    train_step = dp.jit(make_step(task, optimizer, rng), batch_argnums=(4,))
    eval_step = dp.jit(lambda p, e, batch: task.eval_sums(p, e, *batch), batch_argnums=(2,))
    metrics_path, pending, last_eval = workdir / "metrics.jsonl", [], None

    def wall() -> float:
        return round(prior_wall + time.perf_counter() - t_start, 2)

    def save() -> None:  # config.json first: a run that fails before its first save records nothing
        nonlocal pending
        record = workdir / "config.json"
        first = not record.exists() and not ckpt.steps()
        had_metrics = metrics_path.exists()
        failed = None
        try:
            if dp.is_main:
                _write_json(record, {"task": task.name, "config": to_dict(cfg)})
                append_rows(metrics_path, pending)
            pending = []
            _save_checkpoint(it.state())
        except (CheckpointError, OSError) as e:
            failed = e if isinstance(e, CheckpointError) else CheckpointError(
                f"cannot write the run's record in {workdir}: {e.strerror or e}")
            if first and dp.is_main:  # nothing to resume: leave the workdir as the command found it
                record.unlink(missing_ok=True)
                if not had_metrics:
                    metrics_path.unlink(missing_ok=True)
        # process 0 alone writes: every process must learn that it failed, or the others would wait
        # in the next step's collectives for a process that has gone
        if _any_process(failed is not None):
            raise failed or CheckpointError(f"process 0 could not save step {step} in {workdir} "
                                            "(its own error line says why)")

    def _save_checkpoint(st) -> None:
        ckpt.save(step, {"params": params, "extra": extra, "opt_state": opt_state, "step": np.asarray(step),
                         "data": {"epoch": np.asarray(st["epoch"]), "index": np.asarray(st["index"])},
                         "rng": state["rng"], "wall_time": np.asarray(wall())})

    bar = tqdm(total=total, initial=min(step, total), disable=not (progress and dp.is_main),
               desc=" ".join(map(str, task.row().values())), file=sys.stderr, dynamic_ncols=True)
    saved = ckpt.steps()[0] if ckpt.steps() else None  # what a failure leaves to resume from
    failed = StepFailure(task, workdir, init_scale=_max_abs(template["params"]))
    while step < total:
        batch = dp.shard_batch(*task.prepare(next(it), step))
        with failed.catch(f"training step {step + 1}", params, saved):
            out = train_step(params, extra, opt_state, step, batch)
            value = float(out[3])  # waits for the step: a failure is named with its step number
        if not np.isfinite(value):
            raise failed.error(f"training step {step + 1}", f"the training loss became {value}", params,
                               saved)
        params, extra, opt_state, loss, metrics = out
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            loss, metrics = value, {k: float(v) for k, v in metrics.items()}
            bar.set_postfix(loss=f"{loss:.4g}")
            pending.append({**task.row(), "kind": "train", "step": step,
                            "epoch": step / task.steps_per_epoch, "loss": loss, **metrics,
                            "wall_time": wall()})
        is_eval = step == total or (task.eval_every and step % task.eval_every == 0)
        if is_eval:
            with failed.catch(f"the evaluation after step {step}", params, saved):
                last_eval = evaluate(task, eval_step, params, extra, dp)
            pending.append({**task.row(), "kind": "eval", "step": step,
                            "epoch": step // task.steps_per_epoch, **last_eval, "wall_time": wall()})
            if dp.is_main and progress:
                bar.write(task.describe(step, last_eval))
        if is_eval or step % cfg.checkpoint_every == 0:
            if not np.isfinite(_max_abs(params)):  # never save parameters that cannot be resumed
                raise failed.error(f"training step {step}", "the parameters became NaN or inf", params, saved)
            save()
            saved = step
    bar.close()
    if last_eval is None:  # a finished run resumed: evaluate its final parameters once more
        with failed.catch(f"the evaluation after step {step}", params, saved):
            last_eval = evaluate(task, eval_step, params, extra, dp)
    summary = {**task.row(), "steps": step, "finished": step >= total, **last_eval, "wall_time_s": wall(),
               "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
               "train_examples": int(task.train.images.shape[0]),
               "test_examples": int(task.test.images.shape[0]),
               "num_devices": dp.num_devices, "num_processes": jax.process_count()}
    if dp.is_main:
        _write_json(workdir / "summary.json", summary)
    task.trained = (params, extra)  # for reports drawn right after training (figures)
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

    def __init__(self, task: Task, workdir: Path, *, init_scale: float):
        self.task, self.workdir, self.init_scale = task, workdir, init_scale

    @contextlib.contextmanager
    def catch(self, where: str, params, saved: int | None):
        """Inside: a library check that fails (or XLA running out of memory) becomes
        :class:`TrainingFailed` naming ``where``; ``params`` are the inputs of what failed."""
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
            raise self.error(where, what, params, saved) from None

    def error(self, where: str, what: str, params, saved: int | None) -> TrainingFailed:
        cfg = self.task.config
        keys = leaves(type(cfg))
        budget = min((k for k, (path, _) in keys.items() if path[-1] == "max_steps"), key=len, default=None)
        scale = _max_abs(params)
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


def make_step(task: Task, optimizer, rng):
    """The train step ``(params, extra, opt_state, step, batch) -> (params, extra, opt_state, loss,
    metrics)`` (not jitted) with the step's key ``fold_in(rng, step)``."""

    def step_fn(params, extra, opt_state, step, batch):
        grad_fn = jax.value_and_grad(task.loss, has_aux=True)
        (loss, (metrics, extra)), grads = grad_fn(params, extra, batch, jax.random.fold_in(rng, step))
        # value: the loss, for transformations that read it (optax.contrib.reduce_on_plateau)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), extra, opt_state, loss, metrics

    return step_fn


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
    task_cls = importlib.import_module(TASKS[record["task"]]).Task
    recorded = build(task_cls.config_class, record["config"])
    task = task_cls(build(task_cls.config_class, record["config"], overrides))
    optimizer = task.optimizer(task.total_steps)
    state = ckpt.restore(_template(task, optimizer), _differs(record["task"], recorded))
    if state is None:
        raise UserError(f"{workdir} holds no checkpoint")
    step = int(state["step"])
    return Run(task.model, task.variables(state["params"], state["extra"]), task.config, step,
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
    ``task_class.compare``), ``results.md`` (``table(runs)``) and call ``report``. Returns the runs'
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
        summaries = [{**train_and_evaluate(t, where(t), progress=progress), "seed": t.config.seed,
                      "run_dir": where(t).relative_to(workdir).as_posix()} for t in tasks]
    finally:
        if lock is not None:
            lock.release()
    if jax.process_index() == 0:
        keys = list(tasks[0].row()) if tasks else []
        try:
            _write_json(Path(workdir) / "summary.json", stats.summary(summaries, keys, task_class.compare))
        except ValueError as e:  # e.g. the same run listed twice
            raise UserError(str(e)) from None
        (Path(workdir) / "results.md").write_text(table(summaries) + "\n")
        if report is not None:
            report(Path(workdir), tasks, summaries)
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
