"""Figures of the toy experiments, drawn from the ``*_eval.npz`` and ``*/metrics.jsonl`` files
that :mod:`train.toy` writes (so they can be redrawn without retraining)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .engine import read_metrics  # noqa: E402


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


LABELS = {"node": "NODE", "anode": "ANODE", "open": "N-CODE open loop",
          "closed": "N-CODE closed loop"}


def reflection_trajectories(workdir: Path, models: list[str]) -> Path:
    """Fig. 3: x(t) over t for initial points on [-1, 1], one panel per model."""
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.0), squeeze=False)
    cmap = plt.get_cmap("coolwarm")
    for ax, m in zip(axes[0], models):
        d = np.load(workdir / f"reflection_{m}_eval.npz")
        ts, x0, xs = d["ts"], d["x0"][:, 0], d["xs"]  # xs: (T, B, dim)
        for i in range(len(x0)):
            ax.plot(ts, xs[:, i, 0], color=cmap((x0[i] + 1) / 2), lw=1)
        ax.plot([ts[-1]] * 2, [-1, 1], "k:", lw=0.8)
        ax.set_title(LABELS[m], fontsize=10)
        ax.set_xlabel("t")
        ax.set_ylim(-1.6, 1.6)
    axes[0, 0].set_ylabel("x(t)  (target x(T) = -x(0))")
    fig.suptitle("Reflection x ↦ -x: trajectories (colour = x(0))", fontsize=11)
    return _save(fig, workdir / "reflection_trajectories.png")


def annuli_flows(workdir: Path, models: list[str]) -> Path:
    """Figs. 1 and 4: decision map over the input plane (top) and flows x(0) → x(T) (bottom)."""
    fig, axes = plt.subplots(2, len(models), figsize=(3.2 * len(models), 6.4), squeeze=False)
    colors = np.array(["tab:green", "gold"])
    for j, m in enumerate(models):
        d = np.load(workdir / f"annuli_{m}_eval.npz")
        g, prob, x0, y, xs = d["grid"], d["prob"], d["x0"], d["y"], d["xs"]
        ax = axes[0, j]
        ax.contourf(g, g, prob, levels=np.linspace(0, 1, 11), cmap="Blues_r")
        ax.contour(g, g, prob, levels=[0.5], colors="k", linewidths=1)
        ax.scatter(x0[:, 0], x0[:, 1], c=colors[y], s=6, edgecolors="none")
        ax.set_title(LABELS[m], fontsize=10)
        ax.set_aspect("equal")
        ax = axes[1, j]
        for i in range(len(x0)):
            ax.plot(xs[:, i, 0], xs[:, i, 1], color=colors[y[i]], lw=0.4, alpha=0.5)
        ax.scatter(xs[0, :, 0], xs[0, :, 1], c=colors[y], s=5, edgecolors="none")
        ax.scatter(xs[-1, :, 0], xs[-1, :, 1], c="k", s=4, edgecolors="none")
        ax.set_aspect("equal", adjustable="datalim")
        if xs.shape[-1] > 2:
            ax.set_xlabel(f"first two of {xs.shape[-1]} state dims", fontsize=8)
    axes[0, 0].set_ylabel("P(annulus) over the input plane")
    axes[1, 0].set_ylabel("flows: coloured x(0) → black x(T)")
    return _save(fig, workdir / "annuli_flows.png")


def training_curves(workdir: Path) -> Path:
    """Fig. 4 right: training loss of every model, one panel per problem."""
    rows = [r for path in sorted(workdir.glob("*_*/metrics.jsonl")) for r in read_metrics(path)
            if r.get("kind") == "train"]
    problems = sorted({r["problem"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(problems)), figsize=(5 * max(1, len(problems)), 3.5),
                             squeeze=False)
    for ax, p in zip(axes[0], problems):
        for m in LABELS:
            pts = sorted((r["step"], r["loss"]) for r in rows if r["problem"] == p and r["model"] == m)
            if pts:
                s, loss = zip(*pts)
                ax.semilogy(s, loss, label=LABELS[m])
        ax.set_title(f"{p}: training loss ({'MSE' if p == 'reflection' else 'cross-entropy'})")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _save(fig, workdir / "training_curves.png")


def make_figures(workdir: str | Path, runs: list[tuple[str, str]]) -> list[Path]:
    workdir = Path(workdir)
    out = []
    for problem, draw in (("reflection", reflection_trajectories), ("annuli", annuli_flows)):
        models = [m for p, m in runs if p == problem]
        if models:
            out.append(draw(workdir, models))
    out.append(training_curves(workdir))
    return out
