"""Figures of the training scripts, drawn from what they write to a workdir (so they can be
redrawn without retraining): the toy flows (figs. 1, 3, 4 from ``*_eval.npz`` and
``*/metrics.jsonl``), the classification curves, and the autoencoders' orbits, samples,
interpolations and t-SNE (figs. 8, A.2, A.7, A.8)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .engine import read_metrics  # noqa: E402
from .labels import FLOW_LABELS as LABELS  # noqa: E402


def save(fig, out: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


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
    return save(fig, workdir / "reflection_trajectories.png")


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
    return save(fig, workdir / "annuli_flows.png")


def training_curves(workdir: Path) -> Path:
    """Fig. 4 right: training loss of every model, one panel per problem (the mean over seeds at
    each step when a model has several, ``<problem>_<model>/seed<k>/``)."""
    paths = sorted([*workdir.glob("*_*/metrics.jsonl"), *workdir.glob("*_*/seed*/metrics.jsonl")])
    rows = [r for path in paths for r in read_metrics(path) if r.get("kind") == "train"]
    problems = sorted({r["problem"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(problems)), figsize=(5 * max(1, len(problems)), 3.5),
                             squeeze=False)
    for ax, p in zip(axes[0], problems):
        for m in LABELS:
            by_step: dict[int, list[float]] = {}
            for r in rows:
                if r["problem"] == p and r["model"] == m:
                    by_step.setdefault(r["step"], []).append(r["loss"])
            if by_step:
                s, loss = zip(*sorted((k, float(np.mean(v))) for k, v in by_step.items()))
                ax.semilogy(s, loss, label=LABELS[m])
        ax.set_title(f"{p}: training loss ({'MSE' if p == 'reflection' else 'cross-entropy'})")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return save(fig, workdir / "training_curves.png")


def classification_curves(workdir: Path, runs: dict[str, list[Path]]) -> Path:
    """Held-out accuracy and NFE per epoch, model -> its run directories (one per seed): the mean
    over seeds with a band and error bars of ± one standard deviation (sample std) when a model has
    several seeds. Epochs some seeds have not reached (unfinished runs) use the seeds that have."""
    fig, (ax_acc, ax_nfe) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, dirs in runs.items():
        per_seed = [{r["epoch"]: r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "eval"}
                    for d in dirs]
        epochs = sorted(set().union(*per_seed))
        n = len(dirs)
        label = LABELS[m] + (f" ({n} seeds)" if n > 1 else "")
        for ax, key, scale in ((ax_acc, "test_accuracy", 100), (ax_nfe, "test_nfe", 1)):
            vals = [[scale * rows[e][key] for rows in per_seed if e in rows] for e in epochs]
            mean = np.array([np.mean(v) for v in vals])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals])
            line = ax.errorbar(epochs, mean, yerr=std if n > 1 else None, fmt="o-", ms=3, capsize=2,
                               label=label)
            if n > 1:
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=line[0].get_color())
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="held-out accuracy (mean ± std over seeds)")
    ax_nfe.set(xlabel="epoch", ylabel="NFE per forward solve", title="function evaluations")
    ax_acc.legend(fontsize=8)
    return save(fig, workdir / "curves.png")


def make_figures(workdir: str | Path, runs: list[tuple[str, str]]) -> list[Path]:
    workdir = Path(workdir)
    out = []
    for problem, draw in (("reflection", reflection_trajectories), ("annuli", annuli_flows)):
        models = [m for p, m in runs if p == problem]
        if models:
            out.append(draw(workdir, models))
    out.append(training_curves(workdir))
    return out


def grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``(rows·cols, h, w, c)`` → one ``(rows·(h+1), cols·(w+1), c)`` mosaic with 1-px gaps."""
    n, h, w, c = images.shape
    out = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
    for i in range(min(n, rows * cols)):
        r, q = divmod(i, cols)
        out[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = images[i]
    return out


def show(ax, img: np.ndarray) -> None:
    img = np.clip(img, 0, 1)
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_orbit(ts: np.ndarray, decoded: np.ndarray, images: np.ndarray, out: Path) -> Path:
    """Decoded ``x(t)`` (``decoded``: ``(T, B, h, w, c)`` at times ``ts``) for each image (rows),
    the input image in the last column (figs. 8 and A.2)."""
    tiles = np.concatenate([np.asarray(decoded).transpose(1, 0, 2, 3, 4), images[:, None]], axis=1)
    b, steps = images.shape[0], len(ts)
    fig, ax = plt.subplots(figsize=(0.7 * (steps + 1), 0.7 * b + 0.5))
    show(ax, grid(tiles.reshape(-1, *images.shape[1:]), b, steps + 1))
    h = images.shape[2] + 1
    ax.set_xticks([h * i + h / 2 - 1 for i in range(steps + 1)])
    ax.set_xticklabels([f"{float(t):g}" for t in ts] + ["truth"], fontsize=7)
    ax.set_xlabel("t (decoded latent state x(t); last column: input image)")
    ax.set_title("AutoN-CODE: reconstructions along the controlled orbit")
    return save(fig, out)


def plot_rows(title: str, rows: dict[str, np.ndarray], out: Path, cols: int = 12) -> Path:
    """One labelled row of images per entry of ``rows`` (label → ``(n, h, w, c)``), ``cols`` each."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.75 * cols + 1.0, 0.85 * len(rows) + 0.4),
                             squeeze=False)
    for ax, (name, imgs) in zip(axes[:, 0], rows.items()):
        show(ax, grid(imgs[:cols], 1, cols))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_title(title)
    return save(fig, out)


def plot_tsne(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], out: Path) -> Path:
    """``panels``: label → (2-D embedding, GMM-10 component, class label)."""
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7.6), squeeze=False)
    for j, (name, (emb, comp, labels)) in enumerate(panels.items()):
        for i, (colour, what) in enumerate([(comp, "10-component GMM"), (labels, "digit label")]):
            ax = axes[i, j]
            ax.scatter(emb[:, 0], emb[:, 1], c=colour, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
            ax.set_title(f"{name}: coloured by {what}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("t-SNE of held-out latent codes (fig. A.7)")
    return save(fig, out)
