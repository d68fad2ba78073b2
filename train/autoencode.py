"""Autoencoders with a controlled latent flow (paper sec. 5.3): AutoN-CODE, vanilla AE and VAE.

    python -m train.autoencode --config train/configs/autoencode_mnist5k_cpu.py --workdir runs/ae5k \
        [--set model=ncode] [--set epochs=3 ...]

``model`` may be one name (``ae``, ``vae``, ``ncode``), a comma list or ``all``; so may
``latent_norm`` (``false,true``), ``controls_per_row`` (``1,2``) and ``seed`` (``0,1,2``). Each run
trains in ``<workdir>/<model>[_norm][_c<k>]/`` (``/seed<k>/`` below it when several seeds are
given) on the engine of :mod:`train.engine` (the same files, resume and
multi-device flags as ``train.classify``) with the same encoder, decoder, data order and budget;
the work directory gets ``summary.json`` and ``results.md`` (mean ± standard deviation over seeds,
per-seed values, paired MSE differences with 95% intervals: :mod:`train.stats`). The VAE's noise key is
``fold_in(key(seed), step)``, so a resumed run equals an uninterrupted one. Batch normalisation
needs nothing special under data parallelism: its statistics are ``jnp.mean`` over the global
(sharded) batch inside the jitted step (``tests/test_parallel.py`` checks them).
Generation, FID and figures: ``python -m train.autoencode_eval --workdir <workdir>``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import optax

import ncode_jax as nc
from ncode_jax.data.images import KNOWN_DATASETS
from ncode_jax.models.autoencoder import LIKELIHOODS, MODEL_KINDS, autoencoder
from ncode_jax.models.coders import ARCHITECTURES, architecture

from . import engine, stats
from .config import Config, SolveConfig, check_choice, check_range
from .labels import AUTOENCODER_LABELS


@dataclass(frozen=True)
class AutoencodeConfig(Config):
    """One model's training run; every field is validated on construction."""

    RESUMABLE = ("epochs", "log_every", "checkpoint_every", "eval_batch_size", "num_devices", "data_dir")

    dataset: str = "mnist5k"
    model: str = "ncode"
    coders: str = "mnist"  # a preset of ncode_jax.models.coders.ARCHITECTURES
    latent_dim: int | None = None  # None: the preset's
    widths: tuple[int, ...] | None = None  # None: the preset's
    kernel: int | None = None  # None: the preset's
    likelihood: str = "bernoulli"
    epochs: int = 20
    batch_size: int = 64
    eval_batch_size: int = 500
    lr: float = 1e-3
    # "plateau": the paper's schedule (sec. 5.3), the learning rate halved whenever the epoch-mean
    # training loss has not improved by a relative 1e-4 for plateau_patience epochs
    # (optax.contrib.reduce_on_plateau; the patience and threshold are not in the paper)
    lr_schedule: str = "constant"
    plateau_patience: int = 2
    # AutoN-CODE: batch-normalise the code x(t1) at the decoder input (any model; NOT in the paper)
    latent_norm: bool = False
    # AutoN-CODE: non-zeros per row of A(θ), so n·controls_per_row controls (2: the text's "two
    # elements of each row", the VAE's parameter count, 50 on MNIST; 1: table A.1's FC_25, diagonal A)
    controls_per_row: int = 2
    solve: SolveConfig = SolveConfig(solver="rk4", dt=0.5, rtol=1e-4, atol=1e-6, t1=10.0)
    control_scale: float = 0.1
    kinetic: float = 0.0  # AutoN-CODE: weight of ∫‖f‖² dt in the loss (Finlay et al. 2020; 0 = off)
    jacobian: float = 0.0  # AutoN-CODE: weight of the Hutchinson estimate of ∫‖∂f/∂x‖²_F dt
    seed: int = 0
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    train_examples: int | None = None  # use only the first N training examples (quick runs)
    log_every: int = 20
    checkpoint_every: int = 200
    num_devices: int | None = None  # data-parallel over this many devices; None: all of them

    def __post_init__(self):
        for name, known in {"dataset": KNOWN_DATASETS, "model": MODEL_KINDS, "coders": ARCHITECTURES,
                            "likelihood": LIKELIHOODS}.items():
            check_choice(name, getattr(self, name), known)
        check_choice("lr_schedule", self.lr_schedule, ("constant", "plateau"))
        check_range(self, ("epochs", "batch_size", "eval_batch_size", "log_every", "checkpoint_every",
                           "latent_dim", "kernel", "num_devices", "plateau_patience", "controls_per_row"),
                    minimum=1)
        if self.model != "ncode" and self.controls_per_row != 2:
            raise ValueError(f"controls_per_row={self.controls_per_row} applies to AutoN-CODE only, not to "
                             f"model={self.model}")
        check_range(self, ("lr", "control_scale"), minimum=0, strict=True)
        check_range(self, ("seed", "kinetic", "jacobian"), minimum=0)
        if self.model == "ncode" and self.solve.t0 != 0:
            raise ValueError(f"t0={self.solve.t0}: the AutoN-CODE latent flow starts at t0 = 0 "
                             "(set t1 instead)")


class Task(engine.Task):
    """The model's loss (reconstruction + the VAE's KL); held-out reconstruction MSE and NFE."""

    name, config_class = "autoencode", AutoencodeConfig
    compare = ("test_mse",)

    def __init__(self, config: AutoencodeConfig):
        super().__init__(config)
        c = config
        self.load(c.dataset, (c.train_split, c.test_split), c.train_examples)
        arch = architecture(c.coders, latent_dim=c.latent_dim, widths=c.widths, kernel=c.kernel)
        if c.model == "ncode" and c.controls_per_row > arch.latent_dim:
            raise ValueError(f"controls_per_row={c.controls_per_row} exceeds the latent size "
                             f"{arch.latent_dim}")
        self.model = autoencoder(c.model, arch, tuple(self.train.image_shape), likelihood=c.likelihood,
                                 control_scale=c.control_scale, latent_norm=c.latent_norm,
                                 offsets=tuple(range(c.controls_per_row)), solve=c.solve)
        # training adds the flow regularisers as a running cost; evaluation solves without it
        cost = nc.regularization(kinetic=c.kinetic, jacobian=c.jacobian)
        self.train_model = dataclasses.replace(self.model, running_cost=cost)

    def init(self, key):
        variables = self.model.init(key)
        return variables["params"], variables["batch_stats"]

    def prepare(self, batch, step):
        return (batch.images,)

    def optimizer(self, total_steps):
        return make_optimizer(self.config, self.steps_per_epoch)

    def row(self):
        c = self.config
        return {"model": c.model, "latent_norm": c.latent_norm, "controls_per_row": c.controls_per_row}

    def loss(self, params, extra, batch, key):
        return self.train_model.loss({"params": params, "batch_stats": extra}, batch[0], train=True, key=key)

    def eval_sums(self, params, extra, images, labels, mask):
        out, _ = self.model.apply(self.variables(params, extra), images, train=False)
        sq = jnp.mean(((self.model.output_images(out.recon) - images) ** 2).reshape(images.shape[0], -1), -1)
        return {"test_mse": jnp.sum(sq * mask),
                "test_nfe": out.solution.stats["nfe"] if out.solution is not None else jnp.zeros(())}

    def variables(self, params, extra):
        return {"params": params, "batch_stats": extra}

    def describe(self, step, ev):
        return (f"{self.config.model} epoch {step // self.steps_per_epoch}: held-out reconstruction MSE "
                f"{ev['test_mse']:.5f}")


def make_optimizer(cfg: AutoencodeConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam at ``cfg.lr``; with ``lr_schedule="plateau"`` its updates scaled by
    ``optax.contrib.reduce_on_plateau`` (factor 0.5, the paper's halving; the training loss averaged
    over ``steps_per_epoch`` steps, i.e. per epoch; ``plateau_patience`` epochs; relative threshold
    1e-4, PyTorch's ``ReduceLROnPlateau`` default). The engine passes each step's loss as ``value``."""
    adam = optax.adam(cfg.lr)
    if cfg.lr_schedule == "constant":
        return adam
    return optax.chain(adam, optax.contrib.reduce_on_plateau(
        factor=0.5, patience=cfg.plateau_patience, rtol=1e-4, accumulation_size=max(steps_per_epoch, 1)))


def label(row: dict) -> str:
    """Display name of a run: the model, ``+ latent norm`` and the control count when not 2 per row."""
    out = AUTOENCODER_LABELS[row["model"]]
    k = row.get("controls_per_row", 2)
    if k != 2:
        out += " (diagonal A: n controls)" if k == 1 else f" ({k} controls per row)"
    return out + (" + latent norm" if row.get("latent_norm") else "")


def subdir(task: Task) -> str:
    """``<model>``, ``_norm`` with latent normalisation, ``_c<k>`` for k controls per row (k != 2)."""
    c = task.config
    per_row = f"_c{c.controls_per_row}" if c.controls_per_row != 2 else ""
    return c.model + ("_norm" if c.latent_norm else "") + per_row


def train_and_evaluate(cfg: AutoencodeConfig, workdir: str | Path, *, progress: bool = True) -> dict:
    """Train one model in ``workdir`` (resuming), evaluate every epoch, return the summary."""
    return engine.train(Task, cfg, workdir, progress=progress)


KEYS = ["model", "latent_norm", "controls_per_row"]


def results_table(summaries: list[dict]) -> str:
    """Per model variant: held-out MSE (mean ± std over seeds, per-seed values when several),
    parameters, steps, mean wall time; then the paired MSE differences (:mod:`train.stats`)."""
    agg = stats.aggregate(summaries, KEYS)
    several = any(a["n"] > 1 for a in agg)
    header = ["model", "seeds", "held-out reconstruction MSE" + (", mean ± std" if several else ""),
              *(["per seed"] if several else []), "parameters", "steps", "wall time (s)"]
    rows = [[label(a), a["n"], stats.mean_std(a["test_mse"], digits=5),
             *([stats.per_seed(a["test_mse"], digits=5)] if several else []),
             f"{a['num_params']['mean']:,.0f}",
             f"{a['steps']['mean']:.0f}", f"{a['wall_time_s']['mean']:.0f}"] for a in agg]
    table = engine.markdown_table(header, rows)
    pairs = stats.paired(summaries, KEYS, "test_mse")
    if pairs:
        table += "\n\n" + stats.paired_table(pairs, label, digits=5)
    return table


def main(argv=None) -> int:
    return engine.main(argv, doc=__doc__, task_class=Task,
                       sweep={"model": MODEL_KINDS, "latent_norm": (False, True), "controls_per_row": ()},
                       subdir=subdir, table=results_table)


if __name__ == "__main__":
    sys.exit(main())
