"""Adversarial robustness of the trained classifiers of a work directory: FGSM and PGD over an ε grid.

    python -m train.robustness --workdir runs/digits [--epsilons 0,0.05,0.1,0.2] [--pgd-steps 10,20]
        [--restarts 2] [--examples 500] [--set key=value ...]

``--workdir`` is a work directory of ``train.classify``: every run under it (``<model>/`` or
``<model>/seed<k>/``) is evaluated on the first ``examples`` held-out images. Attacks act on
pixels in ``[0, 1]`` — ε is in those units whatever the model's input normalisation — in the
L∞ ball of radius ε, and every perturbed image is clipped to ``[0, 1]``:

* **FGSM** (Goodfellow et al., 2015): ``x + ε·sign(∇ₓ loss)``;
* **PGD** (Madry et al., 2018): a uniform random start in the ball, then ``K`` steps of
  ``x ← Π(x + α·sign(∇ₓ loss))`` with ``α = 2.5·ε/K`` (Madry et al.'s step rule), for each ``K``
  of ``pgd_steps``; an image counts as robust only if it is classified correctly after every one of
  ``restarts`` random starts;
* **noise** — the baseline: ``x + ε·s`` with random signs ``s`` (a random corner of the ball).

The loss is the cross-entropy of the logits; its gradient goes through the ODE solve with the
exact gradient of the computed solution (``adjoint="checkpoint"``, whatever the run trained with).
Guards against gradient masking (Athalye et al., 2018; Carlini et al., 2019), reported per run in
``checks``: more PGD steps never give a higher accuracy, PGD is never above FGSM, and random noise
is never below FGSM (each up to one image or one percentage point, the larger, of slack for the
random starts; every ``K`` starts from the same random points).

Outputs in ``<workdir>/robustness/``: ``robustness.json`` (per run and per model: mean ± std over
seeds), ``robustness.md`` and ``robustness.png`` (accuracy against ε per model, mean ± std over seeds).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ncode_jax as nc
from ncode_jax.models.image import IMAGE_KINDS

from . import stats
from .config import Config, UserError, build, check, parse_overrides, to_dict
from .engine import error, load_run, markdown_table, parse_args, recorded_runs
from .labels import FLOW_LABELS


def slack_for(n: int) -> float:
    """The gradient-masking checks' tolerance on ``n`` images: one image or 1 point, the larger."""
    return max(1.0 / n, 0.01) + 1e-9


@dataclass(frozen=True)
class RobustnessConfig(Config):
    """The options of the evaluation (see the module docstring)."""

    epsilons: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)  # L∞ radii in [0, 1] pixel units
    pgd_steps: tuple[int, ...] = (10, 20)  # PGD step counts K (each a separate attack)
    restarts: int = 2  # PGD random starts per image (worst case over them)
    examples: int = 500  # the first N held-out images
    batch_size: int = 250
    seed: int = 0  # random starts and noise
    models: tuple[str, ...] | None = None  # default: every trained model found
    allow_unfinished: bool = False  # evaluate runs stopped before their last step (labelled)

    def __post_init__(self):
        check(bool(self.epsilons) and all(0.0 <= e <= 1.0 for e in self.epsilons),
              f"config value epsilons={self.epsilons} must lie in [0, 1] (pixel units)")
        check(bool(self.pgd_steps) and min(self.pgd_steps) >= 1,
              f"config value pgd_steps={self.pgd_steps} must be positive integers")
        for name in ("restarts", "examples", "batch_size"):
            check(getattr(self, name) >= 1, f"config value {name}={getattr(self, name)} must be >= 1")
        check(self.seed >= 0, f"config value seed={self.seed} must be >= 0")
        if self.models is not None:
            unknown = sorted(set(self.models) - set(IMAGE_KINDS))
            check(not unknown, f"unknown models {unknown}; choose from {list(IMAGE_KINDS)}")


def run_dirs(workdir: Path, models) -> list[Path]:
    """Every ``train.classify`` run under ``workdir``, ordered by model and seed."""
    found = []
    for c, run_dir in recorded_runs(workdir, "classify"):
        if models is None or c.get("model") in models:
            order = IMAGE_KINDS.index(c["model"]) if c.get("model") in IMAGE_KINDS else len(IMAGE_KINDS)
            found.append((order, c.get("seed", 0), run_dir))
    if not found:
        raise UserError(f"{workdir} holds no trained {list(models) if models else 'classifiers'} "
                        "(<model>/config.json written by python -m train.classify)")
    return [d for *_, d in sorted(found, key=lambda f: f[:2])]


def make_attacks(model, config: nc.SolveConfig | dict, mean, std):
    """Two jitted functions of per-image correctness ``(B,)``: ``single(params, pixels, labels, eps,
    key) -> {"clean", "fgsm", "noise"}`` and ``pgd(params, pixels, labels, eps, steps, key,
    restarts)`` (``steps`` steps, worst over ``restarts`` random starts; ``restarts`` static).
    ``pixels`` in ``[0, 1]``; the model sees ``(pixels - mean) / std``. ``config``: the solver
    settings of every solve (a :class:`~ncode_jax.SolveConfig`, or a dict of its fields)."""
    config = config if isinstance(config, nc.SolveConfig) else nc.SolveConfig(**config)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def logits(params, x):
        standardized = (x - jnp.broadcast_to(mean, x.shape)) / jnp.broadcast_to(std, x.shape)
        return model(params, standardized, config=config)[0]

    def correct(params, x, y):
        return jnp.argmax(logits(params, x), -1) == y

    def grad_sign(params, x, y):
        loss = lambda z: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits(params, z), y))  # noqa: E731
        return jnp.sign(jax.grad(loss)(x))

    def single(params, x, y, eps, key):
        fgsm = jnp.clip(x + eps * grad_sign(params, x, y), 0.0, 1.0)
        noise = jnp.clip(x + eps * jax.random.rademacher(key, x.shape, x.dtype), 0.0, 1.0)
        return {"clean": correct(params, x, y), "fgsm": correct(params, fgsm, y),
                "noise": correct(params, noise, y)}

    def pgd(params, x, y, eps, steps, key, restarts):
        alpha = 2.5 * eps / steps

        def one_start(ok, k):
            start = jnp.clip(x + jax.random.uniform(k, x.shape, x.dtype, -eps, eps), 0.0, 1.0)

            def step(_, z):
                z = z + alpha * grad_sign(params, z, y)
                return jnp.clip(jnp.clip(z, x - eps, x + eps), 0.0, 1.0)

            z = jax.lax.fori_loop(0, steps, step, start)
            return ok & correct(params, z, y), None

        return jax.lax.scan(one_start, jnp.ones(y.shape, bool), jax.random.split(key, restarts))[0]

    return jax.jit(single), jax.jit(pgd, static_argnums=(6,))


def evaluate_run(run, cfg: RobustnessConfig) -> dict:
    """Accuracies of one :func:`~train.engine.load_run` classifier run at every ε (fractions)."""
    test = run.task.test
    n = min(cfg.examples, test.num_examples)
    mean = np.asarray(test.mean if test.normalized else 0.0, np.float32)
    std = np.asarray(test.std if test.normalized else 1.0, np.float32)
    pixels = np.clip(test.images[:n] * std + mean, 0.0, 1.0).astype(np.float32)
    labels = np.asarray(test.labels[:n])
    single, pgd = make_attacks(run.model, run.config.solve.replace(adjoint="checkpoint"), mean, std)
    out = {"model": run.config.model, "seed": run.config.seed, "finished": run.finished, "examples": n,
           "epsilons": list(cfg.epsilons), "clean": None, "fgsm": [], "noise": [],
           **{f"pgd{k}": [] for k in cfg.pgd_steps}}
    key = jax.random.key(cfg.seed)
    for e, eps in enumerate(cfg.epsilons):
        sums: dict[str, float] = {}
        for b in range(0, n, cfg.batch_size):
            x, y = pixels[b:b + cfg.batch_size], labels[b:b + cfg.batch_size]
            k_b = jax.random.fold_in(jax.random.fold_in(key, e), b)
            res = single(run.params, x, y, jnp.float32(eps), jax.random.fold_in(k_b, 0))
            for k in cfg.pgd_steps:
                res[f"pgd{k}"] = pgd(run.params, x, y, jnp.float32(eps), k, jax.random.fold_in(k_b, 1),
                                     cfg.restarts)  # the same random starts for every K
            for tag, ok in res.items():
                sums[tag] = sums.get(tag, 0.0) + float(jnp.sum(ok))
        out["clean"] = sums["clean"] / n
        for tag in ("fgsm", "noise", *(f"pgd{k}" for k in cfg.pgd_steps)):
            out[tag].append(sums[tag] / n)
    slack = slack_for(n)
    ks = sorted(cfg.pgd_steps)
    pgd_most = out[f"pgd{ks[-1]}"]
    out["checks"] = {
        "fgsm_at_0_equals_clean": all(abs(a - out["clean"]) < 1e-9
                                      for a, eps in zip(out["fgsm"], cfg.epsilons) if eps == 0),
        "more_pgd_steps_never_higher": all(b <= a + slack for k1, k2 in zip(ks, ks[1:])
                                           for a, b in zip(out[f"pgd{k1}"], out[f"pgd{k2}"])),
        "pgd_never_above_fgsm": all(p <= f + slack for p, f in zip(pgd_most, out["fgsm"])),
        "noise_never_below_fgsm": all(z + slack >= f for z, f in zip(out["noise"], out["fgsm"])),
    }
    return out


def attacks(cfg: RobustnessConfig) -> list[str]:
    return ["noise", "fgsm", *(f"pgd{k}" for k in cfg.pgd_steps)]


def aggregate(results: list[dict], cfg: RobustnessConfig) -> list[dict]:
    """Per model: mean ± std over seeds of the clean accuracy and of each attack at each ε."""
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == model]
        entry = {"model": model, "seeds": [r["seed"] for r in rs],
                 "clean": stats.describe([r["clean"] for r in rs])}
        for a in attacks(cfg):
            entry[a] = [stats.describe([r[a][e] for r in rs]) for e in range(len(cfg.epsilons))]
        entry["checks_failed"] = sorted({f"{k} (seed {r['seed']})" for r in rs
                                         for k, ok in r["checks"].items() if not ok})
        out.append(entry)
    return out


def results_table(agg: list[dict], cfg: RobustnessConfig) -> str:
    """One row per model and attack: accuracy (%) at each ε, mean ± std over seeds."""
    header = ["model", "seeds", "attack", *(f"ε = {e:g}" for e in cfg.epsilons)]
    names = {"noise": "random signs", "fgsm": "FGSM", **{f"pgd{k}": f"PGD-{k} × {cfg.restarts}"
                                                         for k in cfg.pgd_steps}}
    rows = [[FLOW_LABELS.get(a["model"], a["model"]), len(a["seeds"]), names[k],
             *(stats.mean_std(d, 100, 1) for d in a[k])] for a in agg for k in attacks(cfg)]
    table = markdown_table(header, rows)
    failed = [f"{FLOW_LABELS.get(a['model'], a['model'])}: {', '.join(a['checks_failed'])}"
              for a in agg if a["checks_failed"]]
    verdict = "all passed" if not failed else "FAILED — " + "; ".join(failed)
    return table + "\n\ngradient-masking checks: " + verdict


def plot(agg: list[dict], cfg: RobustnessConfig, out: Path) -> Path:
    from .figures import plt, save

    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    last = None
    eps = np.asarray(cfg.epsilons)
    k = f"pgd{max(cfg.pgd_steps)}"
    for a in agg:
        n = len(a["seeds"])
        label = FLOW_LABELS.get(a["model"], a["model"]) + (f" ({n} seeds)" if n > 1 else "")
        for attack, style in ((k, "o-"), ("fgsm", "s--")):
            m = np.array([100 * d["mean"] for d in a[attack]])
            s = np.array([100 * d["std"] for d in a[attack]])
            line = ax.errorbar(eps, m, yerr=s, fmt=style, ms=3, capsize=2,
                               label=f"{label}, {'FGSM' if attack == 'fgsm' else k.upper()}",
                               color=None if attack == k else last)
            last = line[0].get_color()
    ax.set(xlabel="ε (L∞, pixels in [0, 1])", ylabel="held-out accuracy (%)",
           title="accuracy under attack (mean ± std over seeds)", ylim=(0, 100))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save(fig, out)


def run(workdir: Path, cfg: RobustnessConfig) -> list[dict]:
    dirs = run_dirs(workdir, cfg.models)
    runs = {d: load_run(d, adjoint="checkpoint") for d in dirs}
    unfinished = [f"{d.relative_to(workdir)} (step {r.step} of {r.task.total_steps})" for d, r in runs.items()
                  if not r.finished]
    if unfinished and not cfg.allow_unfinished:
        raise UserError(f"{workdir} holds unfinished runs: {', '.join(unfinished)}; finish them with "
                        "train.classify, or pass --allow-unfinished")
    results = []
    for d, r in runs.items():
        t0 = time.perf_counter()
        res = evaluate_run(r, cfg)
        res.update(run_dir=d.relative_to(workdir).as_posix(), seconds=round(time.perf_counter() - t0, 1))
        pgd = ", ".join(f"{100 * a:.1f}" for a in res[f"pgd{max(cfg.pgd_steps)}"])
        print(f"{res['run_dir']}: clean {100 * res['clean']:.1f}%, PGD-{max(cfg.pgd_steps)} {pgd} "
              f"({res['seconds']} s)", file=sys.stderr, flush=True)
        results.append(res)
    agg = aggregate(results, cfg)
    out = workdir / "robustness"
    out.mkdir(exist_ok=True)
    (out / "robustness.json").write_text(json.dumps({**to_dict(cfg), "unfinished": unfinished,
                                                      "runs": results, "aggregate": agg}, indent=2))
    (out / "robustness.md").write_text(results_table(agg, cfg) + "\n")
    plot(agg, cfg, out / "robustness.png")
    return results


def main(argv=None) -> int:
    args = parse_args(argv, doc=__doc__, config_class=RobustnessConfig, default_config="", training=False)
    try:
        cfg = build(RobustnessConfig, parse_overrides(args.overrides))
        results = run(Path(args.workdir), cfg)
    except (ValueError, FileNotFoundError) as e:
        return error(e, 2)
    print(results_table(aggregate(results, cfg), cfg))
    print(f"\nwrote {args.workdir}/robustness/: robustness.json, robustness.md, robustness.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
