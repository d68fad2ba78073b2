"""Autoencoders with a controlled latent flow (paper sec. 5.3): AutoN-CODE, vanilla AE and VAE.

    python -m train.autoencode --config train/configs/autoencode_mnist5k_cpu.py --workdir runs/ae5k \
        [--set model=ncode] [--set epochs=3 ...]

``model`` may be one name (``ae``, ``vae``, ``ncode``), a comma list or ``all``: each model
trains in ``<workdir>/<model>/`` on the engine of :mod:`train.engine` (the same files, resume and
multi-device flags as ``train.classify``) with the same encoder, decoder, data order and budget;
the work directory gets ``summary.json`` and ``results.md``. The VAE's noise key is
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

import ncode_jax as nc
from ncode_jax.data.images import KNOWN_DATASETS
from ncode_jax.models.autoencoder import LIKELIHOODS, MODEL_KINDS, MODEL_LABELS, autoencoder
from ncode_jax.models.coders import ARCHITECTURES, architecture

from . import engine
from .config import Config, SolveConfig, check_choice, check_range


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
        check_range(self, ("epochs", "batch_size", "eval_batch_size", "log_every", "checkpoint_every",
                           "latent_dim", "kernel", "num_devices"), minimum=1)
        check_range(self, ("lr", "control_scale"), minimum=0, strict=True)
        check_range(self, ("seed", "kinetic", "jacobian"), minimum=0)
        if self.model == "ncode" and self.solve.t0 != 0:
            raise ValueError(f"t0={self.solve.t0}: the AutoN-CODE latent flow starts at t0 = 0 "
                             "(set t1 instead)")


class Task(engine.Task):
    """The model's loss (reconstruction + the VAE's KL); held-out reconstruction MSE and NFE."""

    name, config_class = "autoencode", AutoencodeConfig

    def __init__(self, config: AutoencodeConfig):
        super().__init__(config)
        c = config
        self.load(c.dataset, (c.train_split, c.test_split), c.train_examples)
        arch = architecture(c.coders, latent_dim=c.latent_dim, widths=c.widths, kernel=c.kernel)
        solve = {k: v for k, v in c.solve.kwargs().items() if k != "t0"}  # every other solver key
        self.model = autoencoder(c.model, arch, tuple(self.train.image_shape), likelihood=c.likelihood,
                                 control_scale=c.control_scale, **solve)
        # training adds the flow regularisers as a running cost; evaluation solves without it
        cost = nc.regularization(kinetic=c.kinetic, jacobian=c.jacobian)
        self.train_model = dataclasses.replace(self.model, running_cost=cost)

    def init(self, key):
        variables = self.model.init(key)
        return variables["params"], variables["batch_stats"]

    def prepare(self, batch, step):
        return (batch.images,)

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


def train_and_evaluate(cfg: AutoencodeConfig, workdir: str | Path, *, progress: bool = True) -> dict:
    """Train one model in ``workdir`` (resuming), evaluate every epoch, return the summary."""
    return engine.train(Task, cfg, workdir, progress=progress)


def results_table(summaries: list[dict]) -> str:
    header = ["model", "held-out reconstruction MSE", "parameters", "steps", "wall time (s)"]
    return engine.markdown_table(header, [[MODEL_LABELS[s["model"]], f"{s['test_mse']:.5f}",
                                           f"{s['num_params']:,}", s["steps"], f"{s['wall_time_s']:.0f}"]
                                          for s in summaries])


def main(argv=None) -> int:
    return engine.main(argv, doc=__doc__, task_class=Task, sweep={"model": MODEL_KINDS},
                       subdir=lambda t: t.config.model, table=results_table)


if __name__ == "__main__":
    sys.exit(main())
