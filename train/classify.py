"""Image classification with controlled flows (paper sec. 5.2): NODE, ANODE, N-CODE open/closed.

    python -m train.classify --config train/configs/mnist5k_cpu.py --workdir runs/mnist5k \
        [--set model=open] [--set epochs=3 ...]

``model`` may be one name, a comma list or ``all`` (NODE, ANODE, ANODE with N-CODE open's
parameter count ``anode_matched``, N-CODE open and closed); ``seed`` one seed or a comma list
(``--set seed=0,1,2,3,4``). Each (model, seed) trains in ``<workdir>/<model>/`` — in
``<workdir>/<model>/seed<k>/`` when several seeds are given — on :mod:`train.engine` (eval row per
epoch; re-running resumes; random shifts are a pure function of ``(seed, step)``; data-parallel over
``num_devices`` and several processes, see the README). The work directory gets ``summary.json``
(every run, per-model mean ± standard deviation over seeds and per-seed values, paired differences
of held-out accuracy and loss between models with their 95% paired-t intervals: :mod:`train.stats`),
``results.md`` (the same as tables) and ``curves.png`` (held-out accuracy per epoch, mean ± std
over seeds). Models trained on the same seed see the same data order, which is what makes the
differences paired.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

import ncode_jax as nc
from ncode_jax.data.augment import random_shift
from ncode_jax.data.images import KNOWN_DATASETS
from ncode_jax.models.image import IMAGE_KINDS, image_classifier

from . import engine, stats
from .config import Config, SolveConfig, check_choice, check_range
from .labels import FLOW_LABELS


@dataclass(frozen=True)
class ClassifyConfig(Config):
    """One model's training run; every field is validated on construction."""

    RESUMABLE = ("epochs", "log_every", "checkpoint_every", "eval_batch_size", "num_devices", "data_dir")

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
    solve: SolveConfig = SolveConfig(solver="rk4", dt=0.25, rtol=1e-3, atol=1e-5)
    seed: int = 0
    data_dir: str | None = None
    normalize: bool = True
    train_examples: int | None = None  # use only the first N training examples (quick runs)
    log_every: int = 10
    checkpoint_every: int = 50
    kinetic: float = 0.0  # weight of ∫‖f‖² dt in the loss (Finlay et al. 2020; 0 = off)
    jacobian: float = 0.0  # weight of the Hutchinson estimate of ∫‖∂f/∂x‖²_F dt (0 = off)
    num_devices: int | None = None  # data-parallel over this many devices; None: all of them

    def __post_init__(self):
        check_choice("dataset", self.dataset, KNOWN_DATASETS)
        check_choice("model", self.model, IMAGE_KINDS)
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_range(self, ("epochs", "batch_size", "eval_batch_size", "hidden", "log_every",
                           "checkpoint_every", "pool", "num_devices"), minimum=1)
        check_range(self, ("augment", "random_shift", "weight_decay", "warmup_steps", "seed", "kinetic",
                           "jacobian"), minimum=0)
        check_range(self, ("lr",), minimum=0, strict=True)


class Task(engine.Task):
    """Cross-entropy of a linear read-out of ``x(T)``; held-out loss, accuracy and NFE."""

    name, config_class = "classify", ClassifyConfig
    compare = ("test_accuracy", "test_loss")

    def __init__(self, config: ClassifyConfig):
        super().__init__(config)
        self.load(config.dataset, train_examples=config.train_examples, normalize=config.normalize)
        self.model = build_model(config, self.train.image_shape, self.train.num_classes)
        # training adds the flow regularisers as a running cost; evaluation solves without it
        self.cost = nc.regularization(kinetic=config.kinetic, jacobian=config.jacobian)
        self.train_model = dataclasses.replace(self.model, flow=self.model.flow.with_running_cost(self.cost))

    def init(self, key):
        return self.model.init(key), {}

    def prepare(self, batch, step):
        images = batch.images
        if self.config.random_shift:  # a pure function of (seed, step): a resume replays it
            images = random_shift(images, self.config.random_shift,
                                  np.random.default_rng((self.config.seed, step)))
        return images, batch.labels

    def optimizer(self, total_steps):
        return make_optimizer(self.config, total_steps)

    def _per_example(self, model, params, images, labels, **extra):
        """Cross-entropy and correctness of each example ``(N,)``, and the flow's solution."""
        logits, sol = model(params, images, config=self.config.solve, **extra)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return losses, (jnp.argmax(logits, -1) == labels).astype(losses.dtype), sol

    def loss(self, params, extra, batch, key):
        losses, correct, sol = self._per_example(self.train_model, params, *batch,
                                                 cost_args=nc.regularizer_args(self.cost, key))
        metrics = {"accuracy": jnp.mean(correct), "nfe": sol.stats["nfe"]}
        if self.cost is None:
            return jnp.mean(losses), (metrics, extra)
        reg = jnp.mean(sol.cost)  # the probes come from the step's key fold_in(rng, step): replayed
        return jnp.mean(losses) + reg, ({**metrics, "reg": reg}, extra)

    def eval_sums(self, params, extra, images, labels, mask):
        losses, correct, sol = self._per_example(self.model, params, images, labels)
        return {"test_loss": jnp.sum(losses * mask), "test_accuracy": jnp.sum(correct * mask),
                "test_nfe": sol.stats["nfe"]}

    def describe(self, step, ev):
        return (f"{self.config.model} epoch {step // self.steps_per_epoch}: test accuracy "
                f"{100 * ev['test_accuracy']:.2f}%  nfe {ev['test_nfe']:.0f}")


def build_model(cfg: ClassifyConfig, image_shape, num_classes):
    return image_classifier(cfg.model, tuple(image_shape), num_classes, hidden=cfg.hidden,
                            augment=cfg.augment, gamma_hidden=cfg.gamma_hidden,
                            feedback_hidden=cfg.feedback_hidden, act=cfg.act, pool=cfg.pool)


def make_optimizer(cfg: ClassifyConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam (AdamW with ``weight_decay > 0``) at a constant or warm-up + cosine learning rate."""
    lr = cfg.lr if cfg.lr_schedule == "constant" else optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, min(cfg.warmup_steps, total_steps - 1), max(total_steps, 1))
    return optax.adamw(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0 else optax.adam(lr)


def train_and_evaluate(cfg: ClassifyConfig, workdir: str | Path, *, progress: bool = True) -> dict:
    """Train one model in ``workdir`` (resuming), evaluate every epoch, return the summary."""
    return engine.train(Task, cfg, workdir, progress=progress)


def results_table(summaries: list[dict]) -> str:
    """Per model: held-out accuracy (mean ± std over seeds, per-seed values when several), NFE, mean
    wall time, steps, parameters; then the paired accuracy differences (:mod:`train.stats`)."""
    agg = stats.aggregate(summaries, ["model"])
    several = any(a["n"] > 1 for a in agg)
    header = ["model", "seeds", "held-out accuracy (%)" + (", mean ± std" if several else ""),
              *(["per seed (%)"] if several else []), "NFE (forward, eval)", "wall time (s)" +
              (", mean" if several else ""), "steps", "parameters"]
    rows = [[FLOW_LABELS[a["model"]], a["n"], stats.mean_std(a["test_accuracy"], 100),
             *([stats.per_seed(a["test_accuracy"], 100)] if several else []), f"{a['test_nfe']['mean']:.0f}",
             f"{a['wall_time_s']['mean']:.0f}", f"{a['steps']['mean']:.0f}",
             f"{a['num_params']['mean']:,.0f}"]
            for a in agg]
    table = engine.markdown_table(header, rows)
    pairs = stats.paired(summaries, ["model"], "test_accuracy")
    if pairs:
        table += "\n\n" + stats.paired_table(pairs, lambda g: FLOW_LABELS[g["model"]], scale=100,
                                              unit=", percentage points")
    return table


def report(workdir: Path, tasks, summaries: list[dict], states) -> None:
    from .figures import classification_curves

    runs: dict[str, list[Path]] = {}
    for s in summaries:
        runs.setdefault(s["model"], []).append(workdir / s["run_dir"])
    classification_curves(workdir, runs)


def main(argv=None) -> int:
    return engine.main(argv, doc=__doc__, task_class=Task, sweep={"model": IMAGE_KINDS},
                       subdir=lambda t: t.config.model, table=results_table, report=report)


if __name__ == "__main__":
    sys.exit(main())
