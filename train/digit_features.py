"""Train the digit-feature FID's network (:mod:`ncode_jax.metrics.digit_features`) on the engine.

    python -m train.digit_features --workdir runs/digitfeat [--set dataset=digits]

writes the run and ``extractor.npz``. AdamW, cosine-decayed learning rate, cross-entropy, images
shifted by up to ``random_shift`` pixels (``None``: ``round(min(H, W) / 20)``: 1 on 28×28, 0 on
8×8), a pure function of ``(seed, step)``. ``train.autoencode_eval`` calls :func:`train_extractor`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ncode_jax.data.augment import random_shift
from ncode_jax.data.images import KNOWN_DATASETS
from ncode_jax.metrics.digit_features import DigitFeatureExtractor, init_params, logits

from . import engine
from .config import Config, build, check_choice, check_range


@dataclass(frozen=True)
class DigitFeaturesConfig(Config):
    RESUMABLE = ("log_every", "checkpoint_every", "eval_batch_size", "num_devices", "data_dir")

    dataset: str = "mnist5k"
    train_split: str = "train"
    test_split: str = "test"
    data_dir: str | None = None
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    feature_dim: int = 128
    random_shift: int | None = None
    log_every: int = 50
    checkpoint_every: int = 500
    num_devices: int | None = None

    def __post_init__(self):
        check_choice("dataset", self.dataset, KNOWN_DATASETS)
        check_range(self, ("epochs", "batch_size", "eval_batch_size", "feature_dim", "log_every",
                           "checkpoint_every", "num_devices"), minimum=1)
        check_range(self, ("seed", "weight_decay", "random_shift"), minimum=0)
        check_range(self, ("lr",), minimum=0, strict=True)


class Task(engine.Task):
    name, config_class, model = "digit_features", DigitFeaturesConfig, DigitFeatureExtractor

    def __init__(self, config: DigitFeaturesConfig):
        super().__init__(config)
        c = config
        self.load(c.dataset, (c.train_split, c.test_split))
        train, test = self.train, self.test
        if train.num_classes < 2:
            raise ValueError(f"dataset {c.dataset!r} has {train.num_classes} class(es); need >= 2")
        self.train = train._replace(images=train.pixels01(), normalized=False)
        self.test = test._replace(images=test.pixels01(), normalized=False)
        ch = train.image_shape[2]
        self.mean = tuple(float(m) for m in train.mean) * (ch if len(train.mean) == 1 else 1)
        self.std = tuple(float(s) for s in train.std) * (ch if len(train.std) == 1 else 1)
        self.shift = round(min(train.image_shape[:2]) / 20) if c.random_shift is None else c.random_shift
        self.num_classes = int(train.num_classes)

    def row(self):
        return {"model": "digit_features", "dataset": self.config.dataset}

    def init(self, key):
        c = self.config
        params = init_params(c.seed, tuple(self.train.image_shape), self.num_classes, c.feature_dim)
        return jax.tree.map(jnp.asarray, params), {}

    def prepare(self, batch, step):
        rng = np.random.default_rng((self.config.seed, step))
        return random_shift(batch.images, self.shift, rng), batch.labels

    def optimizer(self, total_steps):
        schedule = optax.cosine_decay_schedule(self.config.lr, max(total_steps, 1))
        return optax.adamw(schedule, weight_decay=self.config.weight_decay)

    def _logits(self, params, images):
        return logits(params, images, jnp.asarray(self.mean), jnp.asarray(self.std))

    def loss(self, params, extra, batch, key):
        out = self._logits(params, batch[0])
        loss = optax.softmax_cross_entropy_with_integer_labels(out, batch[1]).mean()
        return loss, ({"accuracy": jnp.mean(jnp.argmax(out, -1) == batch[1])}, extra)

    def eval_sums(self, params, extra, images, labels, mask):
        out = self._logits(params, images)
        losses = optax.softmax_cross_entropy_with_integer_labels(out, labels)
        return {"test_loss": jnp.sum(losses * mask),
                "test_accuracy": jnp.sum((jnp.argmax(out, -1) == labels) * mask)}

    def variables(self, params, extra, info=None) -> DigitFeatureExtractor:
        return DigitFeatureExtractor(params=jax.tree.map(np.asarray, params),
                                     image_shape=tuple(self.train.image_shape), num_classes=self.num_classes,
                                     mean=self.mean, std=self.std, info=info or {})


def train_extractor(workdir: str | Path, dataset: str = "mnist5k", *, progress: bool = False,
                    **overrides) -> DigitFeatureExtractor:
    """Train (or resume, or just load when finished) the extractor in ``workdir``; ``overrides``
    are :class:`DigitFeaturesConfig` keys."""
    task = engine.make_task(Task, build(DigitFeaturesConfig, {"dataset": dataset, **overrides}))
    summary, state = engine.fit(task, workdir, progress=progress)
    info = {**engine.to_dict(task.config), **task.row(), "split": task.config.train_split,
            "num_train": summary["train_examples"], "random_shift": task.shift, "steps": summary["steps"],
            "test_accuracy": summary["test_accuracy"], "train_seconds": summary["wall_time_s"]}
    return task.variables(state.params, state.extra, info=info)


def report(workdir: Path, tasks, summaries, states) -> None:
    task, s, state = tasks[0], summaries[0], states[0]
    task.variables(state.params, state.extra, info=s).save(workdir / "extractor.npz")


def main(argv=None) -> int:
    return engine.main(argv, doc=__doc__, task_class=Task, sweep={}, subdir=lambda t: ".", report=report,
                       table=lambda s: engine.markdown_table(["held-out accuracy", "steps", "time (s)"], [[
                           f"{s[0]['test_accuracy']:.4f}", s[0]["steps"], s[0]["wall_time_s"]]]),
                       default_config=str(Path(__file__).parent / "configs" / "digit_features.py"))


if __name__ == "__main__":
    sys.exit(main())
