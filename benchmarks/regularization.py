"""Do flow regularisers buy fewer function evaluations? Toy N-CODE training with and without them.

Trains the N-CODE open-loop model (2-layer MLP field, 16 hidden units; γ with 32) on the paper's
toy problems (sec. 5.1: ``annuli`` classification and ``reflection`` regression, data from
``ncode_jax.data.toy``), full batch, Adam, an adaptive solver, the same seed and data for every
run, once without a regulariser and once per (regulariser, weight):
``kinetic_energy(w)`` (∫‖f‖² dt) and ``jacobian_frobenius(w)`` (Hutchinson estimate of
∫‖∂f/∂x‖²_F dt, one Rademacher probe per sample, probe seed from (seed, step)), Finlay et al. 2020.
The loss is ``task loss + mean(sol.cost)``.

Recorded per training step: forward NFE (``stats["nfe"]``), backward NFE (evaluations of the
augmented field during the backward pass, counted by a host callback in a zero running-cost term
that every run carries, baseline included), task loss and regulariser value. At the end: held-out
metric (accuracy / MSE) and held-out forward NFE of the *plain* model (no cost channel: the NFE a
user of the trained model pays), training wall time (excluding the first step's compilation) and
the load average.

    python -m benchmarks.regularization [--steps 200] [--problems annuli reflection]
        [--solver dopri5] [--adjoint backsolve] [--weights 0.01 0.1] [--tag ...]
    python -m benchmarks.regularization --from-runs W1 W2 ... --tag _mnist5k   # classify runs

Writes ``benchmarks/results/regularization<tag>.json`` and ``.png`` (NFE vs training step).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ncode_jax as nc
from ncode_jax.data import toy as toy_data
from ncode_jax.models import FlowClassifier

from .common import RESULTS, count_evaluation, counted, write_results


@dataclass(frozen=True)
class EvalCounter:
    """A running cost that is 0 and counts evaluations of the augmented field (host callback)."""

    def __call__(self, t, x, theta, cost_args):
        count_evaluation(x)
        return jnp.zeros((x.shape[0],), x.dtype)


def make_cost(reg: str, weight: float):
    if reg == "none":
        return nc.combine(EvalCounter())
    term = nc.kinetic_energy(weight) if reg == "kinetic" else nc.jacobian_frobenius(weight)
    return nc.combine(EvalCounter(), term)


class Problem:
    def __init__(self, name: str, seed: int, n_train: int, n_test: int, hidden: int, control_hidden: int):
        self.name = name
        dim = 1 if name == "reflection" else 2
        self.field = nc.MLPField(dim, hidden)
        self.data_shape = (dim,)
        self.control_hidden = control_hidden
        k_train, k_test = jax.random.split(jax.random.key(seed + 1000))
        make = toy_data.reflection if name == "reflection" else toy_data.annuli
        self.train = make(k_train, n_train)
        self.test = make(k_test, n_test)
        self.metric = "mse" if name == "reflection" else "accuracy"

    def model(self, cost):
        flow = nc.NCODE.build("open", self.field, self.data_shape, hidden=(self.control_hidden,),
                              running_cost=cost)
        return flow if self.name == "reflection" else FlowClassifier(flow, 2)

    def outputs(self, model, params, x, **kw):
        if isinstance(model, FlowClassifier):
            return model(params, x, **kw)
        sol = model(params, x, **kw)
        return sol.x, sol

    def task_loss(self, out, y):
        if self.name == "reflection":
            mse = jnp.mean((out - y) ** 2)
            return mse, mse
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return loss, jnp.mean(jnp.argmax(out, -1) == y)


def train_run(problem: Problem, reg: str, weight: float, args) -> dict:
    cost = make_cost(reg, weight)
    model = problem.model(cost)
    plain = problem.model(None)
    solve_kw = dict(t1=args.t1, solver=args.solver, rtol=args.rtol, atol=args.atol, adjoint=args.adjoint)
    params = model.init(jax.random.key(args.seed))
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)
    x, y = problem.train

    def loss_fn(p, cargs):
        out, sol = problem.outputs(model, p, x, cost_args=cargs, **solve_kw)
        task, metric = problem.task_loss(out, y)
        reg_value = jnp.mean(sol.cost)
        return task + reg_value, (task, reg_value, metric, sol.stats["nfe"])

    @jax.jit
    def step(p, s, step_index):
        key = jax.random.fold_in(jax.random.key(args.seed), step_index)  # replayable probes
        cargs = nc.regularizer_args(cost, key)
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, cargs)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, aux

    rows = []
    t_compile = time.perf_counter()
    train_s = 0.0
    for i in range(args.steps):
        t = time.perf_counter()
        (params, opt_state, loss, (task, reg_value, metric, nfe)), total = counted(
            step, params, opt_state, jnp.asarray(i))
        dt = time.perf_counter() - t
        if i == 0:
            compile_s = time.perf_counter() - t_compile
        else:
            train_s += dt
        rows.append({"step": i + 1, "loss": float(loss), "task": float(task), "reg": float(reg_value),
                     "train_metric": float(metric), "nfe_fwd": int(nfe), "nfe_bwd": total - int(nfe)})
        if not np.isfinite(float(loss)):
            break

    @jax.jit
    def evaluate(p, xt, yt):
        out, sol = problem.outputs(plain, p, xt, t1=args.t1, solver=args.solver, rtol=args.rtol,
                                   atol=args.atol)
        _, metric = problem.task_loss(out, yt)
        return metric, sol.stats["nfe"]

    test_metric, test_nfe = evaluate(params, *problem.test)
    last = rows[-min(len(rows), args.tail):]
    return {
        "problem": problem.name, "reg": reg, "weight": weight, "steps": len(rows),
        f"test_{problem.metric}": float(test_metric), "test_nfe_fwd": int(test_nfe),
        "final_task_loss": rows[-1]["task"], "final_reg": rows[-1]["reg"],
        "mean_nfe_fwd": float(np.mean([r["nfe_fwd"] for r in rows])),
        "mean_nfe_bwd": float(np.mean([r["nfe_bwd"] for r in rows])),
        "tail_nfe_fwd": float(np.mean([r["nfe_fwd"] for r in last])),
        "tail_nfe_bwd": float(np.mean([r["nfe_bwd"] for r in last])),
        "total_nfe": int(sum(r["nfe_fwd"] + r["nfe_bwd"] for r in rows)),
        "compile_s": round(compile_s, 2), "train_s": round(train_s, 2),
        "loadavg_end": list(os.getloadavg()), "curve": rows,
    }


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in results})
    fig, axes = plt.subplots(2, len(problems), figsize=(6.2 * len(problems), 7.6), squeeze=False,
                             sharex=True)
    styles = {"none": ("k", "-"), "kinetic": ("tab:blue", None), "jacobian": ("tab:red", None)}
    for col, prob in enumerate(problems):
        rs = [r for r in results if r["problem"] == prob]
        weights = sorted({r["weight"] for r in rs if r["reg"] != "none"})
        dashes = dict(zip(weights, ["--", "-", ":", "-."]))
        for r in rs:
            color, ls = styles[r["reg"]]
            ls = ls or dashes[r["weight"]]
            steps = [c["step"] for c in r["curve"]]
            label = "none" if r["reg"] == "none" else f"{r['reg']} {r['weight']:g}"
            metric = r.get("test_accuracy", r.get("test_mse"))
            mname = "acc" if "test_accuracy" in r else "MSE"
            label += f" (held-out {mname} {metric:.3g}, NFE {r['test_nfe_fwd']})"
            for row, key in ((0, "nfe_fwd"), (1, "nfe_bwd")):
                vals = np.asarray([c[key] for c in r["curve"]], float)
                k = 5
                smooth = np.convolve(vals, np.ones(k) / k, mode="valid") if len(vals) > k else vals
                axes[row, col].plot(steps[len(steps) - len(smooth):], smooth, color=color, ls=ls, lw=1.4,
                                    label=label)
        axes[0, col].set_title(f"{prob}")
        axes[0, col].set_ylabel("forward NFE per step (5-step mean)")
        axes[1, col].set_ylabel("backward NFE per step (5-step mean)")
        axes[1, col].set_xlabel("training step")
        axes[0, col].legend(fontsize=7)
        for a in axes[:, col]:
            a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_step_nfe(run_dir) -> tuple[int, int]:
    """(forward, backward) field evaluations of one training step of a finished
    ``train.classify`` run at its final parameters, on its first training batch: the run's loss
    plus a zero running cost that counts evaluations (host callback), as :func:`train_run` does."""
    import dataclasses

    from train.engine import load_run

    run = load_run(run_dir, num_devices=None)
    task = run.task  # its own loss, with the counter added to its running cost
    task.cost = nc.combine(EvalCounter(), task.cost) if task.cost is not None else nc.combine(EvalCounter())
    task.train_model = dataclasses.replace(task.model, flow=task.model.flow.with_running_cost(task.cost))
    batch = task.prepare(next(task.batches()), run.step)
    key = jax.random.fold_in(jax.random.key(task.config.seed), run.step)

    def loss(p):
        value, (metrics, _) = task.loss(p, {}, batch, key)
        return value, metrics["nfe"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    jax.block_until_ready(step(run.params))  # compile (and a first count, discarded)
    ((_, nfe), _), total = counted(step, run.params)
    return int(nfe), total - int(nfe)


def plot_runs(workdirs: list[str], path) -> list[dict]:
    """Forward NFE per training step and held-out accuracy of ``train.classify`` runs (one
    ``<workdir>/<model>/`` each; labelled by their ``kinetic``/``jacobian`` weights), from their
    ``metrics.jsonl``: the figure for runs too long for this script (``mnist5k_cpu``); and the
    forward/backward NFE of one step at the final parameters (:func:`final_step_nfe`)."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.engine import read_metrics

    fig, (ax_nfe, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    rows = []
    for wd in workdirs:
        (run,) = [d for d in Path(wd).iterdir() if (d / "config.json").exists()]
        cfg = json.loads((run / "config.json").read_text())["config"]
        summary = json.loads((run / "summary.json").read_text())
        metrics = read_metrics(run / "metrics.jsonl")
        train = [r for r in metrics if r["kind"] == "train"]
        evals = [r for r in metrics if r["kind"] == "eval"]
        label = ", ".join(f"{k} {cfg[k]:g}" for k in ("kinetic", "jacobian") if cfg.get(k)) or "none"
        ax_nfe.plot([r["step"] for r in train], [r["nfe"] for r in train], lw=1.2,
                    label=f"{label} (held-out NFE {summary['test_nfe']:.0f})")
        ax_acc.plot([r["step"] for r in evals], [100 * r["test_accuracy"] for r in evals], "o-",
                    label=f"{label} ({100 * summary['test_accuracy']:.1f}%, {summary['wall_time_s']:.0f} s)")
        fwd, bwd = final_step_nfe(run)
        rows.append({"workdir": wd, "regulariser": label, "test_accuracy": summary["test_accuracy"],
                     "test_nfe": summary["test_nfe"], "wall_time_s": summary["wall_time_s"],
                     "mean_train_nfe": float(np.mean([r["nfe"] for r in train])), "steps": summary["steps"],
                     "final_step_nfe_fwd": fwd, "final_step_nfe_bwd": bwd})
    ax_nfe.set(xlabel="training step", ylabel="forward NFE (logged steps)",
               title="forward NFE per training step")
    ax_acc.set(xlabel="training step", ylabel="held-out accuracy (%)", title="held-out accuracy")
    for a in (ax_nfe, ax_acc):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-runs", nargs="+", metavar="WORKDIR",
                   help="only draw NFE vs step of finished train.classify runs (e.g. mnist5k_cpu with "
                        "--set kinetic=...) into regularization<tag>.png")
    p.add_argument("--problems", nargs="+", default=["annuli", "reflection"],
                   choices=["annuli", "reflection"])
    p.add_argument("--regs", nargs="+", default=["none", "kinetic", "jacobian"],
                   choices=["none", "kinetic", "jacobian"])
    p.add_argument("--weights", nargs="+", type=float, default=[0.01, 0.1])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--control-hidden", type=int, default=32)
    p.add_argument("--t1", type=float, default=1.0)
    p.add_argument("--solver", default="dopri5", choices=["dopri5", "tsit5", "bosh3"])
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--adjoint", default="backsolve", choices=["backsolve", "checkpoint"])
    p.add_argument("--tail", type=int, default=20, help="steps averaged for the end-of-training NFE")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.from_runs:
        png = RESULTS / f"regularization{args.tag}.png"
        rows = plot_runs(args.from_runs, png)
        out = write_results(f"regularization{args.tag}", {"runs": rows})
        for r in rows:
            print(r)
        print(f"wrote {out} and {png}")
        return
    load_start = os.getloadavg()
    results = []
    for prob_name in args.problems:
        problem = Problem(prob_name, args.seed, args.n_train, args.n_test, args.hidden, args.control_hidden)
        cases = [("none", 0.0)] if "none" in args.regs else []
        cases += [(r, w) for r in args.regs if r != "none" for w in args.weights]
        for reg, w in cases:
            r = train_run(problem, reg, w, args)
            results.append(r)
            metric = r.get("test_accuracy", r.get("test_mse"))
            print(f"{prob_name:10s} {reg:8s} w={w:<5g} held-out {problem.metric} {metric:.4g} "
                  f"(NFE {r['test_nfe_fwd']})  train NFE fwd/bwd mean {r['mean_nfe_fwd']:.1f}/"
                  f"{r['mean_nfe_bwd']:.1f}, last {args.tail}: {r['tail_nfe_fwd']:.1f}/"
                  f"{r['tail_nfe_bwd']:.1f}  "
                  f"task {r['final_task_loss']:.4g} reg {r['final_reg']:.4g}  train {r['train_s']:.1f} s "
                  f"(compile {r['compile_s']:.1f} s, load {r['loadavg_end'][0]:.1f})", flush=True)
    settings = dict(vars(args))
    settings["model"] = "N-CODE open loop, MLPField(dim, hidden), gamma MLP (control_hidden,), full batch"
    settings["loadavg_1_5_15_start_end"] = [list(load_start), list(os.getloadavg())]
    settings["nfe_notes"] = (
        "nfe_fwd: stats['nfe'] of the training forward solve; nfe_bwd: evaluations of the augmented "
        "field h=(f, ℓ) in the backward pass (host-callback count in value_and_grad minus nfe_fwd). "
        "Every training run carries the cost channel c (the baseline with ℓ=0), so the step-size "
        "norm sees the same state layout; test_nfe_fwd is the plain model (no cost channel) on the "
        "held-out set. A Jacobian-regularised evaluation also costs one JVP of f (not counted as "
        "an NFE).")
    name = "regularization" + args.tag
    out = write_results(name, {"settings": settings, "runs": results})
    png = RESULTS / f"{name}.png"
    plot(results, png, f"toy N-CODE open loop, {args.solver} rtol={args.rtol:g} atol={args.atol:g}, "
         f"{args.adjoint} adjoint, Adam lr={args.lr:g}, seed {args.seed}, {args.steps} full-batch steps")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
