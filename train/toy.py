"""Toy flows of the paper's section 5.1: reflection ``x ↦ -x`` and concentric annuli.

Trains NODE, ANODE, N-CODE open loop and N-CODE closed loop on both problems, prints a results
table and writes to the work directory:

* ``metrics.jsonl`` — one line per logged step (problem, model, step, loss, metric, nfe, time);
* ``summary.json`` and ``results.md`` — final held-out numbers per (problem, model);
* ``reflection_trajectories.png`` (fig. 3), ``annuli_flows.png`` (figs. 1, 4 left),
  ``training_curves.png`` (fig. 4 right);
* ``checkpoints/`` — one per (problem, model), written every ``--checkpoint-every`` steps;
  re-running the same command resumes from them (finished runs are not retrained).

Command (the README's main job; about 3 minutes on 2 CPU cores)::

    python -m train.toy --workdir runs/toy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import ncode_jax as nc
from ncode_jax.data import toy as toy_data
from ncode_jax.models import FlowClassifier
from ncode_jax.solve import ADJOINTS
from ncode_jax.solvers import SOLVERS

from .checkpoint import Checkpointer, check_run_config
from .config import check_choice, check_dt, check_range
from .utils import MetricsWriter, read_jsonl

PROBLEMS = ("reflection", "annuli")
MODELS = ("node", "anode", "open", "closed")
# Settings that may change between a run and its resume: training then continues to the new
# ``steps``; everything else must match the checkpoint.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every")
LABELS = {"node": "NODE", "anode": "ANODE", "open": "N-CODE open", "closed": "N-CODE closed"}


@dataclass(frozen=True)
class ToyConfig:
    """Everything one (problem, model) run depends on. Checkpoints record it."""

    problem: str = "reflection"
    model: str = "open"
    seed: int = 0
    steps: int = 500
    lr: float = 1e-2
    hidden: int = 16  # width of the field f (paper: two-layer MLP, 16 hidden units)
    control_hidden: int = 32  # width of γ and g
    augment: int = 1  # extra zero dimensions for ANODE
    n_train: int = 512
    n_test: int = 1024
    t1: float = 1.0
    solver: str = "tsit5"
    dt: float | None = None
    rtol: float = 1e-3
    atol: float = 1e-6
    adjoint: str = "checkpoint"
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self):
        check_choice("problem", self.problem, PROBLEMS)
        check_choice("model", self.model, MODELS)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("adjoint", self.adjoint, ADJOINTS)
        check_range(self, ("steps", "hidden", "control_hidden", "n_train", "n_test", "log_every",
                           "checkpoint_every", "augment"), minimum=1)  # ANODE needs augment >= 1
        check_range(self, ("lr", "t1"), minimum=0, strict=True)
        check_dt(self.dt, self.t1)

    @property
    def solve_options(self) -> dict:
        return dict(t1=self.t1, solver=self.solver, dt=self.dt, rtol=self.rtol, atol=self.atol,
                    adjoint=self.adjoint)


class ToyTask:
    """Model, data, loss and metric of one (problem, model) pair."""

    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg
        dim = 1 if cfg.problem == "reflection" else 2
        aug = cfg.augment if cfg.model == "anode" else 0
        kind = "anode" if cfg.model == "anode" else cfg.model
        field = nc.MLPField(dim + aug, cfg.hidden)
        hidden = (cfg.control_hidden,)
        self.flow = nc.NCODE.build(kind, field, (dim,), augment=aug, hidden=hidden,
                                   feedback_hidden=hidden)
        self.classifier = FlowClassifier(self.flow, 2) if cfg.problem == "annuli" else None
        k_train, k_test = jax.random.split(jax.random.key(cfg.seed + 1000))
        make = toy_data.reflection if cfg.problem == "reflection" else toy_data.annuli
        self.train = make(k_train, cfg.n_train)
        self.test = make(k_test, cfg.n_test)
        self.metric_name = "mse" if cfg.problem == "reflection" else "accuracy"

    def init(self, key):
        return (self.classifier or self.flow).init(key)

    def predict(self, params, x, **extra):
        """Outputs (x(T) for reflection, logits for annuli) and the solution."""
        opts = {**self.cfg.solve_options, **extra}
        if self.classifier is None:
            sol = self.flow(params, x, **opts)
            return sol.x, sol
        return self.classifier(params, x, **opts)

    def loss_and_metric(self, params, x, y):
        out, sol = self.predict(params, x)
        if self.classifier is None:
            mse = jnp.mean((out - y) ** 2)
            return mse, (mse, sol.stats["nfe"])
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        acc = jnp.mean(jnp.argmax(out, -1) == y)
        return loss, (acc, sol.stats["nfe"])


def _run_name(cfg: ToyConfig) -> str:
    return f"{cfg.problem}_{cfg.model}"


def train_one(cfg: ToyConfig, workdir: Path, *, progress: bool = True) -> dict:
    """Train one (problem, model) pair, resuming from its checkpoint; returns its summary."""
    task = ToyTask(cfg)
    name = _run_name(cfg)
    check_run_config(workdir / "checkpoints" / f"{name}.config.json", dataclasses.asdict(cfg),
                     ignore=RESUMABLE_CHANGES)
    ckpt = Checkpointer(workdir / "checkpoints" / name)
    metrics = MetricsWriter(workdir / "metrics.jsonl")
    opt = optax.adam(cfg.lr)

    params = task.init(jax.random.key(cfg.seed))
    state = {"params": params, "opt_state": opt.init(params), "step": np.asarray(0),
             "train_time": np.asarray(0.0)}
    restored = ckpt.restore(state)
    state = state if restored is None else restored
    start = int(state["step"])
    _drop_metrics_after(workdir / "metrics.jsonl", name, start)

    @jax.jit
    def train_step(params, opt_state):
        (loss, (metric, nfe)), grads = jax.value_and_grad(task.loss_and_metric, has_aux=True)(
            params, *task.train
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metric, nfe

    params, opt_state = state["params"], state["opt_state"]
    train_time = float(state["train_time"])
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{name:18s}",
               disable=not progress, leave=True, file=sys.stderr, dynamic_ncols=True)
    t_last = time.perf_counter()
    for step in bar:
        params, opt_state, loss, metric, nfe = train_step(params, opt_state)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss, metric, nfe = float(loss), float(metric), int(nfe)
            if not np.isfinite(loss):
                raise FloatingPointError(f"{name}: training loss became {loss} at step {done}")
            now = time.perf_counter()
            train_time += now - t_last
            t_last = now
            bar.set_postfix(loss=f"{loss:.4g}", **{task.metric_name: f"{metric:.4g}"}, nfe=nfe)
            metrics.write(problem=cfg.problem, model=cfg.model, step=done, loss=loss,
                          **{f"train_{task.metric_name}": metric}, nfe=nfe,
                          train_time=round(train_time, 3))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            ckpt.save(done, {"params": params, "opt_state": opt_state, "step": np.asarray(done),
                             "train_time": np.asarray(train_time)})
    bar.close()
    ckpt.close()

    eval_fn = jax.jit(task.loss_and_metric)
    test_loss, (test_metric, test_nfe) = eval_fn(params, *task.test)
    summary = {
        "problem": cfg.problem, "model": cfg.model, "steps": max(start, cfg.steps),
        "test_loss": float(test_loss), f"test_{task.metric_name}": float(test_metric),
        "nfe": int(test_nfe), "train_time_s": round(train_time, 2),
        "solver": cfg.solver, "adjoint": cfg.adjoint,
    }
    np.savez(workdir / f"{name}_eval.npz", **_evaluation_arrays(task, params))
    return summary


def _evaluation_arrays(task: ToyTask, params) -> dict[str, np.ndarray]:
    """Trajectories and decision maps used by the figures."""
    ts = jnp.linspace(0.0, task.cfg.t1, 41)
    if task.cfg.problem == "reflection":
        x0 = jnp.linspace(-1.0, 1.0, 41)[:, None]
        _, sol = task.predict(params, x0, ts=ts)
        return {"ts": np.asarray(ts), "x0": np.asarray(x0), "xs": np.asarray(sol.x)}
    x0, y = task.test[0][:300], task.test[1][:300]
    _, sol = task.predict(params, x0, ts=ts)
    g = jnp.linspace(-2.0, 2.0, 101)
    grid = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
    logits, _ = task.predict(params, grid)
    prob = jax.nn.softmax(logits, -1)[:, 1].reshape(101, 101)
    return {"ts": np.asarray(ts), "x0": np.asarray(x0), "y": np.asarray(y),
            "xs": np.asarray(sol.x), "grid": np.asarray(g), "prob": np.asarray(prob)}


def _drop_metrics_after(path: Path, name: str, step: int) -> None:
    """On resume, forget metric lines of this run logged after the checkpoint we resume from."""
    rows = read_jsonl(path)
    keep = [r for r in rows if f"{r.get('problem')}_{r.get('model')}" != name or r["step"] <= step]
    if len(keep) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def results_table(summaries: list[dict]) -> str:
    lines = ["| problem | model | held-out metric | NFE (forward) | train time (s, incl. compile) "
             "| steps |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        metric = (f"MSE {s['test_mse']:.2e}" if s["problem"] == "reflection"
                  else f"accuracy {100 * s['test_accuracy']:.1f}%")
        lines.append(f"| {s['problem']} | {LABELS[s['model']]} | {metric} | {s['nfe']} | "
                     f"{s['train_time_s']:.1f} | {s['steps']} |")
    return "\n".join(lines)


def train_and_evaluate(configs: list[ToyConfig], workdir: str | Path, *, progress: bool = True,
                       figures: bool = True) -> list[dict]:
    """Train every config (resuming), write summary.json, results.md and the figures."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summaries = [train_one(cfg, workdir, progress=progress) for cfg in configs]
    (workdir / "summary.json").write_text(json.dumps(summaries, indent=2))
    table = results_table(summaries)
    (workdir / "results.md").write_text(table + "\n")
    if figures:
        from .toy_figures import make_figures

        make_figures(workdir, [(s["problem"], s["model"]) for s in summaries])
    return summaries


def parse_args(argv=None) -> argparse.Namespace:
    d = ToyConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="runs/toy")
    p.add_argument("--problem", choices=(*PROBLEMS, "all"), default="all")
    p.add_argument("--model", choices=(*MODELS, "all"), default="all")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--control-hidden", type=int, default=d.control_hidden)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-test", type=int, default=d.n_test)
    p.add_argument("--t1", type=float, default=d.t1)
    p.add_argument("--solver", choices=sorted(SOLVERS), default=d.solver)
    p.add_argument("--dt", type=float, default=None, help="fixed step size (default: adaptive)")
    p.add_argument("--rtol", type=float, default=d.rtol)
    p.add_argument("--atol", type=float, default=d.atol)
    p.add_argument("--adjoint", choices=ADJOINTS, default=d.adjoint)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--no-figures", action="store_true")
    return p.parse_args(argv)


def configs_from_args(args: argparse.Namespace) -> list[ToyConfig]:
    problems = PROBLEMS if args.problem == "all" else (args.problem,)
    models = MODELS if args.model == "all" else (args.model,)
    common = dict(seed=args.seed, steps=args.steps, lr=args.lr, hidden=args.hidden,
                  control_hidden=args.control_hidden, n_train=args.n_train, n_test=args.n_test,
                  t1=args.t1, solver=args.solver, dt=args.dt, rtol=args.rtol, atol=args.atol,
                  adjoint=args.adjoint, log_every=args.log_every,
                  checkpoint_every=args.checkpoint_every)
    return [ToyConfig(problem=p, model=m, **common) for p in problems for m in models]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        configs = configs_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summaries = train_and_evaluate(configs, args.workdir, progress=not args.no_progress,
                                   figures=not args.no_figures)
    print(results_table(summaries))
    print(f"\nwrote {args.workdir}/summary.json, metrics.jsonl, results.md"
          + ("" if args.no_figures else " and figures"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
