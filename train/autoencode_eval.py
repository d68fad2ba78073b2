"""Evaluate trained autoencoders: reconstruction, generation FID per sampler, figures (sec. 5.3–5.4).

    python -m train.autoencode_eval --workdir runs/ae5k [--components 10,100,1000] [--samples 10000]
        [--inception-weights FILE] [--set key=value ...]

Options are the keys of :class:`EvalConfig`, as ``--key value`` or ``--set key=value`` (the same
mechanism as the training scripts, :mod:`train.config`).

``--workdir`` is the work directory of ``train.autoencode``: every run under it is evaluated
(``<model>[_norm][_c<k>]/`` and, for sweeps over seeds, their ``seed<k>/``); runs not trained to
their last step are refused (``--allow-unfinished``: evaluated and labelled UNFINISHED). For every
run: the held-out reconstruction MSE (pixels in [0, 1]) and the FID between the held-out images and
``--samples`` decoded samples of each latent sampler — a Gaussian mixture with each of
``--components`` (k-means init, tol 1e-3, ≤ 100 EM iterations) fitted on the codes of
``--fit-split`` (default train; the paper fitted the test codes), a Gaussian KDE, the VAE's N(0, I)
prior, for AutoN-CODE also each mixture fitted to the encoder's controls θ instead (``controls
GMM-k``: samples sent through the flow and the decoder; ``--controls false`` turns them off) —
and of the held-out reconstructions. ``results.md`` has one row per model variant (mean ± std over
seeds when several) and the paired differences of MSE and GMM FID between variants
(:mod:`train.stats`); ``eval.json`` every run, the aggregates and every paired difference.
Features: InceptionV3 pool3 with ``--inception-weights`` ("FID", see
``docs/inception_weights.md``); otherwise, for digit sets, the digit-feature network trained on
the engine in ``<workdir>/digit_features/`` (:mod:`train.digit_features`), reported as
**digit-feature FID**, not comparable to the paper's.

Outputs in ``<workdir>/eval/``: ``eval.json``, ``results.md``, ``orbit.png`` (AutoN-CODE's decoded
``x(t)``, figs. 8/A.2), ``samples_<model variant>.png``, ``interpolation.png`` (fig. A.8) and
``tsne.png`` (fig. A.7); the figures show the first seed of each variant. Too many mixture
components for the codes is an error raised before any work.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ncode_jax.compiler import jit as nc_jit
from ncode_jax.generate import GMMSampler, KDESampler, PriorSampler
from ncode_jax.metrics.batching import map_batches
from ncode_jax.metrics.fid import fid_from_features
from ncode_jax.models.autoencoder import MODEL_KINDS

from . import autoencode, figures, stats
from .config import Config, UserError, build, check, check_choice, check_range, parse_overrides, to_dict
from .engine import error, library_message, load_run, parse_args, quiet_callback_logs, recorded_runs

DIGIT_SETS = ("mnist5k", "mnist", "digits")
DIGIT_FID = "digit-feature FID"


def batched(fn, x: np.ndarray, batch_size: int = 500) -> np.ndarray:  # one compilation
    return map_batches(lambda chunk: fn(jnp.asarray(chunk)), x, batch_size)


class Features:
    """The feature map of the FID and the name its numbers are reported under."""

    def __init__(self, workdir: Path, dataset: str, data_dir: str | None, inception_weights: str | None):
        self.fn = None
        if inception_weights is not None:
            from ncode_jax.metrics import inception

            try:
                variables = inception.load_inception_params(inception_weights)
            except Exception as e:  # noqa: BLE001 - a bad weights file is the user's input
                raise UserError(f"--inception-weights {inception_weights}: cannot read it ({e})") from None
            self.fn = lambda images: inception.inception_features(variables, images)
            self.name = "FID"
        elif dataset in DIGIT_SETS:
            from .digit_features import train_extractor

            extractor = train_extractor(workdir / "digit_features", dataset, data_dir=data_dir)
            self.fn = extractor.features
            self.name = DIGIT_FID
            self.info = extractor.info
        else:
            self.name = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.fn(np.clip(images, 0.0, 1.0))


def run_dirs(workdir: Path, models: list[str] | None) -> list[Path]:
    """Every run of ``train.autoencode`` under ``workdir`` (``<model>[_norm][_c<k>]/`` and their
    ``seed<k>/``), ordered by model, variant and seed; ``models`` keeps only those kinds."""
    if models is not None and set(models) - set(MODEL_KINDS):
        raise UserError(f"unknown models {sorted(set(models) - set(MODEL_KINDS))}; choose from {MODEL_KINDS}")
    found = []
    for c, run_dir in recorded_runs(workdir, "autoencode"):
        if run_dir.name != "eval" and (models is None or c.get("model") in models):
            found.append((MODEL_KINDS.index(c.get("model")) if c.get("model") in MODEL_KINDS else 99,
                          bool(c.get("latent_norm")), c.get("controls_per_row", 2), c.get("seed", 0),
                          run_dir))
    missing = sorted(set(models or ()) - {MODEL_KINDS[f[0]] for f in found if f[0] < len(MODEL_KINDS)})
    if not found or missing:
        raise UserError(f"{workdir} holds no trained {missing or 'models'} (<model>/config.json written by "
                        "python -m train.autoencode)")
    return [d for *_, d in sorted(found, key=lambda f: f[:4])]


def evaluate_model(run, train, test, features: Features, real_feats, *, components,
                   n_samples: int, fit_split: str, kde_bandwidth, seed: int,
                   controls: bool = True, figures: bool = True) -> tuple[dict, dict]:
    """Metrics for one trained model (a :func:`~train.engine.load_run` result) and the arrays the
    figures need (``figures=False``: none, and no t-SNE colouring fit).

    Samplers of the codes ``z``: ``GMM-k`` for each of ``components``, ``KDE`` and the VAE's
    prior. With ``controls`` an AutoN-CODE also gets ``controls GMM-k``: the mixture fitted to the
    encoder's controls θ (``2n`` per image) of the same images, its samples sent through the flow
    (:meth:`~ncode_jax.models.autoencoder.Autoencoder.controls_to_latent`) and the decoder — the
    paper's "sampling from the control coefficients" (sec. 5.4, future work there)."""
    cfg, model, variables = run.config, run.model, run.params
    latent = nc_jit(model.latent)  # compiled with ncode_jax.compiler_options (conv coders)
    decode = nc_jit(model.decode)
    t0 = time.perf_counter()
    codes_test = batched(lambda x: latent(variables, x), test.images)
    codes_fit = codes_test if fit_split == "test" else batched(lambda x: latent(variables, x), train.images)
    recon = batched(lambda z: decode(variables, z), codes_test)
    label = autoencode.label(run.task.row()) + ("" if run.finished else f" (UNFINISHED: step {run.step} of "
                                                                f"{run.task.total_steps})")
    result = {**run.task.row(), "seed": cfg.seed, "label": label, "finished": run.finished, "step": run.step,
              "num_params": model.num_params(), "latent_dim": model.latent_dim,
              "test_mse": float(np.mean((recon - test.images) ** 2)), "fid_name": features.name,
              "fit_split": fit_split, "n_fit_codes": int(codes_fit.shape[0]), "samplers": {}}
    makers = {f"GMM-{k}": (lambda k=k: GMMSampler(codes_fit, k, seed=seed)) for k in components}
    makers["KDE"] = lambda: KDESampler(codes_fit, bandwidth=kde_bandwidth)
    if cfg.model == "vae":
        makers["prior N(0,I)"] = lambda: PriorSampler(model.latent_dim)
    to_code = {}  # sampler name -> map of its samples to codes (default: they are codes)
    if controls and cfg.model == "ncode":
        encode = nc_jit(model.encode)
        fit_images = test.images if fit_split == "test" else train.images
        theta_fit = batched(lambda x: encode(variables, x), fit_images)
        flow = nc_jit(model.controls_to_latent)
        for k in components:
            makers[f"controls GMM-{k}"] = lambda k=k: GMMSampler(theta_fit, k, seed=seed)
            to_code[f"controls GMM-{k}"] = lambda theta: batched(flow, theta)
    samplers, fit_seconds = {}, {}
    for name, make in makers.items():
        t_fit = time.perf_counter()
        samplers[name] = make()
        fit_seconds[name] = round(time.perf_counter() - t_fit, 2)
    sample_images = {}
    if features.name is not None:
        result["fid_reconstructions"] = float(fid_from_features(real_feats, features(recon)))
    for name, sampler in samplers.items():
        drawn = sampler.sample(n_samples, seed=seed)
        codes = to_code[name](drawn) if name in to_code else drawn
        imgs = batched(lambda z: decode(variables, z), codes)
        entry = {"fit": sampler.fit_info, "fit_seconds": fit_seconds[name]}
        if features.name is not None:
            entry["fid"] = float(fid_from_features(real_feats, features(imgs)))
        result["samplers"][name] = entry
        sample_images[name] = imgs[:24]
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if not figures:
        return result, {}
    arrays = {"model": model, "variables": variables, "codes_test": codes_test,
              "samples": sample_images, "gmm10": GMMSampler(codes_test, min(10, len(codes_test)), seed=seed)}
    return result, arrays


def flat(result: dict) -> dict:
    """One evaluated run as a flat row: its keys, seed, ``test_mse``, ``fid_reconstructions`` and
    ``fid <sampler>`` per sampler (for :mod:`train.stats`)."""
    row = {k: result[k] for k in (*autoencode.KEYS, "seed", "test_mse", "num_params")}
    if "fid_reconstructions" in result:
        row["fid_reconstructions"] = result["fid_reconstructions"]
    row.update({f"fid {n}": s["fid"] for n, s in result["samplers"].items() if "fid" in s})
    return row


def sampler_names(components) -> list[str]:
    return ([f"GMM-{k}" for k in components] + ["KDE", "prior N(0,I)"]
            + [f"controls GMM-{k}" for k in components])


def results_table(results: list[dict], components) -> str:
    """Per model variant (mean ± std over seeds when several): held-out MSE, the FID of each
    sampler and of the reconstructions, parameters; then paired differences of the MSE and of the
    FID of the largest mixture of at most 100 components."""
    fid_name = results[0]["fid_name"] or "FID (not computed)"
    rows = [flat(r) for r in results]
    agg = stats.aggregate(rows, autoencode.KEYS)
    names = [n for n in sampler_names(components) if any(f"fid {n}" in a for a in agg)]
    if results[0]["fid_name"] is None:
        names = []
    labels = {tuple(r[k] for k in autoencode.KEYS): r["label"] for r in results}
    head = ("| model | seeds | held-out recon. MSE | " + " | ".join(f"{fid_name} {n}" for n in names)
            + f" | {fid_name} of reconstructions | parameters |")
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for a in agg:
        cells = [stats.mean_std(a[f"fid {n}"]) if f"fid {n}" in a else "—" for n in names]
        rec = stats.mean_std(a["fid_reconstructions"]) if "fid_reconstructions" in a else "—"
        lines.append(f"| {labels[tuple(a[k] for k in autoencode.KEYS)]} | {a['n']} | "
                     f"{stats.mean_std(a['test_mse'], digits=5)} | " + " | ".join(cells)
                     + f" | {rec} | {a['num_params']['mean']:,.0f} |")
    table = "\n".join(lines)
    small = [k for k in components if k <= 100]
    for metric, digits in [("test_mse", 5)] + ([(f"fid GMM-{max(small)}", 2)] if small and names else []):
        pairs = stats.paired(rows, autoencode.KEYS, metric)
        if pairs:
            table += "\n\n" + stats.paired_table(pairs, autoencode.label, digits=digits)
    return table


def _output_dir(workdir: Path) -> Path:
    """``workdir/eval``, checked writable before hours of evaluation (one error line if not)."""
    out = workdir / "eval"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the evaluation to {out}: {e.strerror or e}") from None
    return out


def _shared_data(dirs: list[Path], cfg: EvalConfig) -> autoencode.Task:
    """The data of the runs in ``dirs`` (all on the same dataset and test split, else UserError),
    checked against the mixtures' component counts."""
    record = json.loads((dirs[0] / "config.json").read_text())
    cfg0 = build(autoencode.AutoencodeConfig, record["config"])
    for d in dirs[1:]:
        other = json.loads((d / "config.json").read_text())["config"]
        if (other.get("dataset"), other.get("test_split")) != (cfg0.dataset, cfg0.test_split):
            raise UserError(f"{d} was trained on {other.get('dataset')} {other.get('test_split')}, "
                            f"{dirs[0]} on {cfg0.dataset} {cfg0.test_split}: evaluate them separately")
    data = autoencode.Task(cfg0)
    n_fit = data.test.num_examples if cfg.fit_split == "test" else data.train.num_examples
    too_many = [k for k in cfg.components if k > n_fit]
    if too_many:
        raise ValueError(f"cannot fit Gaussian mixtures with {too_many} components to the {n_fit} latent "
                         f"codes of the {cfg.fit_split} split: use at most {n_fit} components")
    return data


def _load_runs(workdir: Path, dirs: list[Path], allow_unfinished: bool) -> tuple[dict, list[str]]:
    """``{run directory: load_run(it)}`` and the unfinished ones' descriptions (a UserError unless
    ``allow_unfinished``)."""
    runs = {d: load_run(d) for d in dirs}
    unfinished = [f"{d.relative_to(workdir)} (step {r.step} of {r.task.total_steps})" for d, r in runs.items()
                  if not r.finished]
    if unfinished and not allow_unfinished:
        raise UserError(f"{workdir} holds unfinished runs: {', '.join(unfinished)}; re-run train.autoencode "
                        "to finish them, or pass --allow-unfinished to evaluate them labelled as such")
    return runs, unfinished


def _evaluate_runs(workdir: Path, runs: dict, data, features: Features, cfg: EvalConfig, out: Path
                   ) -> tuple[list[dict], dict]:
    """:func:`evaluate_model` of every run (the samples figure of each group's first seed); the
    results and, per group label, the figures' arrays of its first seed."""
    real_feats = features(data.test.images) if features.name is not None else None
    results, arrays = [], {}
    for d, loaded in runs.items():
        rel = d.relative_to(workdir).as_posix()
        print(f"evaluating {rel} ...", file=sys.stderr, flush=True)
        label = autoencode.label(loaded.task.row())
        res, arr = evaluate_model(loaded, data.train, data.test, features, real_feats,
                                  components=cfg.components, n_samples=cfg.samples, fit_split=cfg.fit_split,
                                  kde_bandwidth=cfg.kde_bandwidth, seed=cfg.seed, controls=cfg.controls,
                                  figures=label not in arrays)
        results.append({**res, "run_dir": rel})
        if label in arrays:
            continue
        arrays[label] = arr
        figures.plot_rows(f"{res['label']}: random samples per latent sampler", arr["samples"],
                          out / f"samples_{rel.split('/')[0]}.png")
    return results, arrays


def _draw_figures(arrays: dict, test, cfg: EvalConfig, out: Path, n_figure: int) -> None:
    """The latent orbit of the first AutoN-CODE, interpolations and the t-SNE of the codes."""
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(test.num_examples, size=n_figure, replace=False)
    flows = [a for a in arrays.values() if a["model"].kind == "ncode"]
    if flows:
        a = flows[0]
        ts = jnp.linspace(0.0, a["model"].t1, 11)
        _, decoded = nc_jit(a["model"].orbit)(a["variables"], jnp.asarray(test.images[pick]), ts)
        figures.plot_orbit(np.asarray(ts), np.asarray(decoded), test.images[pick], out / "orbit.png")
    pairs = rng.choice(test.num_examples, size=(2, 2), replace=False)
    interp = {}
    w = np.linspace(0.0, 1.0, 10, dtype=np.float32)[:, None]
    for p, (i, j) in enumerate(pairs):
        for name, a in arrays.items():
            z = (1 - w) * a["codes_test"][i] + w * a["codes_test"][j]
            imgs = np.asarray(a["model"].decode(a["variables"], jnp.asarray(z)))
            interp[f"{name} (pair {p + 1})"] = imgs
    figures.plot_rows("linear interpolation between the latent codes of two held-out images", interp,
                      out / "interpolation.png", cols=10)
    from sklearn.manifold import TSNE

    sub = rng.choice(test.num_examples, size=min(cfg.tsne_points, test.num_examples), replace=False)
    panels = {}
    for name, a in arrays.items():
        t_tsne = time.perf_counter()
        codes = a["codes_test"][sub]
        emb = TSNE(n_components=2, init="pca", random_state=cfg.seed, perplexity=30).fit_transform(codes)
        panels[name] = (emb, a["gmm10"].predict(codes), test.labels[sub])
        print(f"t-SNE of {name}: {time.perf_counter() - t_tsne:.1f} s", file=sys.stderr, flush=True)
    figures.plot_tsne(panels, out / "tsne.png")


def run(workdir: Path, cfg: EvalConfig, n_figure: int = 8) -> list[dict]:
    """Evaluate every trained model of ``workdir``; unfinished runs are refused (UserError)
    unless ``cfg.allow_unfinished``, and then labelled UNFINISHED in every output."""
    dirs = run_dirs(workdir, cfg.models)
    out = _output_dir(workdir)
    data = _shared_data(dirs, cfg)
    runs, unfinished = _load_runs(workdir, dirs, cfg.allow_unfinished)
    features = Features(workdir, data.config.dataset, data.config.data_dir, cfg.inception_weights)
    results, arrays = _evaluate_runs(workdir, runs, data, features, cfg, out)
    _draw_figures(arrays, data.test, cfg, out, n_figure)
    rows = [flat(r) for r in results]
    fids = sorted({k for r in rows for k in r if k.startswith("fid")})
    meta = {"workdir": str(workdir), "unfinished": unfinished, **to_dict(cfg), "fid_name": features.name,
            "test_examples": data.test.num_examples, "feature_extractor": getattr(features, "info", None),
            "results": results,
            "aggregate": stats.aggregate(rows, autoencode.KEYS),
            "paired": [p for m in ["test_mse", *fids] for p in stats.paired(rows, autoencode.KEYS, m)]}
    (out / "eval.json").write_text(json.dumps(meta, indent=2))
    (out / "results.md").write_text(results_table(results, cfg.components) + "\n")
    return results


@dataclass(frozen=True)
class EvalConfig(Config):
    """The options of the evaluation (see the module docstring)."""

    models: tuple[str, ...] | None = None  # default: every trained model found
    components: tuple[int, ...] = (10, 100, 1000)  # Gaussian mixture component counts
    samples: int = 10000  # generated images per sampler
    fit_split: str = "train"  # the codes the samplers are fitted to
    kde_bandwidth: float | None = None  # in standardised units; None: Scott's rule
    inception_weights: str | None = None  # .npz InceptionV3 weights (standard FID)
    controls: bool = True  # AutoN-CODE: also sample mixtures fitted to the controls θ
    seed: int = 0
    tsne_points: int = 1000
    allow_unfinished: bool = False  # evaluate runs stopped before their last step (labelled)

    def __post_init__(self):
        check_choice("fit_split", self.fit_split, ("train", "test"))
        check(bool(self.components) and min(self.components) >= 1,
              f"config value components={self.components} must be positive integers")
        check_range(self, ("samples",), minimum=2)
        check_range(self, ("tsne_points",), minimum=1)
        check_range(self, ("kde_bandwidth",), minimum=0, strict=True)


def main(argv=None) -> int:
    args = parse_args(argv, doc=__doc__, config_class=EvalConfig, default_config="", training=False)
    quiet_callback_logs()
    try:
        cfg = build(EvalConfig, parse_overrides(args.overrides))
        results = run(Path(args.workdir), cfg)
    except (ValueError, FileNotFoundError) as e:
        return error(e, 2)
    except OSError as e:  # e.g. the disk filled up while writing figures
        return error(f"cannot write the evaluation to {Path(args.workdir) / 'eval'}: {e.strerror or e}", 2)
    except Exception as e:  # noqa: BLE001 - a solve's check inside a compiled evaluation: one line
        found = library_message(e)
        if found is None:
            raise
        return error(f"the evaluation failed: {found}", 2)
    print(results_table(results, cfg.components))
    print(f"\nwrote {args.workdir}/eval/: eval.json, results.md, orbit.png, samples_*.png, "
          "interpolation.png, tsne.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
