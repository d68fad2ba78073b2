"""Autoencoders with a controlled latent flow (paper sec. 5.3): AutoN-CODE, vanilla AE and VAE.

    python -m train.autoencode --config train/configs/autoencode_mnist5k_cpu.py --workdir runs/ae5k \
        [--set model=ncode] [--set epochs=3 ...]

``model`` may be one name (``ae``, ``vae``, ``ncode``), a comma list or ``all``: each model
trains in ``<workdir>/<model>/`` with the same encoder, decoder, data order and budget, and the
work directory gets ``summary.json`` and ``results.md``. Each model's run writes
``metrics.jsonl`` (train lines every ``log_every`` steps, an eval line per epoch with the held-out
reconstruction MSE), ``summary.json`` and orbax checkpoints (variables, optimizer state, data
position) every ``checkpoint_every`` steps and at every epoch end. Re-running the same command
after a kill resumes from the last checkpoint; the randomness (data order, the VAE's noise) is a
pure function of ``(seed, epoch)`` and ``(seed, step)``, so a resumed run equals an uninterrupted
one. Generation, FID and figures: ``python -m train.autoencode_eval --workdir <workdir>``.

Data-parallel over ``num_devices`` devices (default: all) and over several processes with
``--coordinator-address/--num-processes/--process-id``, as ``train.classify`` (see
``train/parallel.py`` and the README). Batch normalisation needs nothing special: its batch mean
and variance are ``jnp.mean`` over the global (sharded) batch inside the jitted step, so XLA
reduces them across devices and they equal the single-device statistics
(``tests/test_parallel.py`` checks the updated ``batch_stats`` too).
"""

from __future__ import annotations

import argparse
import functools
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

from ncode_jax.data.images import KNOWN_DATASETS, BatchIterator, Dataset, load_dataset
from ncode_jax.models.autoencoder import LIKELIHOODS, MODEL_KINDS, MODEL_LABELS, Autoencoder, autoencoder
from ncode_jax.models.coders import ARCHITECTURES, architecture
from ncode_jax.solve import ADJOINTS
from ncode_jax.solvers import SOLVERS

from . import parallel
from .checkpoint import Checkpointer, check_run_config
from .classify import _drop_metrics_after
from .config import apply_overrides, load_config_file
from .utils import MetricsWriter

RESUMABLE_CHANGES = ("epochs", "log_every", "checkpoint_every", "eval_batch_size", "num_devices")


@dataclass(frozen=True)
class AutoencodeConfig:
    """One model's training run; every field is validated on construction."""

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
    t1: float = 10.0
    solver: str = "rk4"
    dt: float | None = 0.5
    rtol: float = 1e-4
    atol: float = 1e-6
    adjoint: str = "checkpoint"
    control_scale: float = 0.1
    seed: int = 0
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    train_examples: int | None = None  # use only the first N training examples (quick runs)
    log_every: int = 20
    checkpoint_every: int = 200
    num_devices: int | None = None  # data-parallel over this many devices; None: all of them

    def __post_init__(self):
        choices = {"dataset": KNOWN_DATASETS, "model": MODEL_KINDS, "coders": sorted(ARCHITECTURES),
                   "likelihood": LIKELIHOODS, "solver": sorted(SOLVERS), "adjoint": ADJOINTS}
        for name, known in choices.items():
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(known)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"config value {name}={getattr(self, name)} is out of range: must be >= 1")
        if self.latent_dim is not None and self.latent_dim < 1:
            raise ValueError(f"config value latent_dim={self.latent_dim} is out of range: must be >= 1")
        for name in ("lr", "t1", "rtol", "atol", "control_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config value {name}={getattr(self, name)} is out of range: must be > 0")
        if self.dt is not None and not 0 < self.dt <= self.t1:
            raise ValueError(f"config value dt={self.dt} is out of range: need 0 < dt <= t1 (or None)")
        if self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"config value num_devices={self.num_devices} is out of range: must be >= 1 "
                             "(or None for all devices)")
        if self.train_examples is not None and self.train_examples < self.batch_size:
            raise ValueError(f"train_examples={self.train_examples} is smaller than batch_size")

    @classmethod
    def from_dict(cls, config: dict) -> AutoencodeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known keys: {sorted(known)}")
        config = dict(config)
        if config.get("widths") is not None:
            config["widths"] = tuple(config["widths"])
        return cls(**config)


def build_model(cfg: AutoencodeConfig, image_shape) -> Autoencoder:
    arch = architecture(cfg.coders, latent_dim=cfg.latent_dim, widths=cfg.widths, kernel=cfg.kernel)
    return autoencoder(cfg.model, arch, tuple(image_shape), likelihood=cfg.likelihood, t1=cfg.t1,
                       solver=cfg.solver, dt=cfg.dt, rtol=cfg.rtol, atol=cfg.atol, adjoint=cfg.adjoint,
                       control_scale=cfg.control_scale)


def load_data(cfg: AutoencodeConfig) -> tuple[Dataset, Dataset]:
    """Train and held-out splits, pixels in ``[0, 1]`` (what both likelihoods expect)."""
    train = load_dataset(cfg.dataset, cfg.train_split, data_dir=cfg.data_dir)
    test = load_dataset(cfg.dataset, cfg.test_split, data_dir=cfg.data_dir)
    if cfg.train_examples is not None:
        train = train._replace(images=train.images[: cfg.train_examples],
                               labels=train.labels[: cfg.train_examples])
    return train, test


@functools.lru_cache(maxsize=8)
def make_steps(model: Autoencoder, lr: float, seed: int, dp: parallel.DataParallel | None = None):
    """The Adam optimizer and the jitted init, train and eval steps; the VAE's noise key is
    ``fold_in(key(seed), step)``. With ``dp`` the train step ``(variables, opt_state, images,
    step)`` and the eval step ``(variables, images, mask)`` take batches sharded over its mesh and
    replicated variables. Cached per ``(model, lr, seed, dp)``, so runs of one process (a resume,
    several models) compile each step once."""
    base = jax.random.key(seed)
    optimizer = optax.adam(lr)

    @jax.jit
    def train_step(variables, opt_state, images, step):
        def loss_fn(params):
            return model.loss({"params": params, "batch_stats": variables["batch_stats"]}, images,
                              train=True, key=jax.random.fold_in(base, step))

        (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
        variables = {"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats}
        return variables, opt_state, loss, metrics

    @jax.jit
    def eval_step(variables, images, mask):
        out, _ = model.apply(variables, images, train=False)
        rec = model.output_images(out.recon)
        sq = jnp.mean(((rec - images) ** 2).reshape(images.shape[0], -1), axis=-1)
        return jnp.sum(sq * mask), out.solution.stats["nfe"] if out.solution is not None else 0

    if dp is not None:
        train_step = dp.jit(train_step, batch_argnums=(2,))
        eval_step = dp.jit(eval_step, batch_argnums=(1, 2))
    return optimizer, jax.jit(model.init), train_step, eval_step


def evaluate(eval_step, variables, dataset: Dataset, batch_size: int,
             dp: parallel.DataParallel | None = None) -> dict:
    """Held-out reconstruction MSE: mean over images and pixels of ``(x̂ - x)²`` in ``[0, 1]``.
    With ``dp`` the batch is padded up to a multiple of the device count (padding rows are masked
    out and batch norm uses its running averages here, so the numbers do not change)."""
    batch_size = min(batch_size, dataset.num_examples)
    if dp is not None:
        batch_size = dp.round_up(batch_size)
    it = BatchIterator(dataset, batch_size, seed=0, shuffle=False, drop_remainder=False, num_epochs=1)
    total = count = 0.0
    nfes = []
    for batch in it:
        arrays = (batch.images, batch.mask)
        s, nfe = eval_step(variables, *(dp.shard_batch(*arrays) if dp is not None else arrays))
        total += float(s)
        count += float(batch.mask.sum())
        nfes.append(int(nfe))
    return {"test_mse": total / count, "test_nfe": float(np.mean(nfes))}


def _state(variables, opt_state, step, epoch, index, wall):
    return {"variables": variables, "opt_state": opt_state, "step": np.asarray(step),
            "epoch": np.asarray(epoch), "index": np.asarray(index), "wall_time": np.asarray(wall)}


def train_and_evaluate(cfg: AutoencodeConfig, workdir: str | Path, *, progress: bool = True) -> dict:
    """Train one model (resuming from ``workdir``), evaluate every epoch, return the summary."""
    t_start = time.perf_counter()
    workdir = Path(workdir)
    dp = parallel.DataParallel.create(cfg.num_devices)
    dp.check_batch(cfg.batch_size, "batch_size")
    check_run_config(workdir / "config.json", asdict(cfg), ignore=RESUMABLE_CHANGES, write=dp.is_main)
    train, test = load_data(cfg)
    model = build_model(cfg, train.image_shape)
    optimizer, init, train_step, eval_step = make_steps(model, cfg.lr, cfg.seed, dp)
    it = BatchIterator(train, cfg.batch_size, seed=cfg.seed, shuffle=True, drop_remainder=True)
    steps_per_epoch = train.num_examples // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch

    variables = init(jax.random.key(cfg.seed))
    state = _state(variables, optimizer.init(variables["params"]), 0, 0, 0, 0.0)
    ckpt = Checkpointer(workdir / "checkpoints")
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored
    step, prior_wall = int(state["step"]), float(state["wall_time"])
    data_state = it.state()
    data_state.update(epoch=int(state["epoch"]), index=int(state["index"]))
    it.restore(data_state)
    variables, opt_state = dp.replicate((state["variables"], state["opt_state"]))
    metrics = MetricsWriter(workdir / "metrics.jsonl", enabled=dp.is_main)
    if dp.is_main:
        _drop_metrics_after(workdir / "metrics.jsonl", step)

    def wall() -> float:
        return prior_wall + time.perf_counter() - t_start

    def save():
        st = it.state()
        ckpt.save(step, _state(variables, opt_state, step, st["epoch"], st["index"], wall()))

    bar = tqdm(total=total_steps, initial=min(step, total_steps), disable=not (progress and dp.is_main),
               desc=f"{cfg.dataset}/{cfg.model}", file=sys.stderr, dynamic_ncols=True)
    last_eval = None
    while step < total_steps:
        batch = next(it)
        variables, opt_state, loss, m = train_step(variables, opt_state, *dp.shard_batch(batch.images), step)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            row = {k: float(v) for k, v in m.items()}
            loss = float(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step}")
            bar.set_postfix(loss=f"{loss:.2f}", mse=f"{row['mse']:.4f}")
            metrics.write(kind="train", model=cfg.model, step=step, epoch=step / steps_per_epoch,
                          loss=loss, **row, wall_time=round(wall(), 2))
        epoch_end = step % steps_per_epoch == 0
        if epoch_end:
            last_eval = evaluate(eval_step, variables, test, cfg.eval_batch_size, dp)
            metrics.write(kind="eval", model=cfg.model, step=step, epoch=step // steps_per_epoch,
                          **last_eval, wall_time=round(wall(), 2))
            if dp.is_main:
                bar.write(f"{cfg.model} epoch {step // steps_per_epoch}: held-out reconstruction MSE "
                          f"{last_eval['test_mse']:.5f}")
        if epoch_end or step % cfg.checkpoint_every == 0:
            save()
    bar.close()
    ckpt.close()
    if last_eval is None:  # resumed a finished run: evaluate its final variables once more
        last_eval = evaluate(eval_step, variables, test, cfg.eval_batch_size, dp)
    summary = {"dataset": cfg.dataset, "model": cfg.model, "epochs": cfg.epochs, "steps": step,
               **last_eval, "wall_time_s": round(wall(), 1), "num_params": model.num_params(),
               "latent_dim": model.latent_dim, "train_examples": train.num_examples,
               "test_examples": test.num_examples, "num_devices": dp.num_devices,
               "num_processes": dp.num_processes}
    if dp.is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_trained(workdir: str | Path, *, image_shape: tuple[int, int, int] | None = None,
                 **overrides) -> tuple[AutoencodeConfig, Autoencoder, dict]:
    """Rebuild a trained model from ``<workdir>/config.json`` and its latest checkpoint.

    ``image_shape`` defaults to that of the config's held-out split (loaded to find it).
    ``overrides`` replace config values (e.g. another ``latent_dim``); variables that do not fit
    the rebuilt model raise a ValueError naming the mismatch instead of an orbax error.
    """
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{workdir} holds no trained model (no config.json)")
    cfg = AutoencodeConfig.from_dict({**json.loads((workdir / "config.json").read_text()), **overrides})
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{workdir} holds no checkpoint")
        raw = ckpt.restore_raw()
    finally:
        ckpt.close()
    if image_shape is None:
        image_shape = load_data(cfg)[1].image_shape
    model = build_model(cfg, image_shape)
    variables = jax.tree.map(jnp.asarray, raw["variables"])
    model.check_variables(variables, who=f"the checkpoint in {workdir}")
    return cfg, model, variables


def results_table(summaries: list[dict]) -> str:
    lines = ["| model | held-out reconstruction MSE | parameters | latent size | epochs | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {MODEL_LABELS[s['model']]} | {s['test_mse']:.5f} | {s['num_params']:,} | "
                     f"{s['latent_dim']} | {s['epochs']} | {s['wall_time_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a train/configs/autoencode_*.py file")
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
        raw = apply_overrides(load_config_file(args.config), args.set)
        models = list(MODEL_KINDS) if raw["model"] == "all" else raw["model"].split(",")
        configs = [AutoencodeConfig.from_dict({**raw, "model": m}) for m in models]
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
    print(results_table(summaries))
    print(f"\nwrote {workdir}/summary.json, results.md and one folder per model; next: "
          f"python -m train.autoencode_eval --workdir {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
