"""Toy flows of the paper's section 5.1: reflection ``x ↦ -x`` and concentric annuli.

    python -m train.toy --workdir runs/toy [--problem annuli] [--model open] [--set steps=100 ...]

Trains NODE, ANODE, N-CODE open and closed loop on both problems (full batch; about 3.5 minutes on
2 CPU cores) on :mod:`train.engine`: one run per ``<problem>_<model>/`` (re-running resumes), and
in the work directory ``summary.json``, ``results.md``, ``<problem>_<model>_eval.npz`` and the
figures ``reflection_trajectories.png`` (fig. 3), ``annuli_flows.png`` (figs. 1, 4 left) and
``training_curves.png`` (fig. 4 right).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ncode_jax as nc
from ncode_jax.data import BatchIterator
from ncode_jax.data.toy import toy_split
from ncode_jax.models import FlowClassifier

from . import engine, stats
from .config import Config, SolveConfig, check_choice, check_range
from .labels import FLOW_LABELS

PROBLEMS = ("reflection", "annuli")
MODELS = ("node", "anode", "open", "closed")


@dataclass(frozen=True)
class ToyConfig(Config):
    """Everything one (problem, model) run depends on."""

    RESUMABLE = ("steps", "log_every", "checkpoint_every", "num_devices", "figures")

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
    solve: SolveConfig = SolveConfig(solver="tsit5", rtol=1e-3, atol=1e-6)
    kinetic: float = 0.0  # weight of ∫‖f‖² dt in the loss (Finlay et al. 2020; 0 = off)
    jacobian: float = 0.0  # weight of the Hutchinson estimate of ∫‖∂f/∂x‖²_F dt (0 = off)
    log_every: int = 10
    checkpoint_every: int = 50
    num_devices: int | None = None
    figures: bool = True

    def __post_init__(self):
        check_choice("problem", self.problem, PROBLEMS)
        check_choice("model", self.model, MODELS)
        check_range(self, ("steps", "hidden", "control_hidden", "n_train", "n_test", "log_every",
                           "checkpoint_every", "augment", "num_devices"), minimum=1)
        check_range(self, ("lr",), minimum=0, strict=True)
        check_range(self, ("seed", "kinetic", "jacobian"), minimum=0)

    @property
    def batch_size(self) -> int:
        return self.n_train


class Task(engine.Task):
    """MSE to ``-x`` (reflection) or cross-entropy of a linear read-out (annuli), full batch."""

    name, config_class = "toy", ToyConfig

    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        dim = 1 if cfg.problem == "reflection" else 2
        aug = cfg.augment if cfg.model == "anode" else 0
        hidden = (cfg.control_hidden,)
        self.flow = nc.NCODE.build(cfg.model, nc.MLPField(dim + aug, cfg.hidden), (dim,), augment=aug,
                                   hidden=hidden, feedback_hidden=hidden)
        self.model = FlowClassifier(self.flow, 2) if cfg.problem == "annuli" else self.flow
        # training adds the flow regularisers as a running cost; evaluation solves without it
        self.cost = nc.regularization(kinetic=cfg.kinetic, jacobian=cfg.jacobian)
        reg_flow = self.flow.with_running_cost(self.cost)
        self.train_model = FlowClassifier(reg_flow, 2) if cfg.problem == "annuli" else reg_flow
        k_train, k_test = jax.random.split(jax.random.key(cfg.seed + 1000))
        self.train = toy_split(cfg.problem, k_train, cfg.n_train, "train")
        self.test = toy_split(cfg.problem, k_test, cfg.n_test, "test")
        self.metric = "mse" if cfg.problem == "reflection" else "accuracy"

    @property
    def steps_per_epoch(self) -> int:
        """One full batch per step."""
        return 1

    @property
    def total_steps(self) -> int:
        return self.config.steps

    @property
    def eval_every(self) -> int:
        """Evaluate at the end only."""
        return 0

    def batches(self) -> BatchIterator:
        return BatchIterator(self.train, self.config.n_train, seed=0, shuffle=False)

    def init(self, key):
        return self.model.init(key), {}

    def predict(self, params, x, model=None, **extra):  # (x(T) or logits, solution)
        model = self.model if model is None else model
        if self.config.problem == "reflection":
            sol = model(params, x, config=self.config.solve, **extra)
            return sol.x, sol
        return model(params, x, config=self.config.solve, **extra)

    def _per_sample(self, params, x, y, model=None, **extra):
        out, sol = self.predict(params, x, model, **extra)
        if self.config.problem == "reflection":
            err = jnp.mean((out - y[:, None]) ** 2, axis=-1)
            return err, err, sol
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y)
        return loss, (jnp.argmax(out, -1) == y).astype(jnp.float32), sol

    def loss(self, params, extra, batch, key):
        loss, metric, sol = self._per_sample(params, *batch, self.train_model,
                                             cost_args=nc.regularizer_args(self.cost, key))
        metrics = {self.metric: metric.mean(), "nfe": sol.stats["nfe"]}
        if self.cost is None:
            return loss.mean(), (metrics, extra)
        reg = jnp.mean(sol.cost)  # the probes come from the step's key fold_in(rng, step): replayed
        return loss.mean() + reg, ({**metrics, "reg": reg}, extra)

    def eval_sums(self, params, extra, x, y, mask):
        loss, metric, sol = self._per_sample(params, x, y)
        return {"test_loss": jnp.sum(loss * mask), f"test_{self.metric}": jnp.sum(metric * mask),
                "test_nfe": sol.stats["nfe"]}

    def row(self):
        return {"problem": self.config.problem, "model": self.config.model}


def _evaluation_arrays(task: Task, params) -> dict[str, np.ndarray]:
    """Trajectories and decision maps used by the figures."""
    ts = jnp.linspace(0.0, task.config.solve.t1, 41)
    if task.config.problem == "reflection":
        x0 = jnp.linspace(-1.0, 1.0, 41)[:, None]
        _, sol = task.predict(params, x0, ts=ts)
        return {"ts": np.asarray(ts), "x0": np.asarray(x0), "xs": np.asarray(sol.x)}
    x0, y = task.test.images[:300], task.test.labels[:300]
    _, sol = task.predict(params, x0, ts=ts)
    g = jnp.linspace(-2.0, 2.0, 101)
    logits, _ = task.predict(params, jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2))
    prob = jax.nn.softmax(logits, -1)[:, 1].reshape(101, 101)
    return {"ts": np.asarray(ts), "x0": np.asarray(x0), "y": np.asarray(y),
            "xs": np.asarray(sol.x), "grid": np.asarray(g), "prob": np.asarray(prob)}


def results_table(summaries: list[dict]) -> str:
    """One row per (problem, model): the held-out metric (mean ± std over seeds when several), NFE,
    train time and steps (means over seeds)."""
    agg = stats.aggregate(summaries, ["problem", "model"])
    header = ["problem", "model", "seeds", "held-out metric", "NFE (forward)", "train time (s, with compile)",
              "steps"]

    def metric(a):
        if a["problem"] == "reflection":
            m, s = a["test_mse"]["mean"], a["test_mse"]["std"]
            return f"MSE {m:.2e}" + (f" ± {s:.1e}" if a["n"] > 1 else "")
        return "accuracy " + stats.mean_std(a["test_accuracy"], 100, 1) + "%"

    return engine.markdown_table(header, [
        [a["problem"], FLOW_LABELS[a["model"]], a["n"], metric(a), f"{a['test_nfe']['mean']:.0f}",
         f"{a['wall_time_s']['mean']:.1f}", f"{a['steps']['mean']:.0f}"] for a in agg])


def _name(task: Task) -> str:
    return f"{task.config.problem}_{task.config.model}"


def report(workdir: Path, tasks: list[Task], summaries: list[dict], states: list[engine.TrainState]) -> None:
    """The figures' arrays (of the first seed of each problem and model) and the figures."""
    done = set()
    for task, state in zip(tasks, states, strict=True):
        if _name(task) in done:
            continue
        done.add(_name(task))
        np.savez(workdir / f"{_name(task)}_eval.npz", **_evaluation_arrays(task, state.params))
    if tasks and all(t.config.figures for t in tasks):
        from .figures import make_figures

        make_figures(workdir, [(t.config.problem, t.config.model) for t in tasks])


def train_and_evaluate(configs: list[ToyConfig], workdir: str | Path, *, progress: bool = True) -> list[dict]:
    """Every (problem, model) run in ``workdir / <problem>_<model>``, then the tables and figures."""
    return engine.run_configs(Task, configs, workdir, subdir=_name, table=results_table, report=report,
                              progress=progress)


def main(argv=None) -> int:
    return engine.main(argv, doc=__doc__, task_class=Task, table=results_table, report=report, subdir=_name,
                       sweep={"problem": PROBLEMS, "model": MODELS},
                       default_config=str(Path(__file__).parent / "configs" / "toy.py"),
                       default_workdir="runs/toy")


if __name__ == "__main__":
    sys.exit(main())
