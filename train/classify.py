"""Image classification with controlled flows (paper sec. 5.2): NODE, ANODE, N-CODE open/closed.

    python -m train.classify --config train/configs/mnist5k_cpu.py --workdir runs/mnist5k \
        [--set model=open] [--set epochs=3 ...]

``model`` may be one name, a comma list or ``all``: each model trains in ``<workdir>/<model>/``
and the work directory gets ``summary.json``, ``results.md`` and ``curves.png`` (accuracy and
NFE per epoch for every model). Each model's run writes ``metrics.jsonl``
(train lines every ``log_every`` steps, an eval line per epoch), ``summary.json`` and orbax
checkpoints (params, optimizer state, data position) every ``checkpoint_every`` steps and at
every epoch end. Re-running the same command after a kill resumes from the last checkpoint; the
only randomness, the data order, is a pure function of ``(seed, epoch)`` and is restored with the
data position.

Data-parallel over ``num_devices`` devices (default: all) and over several processes with
``--coordinator-address/--num-processes/--process-id`` (see ``train/parallel.py`` and the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ncode_jax.data.augment import random_shift
from ncode_jax.data.images import KNOWN_DATASETS, BatchIterator, load_dataset
from ncode_jax.models.image import IMAGE_KINDS, image_classifier
from ncode_jax.solve import ADJOINTS
from ncode_jax.solvers import SOLVERS

from . import parallel
from .checkpoint import Checkpointer, check_run_config
from .config import apply_overrides, check_choice, check_dt, check_range, load_config_file
from .utils import MetricsWriter, read_jsonl

LABELS = {"node": "NODE", "anode": "ANODE", "open": "N-CODE open", "closed": "N-CODE closed"}
LR_SCHEDULES = ("constant", "cosine")
RESUMABLE_CHANGES = ("epochs", "log_every", "checkpoint_every", "eval_batch_size", "num_devices")


@dataclass(frozen=True)
class ClassifyConfig:
    """One model's training run; every field is validated on construction."""

    dataset: str = "mnist5k"
    model: str = "open"
    epochs: int = 6
    batch_size: int = 64
    eval_batch_size: int = 250
    lr: float = 3e-3
    lr_schedule: str = "constant"  # or "cosine": linear warm-up, then cosine decay to 0
    warmup_steps: int = 0
    weight_decay: float = 0.0  # decoupled (AdamW) when > 0
    random_shift: int = 0  # train-time augmentation: shift images by up to this many pixels
    pool: int = 1  # average-pool x(T) over pool x pool windows before the linear read-out
    hidden: int = 16
    augment: int = 5
    gamma_hidden: tuple[int, ...] = (10,)
    feedback_hidden: tuple[int, ...] = (10,)
    act: str = "relu"
    t1: float = 1.0
    solver: str = "rk4"
    dt: float | None = 0.25
    rtol: float = 1e-3
    atol: float = 1e-5
    adjoint: str = "checkpoint"
    seed: int = 0
    data_dir: str | None = None
    normalize: bool = True
    train_examples: int | None = None  # use only the first N training examples (quick runs)
    log_every: int = 10
    checkpoint_every: int = 50
    num_devices: int | None = None  # data-parallel over this many devices; None: all of them

    def __post_init__(self):
        check_choice("dataset", self.dataset, KNOWN_DATASETS)
        check_choice("model", self.model, IMAGE_KINDS)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("adjoint", self.adjoint, ADJOINTS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range(self, ("epochs", "batch_size", "eval_batch_size", "hidden", "log_every",
                           "checkpoint_every", "pool"), minimum=1)
        check_range(self, ("augment", "random_shift", "weight_decay", "warmup_steps"), minimum=0)
        check_range(self, ("lr", "t1", "rtol", "atol"), minimum=0, strict=True)
        check_dt(self.dt, self.t1)
        if self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"config value num_devices={self.num_devices} is out of range: must be >= 1 "
                             "(or None for all devices)")
        if self.train_examples is not None and self.train_examples < self.batch_size:
            raise ValueError(f"train_examples={self.train_examples} is smaller than batch_size")

    @classmethod
    def from_dict(cls, config: dict) -> ClassifyConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known keys: {sorted(known)}")
        config = dict(config)
        for key in ("gamma_hidden", "feedback_hidden"):
            if key in config:
                config[key] = tuple(config[key])
        return cls(**config)

    @property
    def solve_options(self) -> dict:
        return dict(t1=self.t1, solver=self.solver, dt=self.dt, rtol=self.rtol, atol=self.atol,
                    adjoint=self.adjoint)


def load_data(cfg: ClassifyConfig):
    train = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, normalize=cfg.normalize)
    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, normalize=cfg.normalize)
    if cfg.train_examples is not None:
        train = train._replace(images=train.images[: cfg.train_examples],
                               labels=train.labels[: cfg.train_examples])
    return train, test


def build_model(cfg: ClassifyConfig, image_shape, num_classes):
    return image_classifier(cfg.model, tuple(image_shape), num_classes, hidden=cfg.hidden,
                            augment=cfg.augment, gamma_hidden=cfg.gamma_hidden,
                            feedback_hidden=cfg.feedback_hidden, act=cfg.act, pool=cfg.pool)


def make_optimizer(cfg: ClassifyConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam (AdamW with ``weight_decay > 0``) at a constant or warm-up + cosine learning rate."""
    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, total_steps - 1),
                                                max(total_steps, 1))
    if cfg.weight_decay > 0:
        return optax.adamw(lr, weight_decay=cfg.weight_decay)
    return optax.adam(lr)


def make_steps(model, cfg: ClassifyConfig, optimizer):
    """The jitted train and eval steps (each compiles once per batch shape)."""

    def loss_fn(params, images, labels):
        logits, sol = model(params, images, **cfg.solve_options)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (jnp.mean(jnp.argmax(logits, -1) == labels), sol.stats["nfe"])

    @jax.jit
    def train_step(params, opt_state, images, labels):
        (loss, (acc, nfe)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc, nfe

    @jax.jit
    def eval_step(params, images, labels, mask):
        logits, sol = model(params, images, **cfg.solve_options)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, -1) == labels
        return jnp.sum(losses * mask), jnp.sum(correct * mask), sol.stats["nfe"]

    return train_step, eval_step


def evaluate(eval_step, params, dataset, batch_size: int, dp: parallel.DataParallel | None = None) -> dict:
    """Masked sums over the whole set; with ``dp`` the batch is padded up to a multiple of the
    device count (padding rows are masked out, so the numbers do not change)."""
    batch_size = min(batch_size, dataset.num_examples)
    if dp is not None:
        batch_size = dp.round_up(batch_size)
    it = BatchIterator(dataset, batch_size, seed=0, shuffle=False, drop_remainder=False, num_epochs=1)
    loss = correct = count = 0.0
    nfes = []
    for batch in it:
        arrays = (batch.images, batch.labels, batch.mask)
        l_sum, c_sum, nfe = eval_step(params, *(dp.shard_batch(*arrays) if dp is not None else arrays))
        loss += float(l_sum)
        correct += float(c_sum)
        count += float(batch.mask.sum())
        nfes.append(int(nfe))
    return {"test_loss": loss / count, "test_accuracy": correct / count,
            "test_nfe": float(np.mean(nfes))}


def train_and_evaluate(cfg: ClassifyConfig, workdir: str | Path, *, progress: bool = True) -> dict:
    """Train one model (resuming from ``workdir``), evaluate every epoch, return the summary."""
    t_start = time.perf_counter()
    workdir = Path(workdir)
    dp = parallel.DataParallel.create(cfg.num_devices)
    dp.check_batch(cfg.batch_size, "batch_size")
    check_run_config(workdir / "config.json", asdict(cfg), ignore=RESUMABLE_CHANGES, write=dp.is_main)
    train, test = load_data(cfg)
    model = build_model(cfg, train.image_shape, train.num_classes)
    it = BatchIterator(train, cfg.batch_size, seed=cfg.seed, shuffle=True, drop_remainder=True)
    steps_per_epoch = train.num_examples // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(cfg, total_steps)
    train_step, eval_step = make_steps(model, cfg, optimizer)
    train_step = dp.jit(train_step, batch_argnums=(2, 3))
    eval_step = dp.jit(eval_step, batch_argnums=(1, 2, 3))

    params = model.init(jax.random.key(cfg.seed))
    state = {"params": params, "opt_state": optimizer.init(params), "step": np.asarray(0),
             "epoch": np.asarray(0), "index": np.asarray(0), "wall_time": np.asarray(0.0)}
    ckpt = Checkpointer(workdir / "checkpoints")
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored
    step, prior_wall = int(state["step"]), float(state["wall_time"])
    data_state = it.state()
    data_state.update(epoch=int(state["epoch"]), index=int(state["index"]))
    it.restore(data_state)
    params, opt_state = dp.replicate((state["params"], state["opt_state"]))
    metrics = MetricsWriter(workdir / "metrics.jsonl", enabled=dp.is_main)
    if dp.is_main:
        _drop_metrics_after(workdir / "metrics.jsonl", step)

    def wall() -> float:
        return prior_wall + time.perf_counter() - t_start

    def save():
        st = it.state()
        ckpt.save(step, {"params": params, "opt_state": opt_state, "step": np.asarray(step),
                         "epoch": np.asarray(st["epoch"]), "index": np.asarray(st["index"]),
                         "wall_time": np.asarray(wall())})

    bar = tqdm(total=total_steps, initial=min(step, total_steps), disable=not (progress and dp.is_main),
               desc=f"{cfg.dataset}/{cfg.model}", file=sys.stderr, dynamic_ncols=True)
    last_eval = None
    while step < total_steps:
        batch = next(it)
        images = batch.images
        if cfg.random_shift:  # a pure function of (seed, step): resuming replays the same shifts
            images = random_shift(images, cfg.random_shift, np.random.default_rng((cfg.seed, step)))
        params, opt_state, loss, acc, nfe = train_step(params, opt_state,
                                                       *dp.shard_batch(images, batch.labels))
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            loss, acc, nfe = float(loss), float(acc), int(nfe)
            if not np.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step}")
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", nfe=nfe)
            metrics.write(kind="train", model=cfg.model, step=step, epoch=step / steps_per_epoch,
                          loss=loss, accuracy=acc, nfe=nfe, wall_time=round(wall(), 2))
        epoch_end = step % steps_per_epoch == 0
        if epoch_end:
            last_eval = evaluate(eval_step, params, test, cfg.eval_batch_size, dp)
            metrics.write(kind="eval", model=cfg.model, step=step, epoch=step // steps_per_epoch,
                          **last_eval, wall_time=round(wall(), 2))
            if dp.is_main:
                bar.write(f"epoch {step // steps_per_epoch}: test accuracy "
                          f"{100 * last_eval['test_accuracy']:.2f}%  nfe {last_eval['test_nfe']:.0f}")
        if epoch_end or step % cfg.checkpoint_every == 0:
            save()
    bar.close()
    ckpt.close()
    if last_eval is None:  # resumed a finished run: evaluate its final parameters once more
        last_eval = evaluate(eval_step, params, test, cfg.eval_batch_size, dp)
    summary = {"dataset": cfg.dataset, "model": cfg.model, "epochs": cfg.epochs, "steps": step,
               **last_eval, "wall_time_s": round(wall(), 1),
               "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
               "train_examples": train.num_examples, "test_examples": test.num_examples,
               "num_devices": dp.num_devices, "num_processes": dp.num_processes}
    if dp.is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _drop_metrics_after(path: Path, step: int) -> None:
    rows = read_jsonl(path)
    keep = [r for r in rows if r["step"] <= step]
    if len(keep) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def results_table(summaries: list[dict]) -> str:
    lines = ["| model | test accuracy | NFE (forward, eval) | wall time (s) | epochs | parameters |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {LABELS[s['model']]} | {100 * s['test_accuracy']:.2f}% | "
                     f"{s['test_nfe']:.0f} | {s['wall_time_s']:.0f} | {s['epochs']} | "
                     f"{s['num_params']:,} |")
    return "\n".join(lines)


def plot_curves(workdir: Path, models: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_nfe) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m in models:
        rows = [r for r in read_jsonl(workdir / m / "metrics.jsonl") if r["kind"] == "eval"]
        if not rows:
            continue
        ep = [r["epoch"] for r in rows]
        ax_acc.plot(ep, [100 * r["test_accuracy"] for r in rows], "o-", label=LABELS[m])
        ax_nfe.plot(ep, [r["test_nfe"] for r in rows], "o-", label=LABELS[m])
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="held-out accuracy")
    ax_nfe.set(xlabel="epoch", ylabel="NFE per forward solve", title="function evaluations")
    ax_acc.legend()
    fig.tight_layout()
    out = workdir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a train/configs/*.py file")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable); model may be a comma list or 'all'")
    p.add_argument("--no-progress", action="store_true")
    parallel.add_distributed_flags(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        parallel.initialize_from_args(args)  # before anything else starts JAX's backend
        raw = {**asdict(ClassifyConfig()), **load_config_file(args.config)}  # file keys over defaults
        raw = apply_overrides(raw, args.set)
        models = list(IMAGE_KINDS) if raw["model"] == "all" else raw["model"].split(",")
        configs = [ClassifyConfig.from_dict({**raw, "model": m}) for m in models]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    summaries = [train_and_evaluate(cfg, workdir / cfg.model, progress=not args.no_progress)
                 for cfg in configs]
    if jax.process_index() != 0:  # only process 0 writes the reports
        return 0
    (workdir / "summary.json").write_text(json.dumps(summaries, indent=2))
    (workdir / "results.md").write_text(results_table(summaries) + "\n")
    plot_curves(workdir, [c.model for c in configs])
    print(results_table(summaries))
    print(f"\nwrote {workdir}/summary.json, results.md, curves.png and one folder per model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
