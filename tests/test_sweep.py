"""Seeds as a sweep: layout, per-model mean ± std, paired differences, curves; the parameter-matched
ANODE; adversarial evaluation (train.robustness). Tiny digits runs (float32, as users run them)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from ncode_jax.models.image import image_classifier, matched_hidden, num_params
from train import classify, engine, robustness, stats
from train.config import UserError

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False

FLAGS = ["--config", "train/configs/digits_cpu.py", "--set", "model=node,anode", "--set", "seed=0,1",
         "--set", "epochs=1", "--set", "train_examples=64", "--set", "hidden=4", "--set", "augment=2",
         "--set", "solver=euler", "--set", "dt=0.5", "--set", "num_devices=1", "--no-progress"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    assert classify.main([*FLAGS, "--workdir", str(work)]) == 0
    return work


def test_seed_sweep_layout_and_aggregation(sweep):
    for model in ("node", "anode"):
        for seed in (0, 1):
            run = json.loads((sweep / model / f"seed{seed}" / "config.json").read_text())
            assert run["config"]["seed"] == seed and run["config"]["model"] == model
    summary = json.loads((sweep / "summary.json").read_text())
    runs = {(r["model"], r["seed"]): r for r in summary["runs"]}
    assert set(runs) == {(m, s) for m in ("node", "anode") for s in (0, 1)}
    for agg in summary["aggregate"]:
        acc = [runs[(agg["model"], s)]["test_accuracy"] for s in (0, 1)]
        assert agg["seeds"] == [0, 1] and agg["test_accuracy"]["values"] == acc
        assert agg["test_accuracy"]["mean"] == pytest.approx(np.mean(acc))
        assert agg["test_accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    (pair,) = [p for p in summary["paired"] if p["metric"] == "test_accuracy"]
    assert pair["a"] == {"model": "node"} and pair["b"] == {"model": "anode"} and pair["seeds"] == [0, 1]
    d = [runs[("anode", s)]["test_accuracy"] - runs[("node", s)]["test_accuracy"] for s in (0, 1)]
    assert pair["mean"] == pytest.approx(np.mean(d))
    text = (sweep / "results.md").read_text()
    assert "| ANODE | 2 |" in text and " ± " in text and "ANODE − NODE" in text
    assert (sweep / "curves.png").stat().st_size > 0


def test_paired_interval_is_the_paired_t_interval():
    a, b = [0.90, 0.92, 0.91, 0.95, 0.93], [0.93, 0.93, 0.95, 0.96, 0.94]
    d = np.subtract(b, a)
    half = sps.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
    got = stats.paired_difference(a, b)
    assert got["ci"] == pytest.approx((d.mean() - half, d.mean() + half))
    assert got["mean"] == pytest.approx(d.mean()) and got["n"] == 5
    assert stats.paired_difference([1.0, 2.0], [1.5, 2.5])["ci"] == (0.5, 0.5)  # no spread
    runs = [{"model": m, "seed": s, "acc": v} for m, vals in (("x", a), ("y", b)) for s, v in enumerate(vals)]
    (p,) = stats.paired(runs, ["model"], "acc")
    assert p["excludes_zero"] == (got["ci"][0] > 0) and p["ci"] == pytest.approx(got["ci"])
    with pytest.raises(ValueError, match="more than once"):
        stats.aggregate([{"model": "x", "seed": 0, "acc": 1.0}] * 2, ["model"])


def test_expand_seeds_and_bad_lists():
    raw = {"model": "node,open", "seed": "0, 1,2"}
    out = engine.expand(raw, {"model": ("node", "open"), "seed": ()})
    assert [(r["model"], r["seed"]) for r in out] == [(m, s) for m in ("node", "open") for s in "012"]
    with pytest.raises(UserError, match="seed=all: list the values"):
        engine.expand({"seed": "all"}, {"seed": ()})
    with pytest.raises(UserError, match="more than once"):
        engine.expand({"seed": "1,1"}, {"seed": ()})


def test_matched_anode_has_open_parameter_count():
    kw = dict(hidden=16, augment=10, pool=2)
    target = num_params(image_classifier("open", (28, 28, 1), **kw))
    width = matched_hidden((28, 28, 1), 10, **kw)
    matched = num_params(image_classifier("anode_matched", (28, 28, 1), **kw))
    assert (target, width, matched) == (61808, 66, 62369)  # the widths 65/66 give 61,166/62,369
    narrower = num_params(image_classifier("anode", (28, 28, 1), **{**kw, "hidden": 65}))
    assert abs(matched - target) <= abs(narrower - target)


def test_fgsm_at_zero_is_clean_and_pgd_is_below_fgsm():
    """On a random tiny classifier labelled with its own predictions (clean accuracy 100%)."""
    from ncode_jax.data import load_dataset

    test = load_dataset("digits", "test")  # pixels in [0, 1]
    model = image_classifier("anode", (8, 8, 1), hidden=4, augment=2)
    params = model.init(jax.random.key(0))
    opts = dict(solver="euler", dt=1.0, adjoint="checkpoint")  # one step: a quicker compile
    x = jnp.asarray(test.images[:32])
    y = jax.jit(lambda p, x: jnp.argmax(model(p, x, **opts)[0], -1))(params, x)
    single, pgd = robustness.make_attacks(model, opts, 0.0, 1.0)
    key = jax.random.key(1)
    at0 = single(params, x, y, jnp.float32(0.0), key)
    assert bool(at0["clean"].all()) and bool(at0["fgsm"].all())  # FGSM at ε = 0 is the clean input
    res = single(params, x, y, jnp.float32(0.3), key)
    strong = pgd(params, x, y, jnp.float32(0.3), 5, key, 2)
    assert int(res["fgsm"].sum()) < 32  # the attack does something
    assert int(strong.sum()) <= int(res["fgsm"].sum()) <= int(res["noise"].sum())


@pytest.mark.slow  # ~15 s: the command line on the sweep's runs
def test_robustness_cli(sweep, capsys):
    rc = robustness.main(["--workdir", str(sweep), "--epsilons", "0,0.1,0.3", "--pgd-steps", "2,4",
                          "--restarts", "1", "--examples", "32"])
    assert rc == 0
    out = json.loads((sweep / "robustness" / "robustness.json").read_text())
    assert len(out["runs"]) == 4
    for r in out["runs"]:
        assert r["fgsm"][0] == r["clean"] and r["checks"]["fgsm_at_0_equals_clean"]
    assert (sweep / "robustness" / "robustness.png").stat().st_size > 0
    assert "| ANODE | 2 | FGSM |" in capsys.readouterr().out
    rc = robustness.main(["--workdir", str(sweep), "--epsilons", "0,2"])
    assert rc == 2 and "must lie in [0, 1]" in capsys.readouterr().err
