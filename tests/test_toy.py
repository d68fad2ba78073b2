"""The paper's toy experiments (sec. 5.1): expressivity claims, the CLI, resume after a kill."""

import json

import jax
import numpy as np
import pytest
from helpers import kill_and_resume

from train import engine, toy
from train.config import UserError, build

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False  # train as users do, in float32


def _configs(problem, models, steps, **kw):
    return [toy.ToyConfig(problem=problem, model=m, steps=steps, **kw) for m in models]


@pytest.fixture(scope="module")
def reflection_results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reflection")
    cfgs = _configs("reflection", ["node", "open", "closed"], steps=200)
    summaries = toy.train_and_evaluate(cfgs, workdir, progress=False)
    return {s["model"]: s for s in summaries}, workdir


@pytest.fixture(scope="module")
def annuli_results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("annuli")
    cfgs = _configs("annuli", ["open", "closed"], steps=200)
    summaries = toy.train_and_evaluate(cfgs, workdir, progress=False)
    return {s["model"]: s for s in summaries}, workdir


def test_node_cannot_reflect(reflection_results):
    # A 1-D flow map is increasing: its best MSE to -x on U[-1, 1] is E[x^2] = 1/3.
    assert reflection_results[0]["node"]["test_mse"] >= 0.3


@pytest.mark.parametrize("model", ["open", "closed"])
def test_ncode_fits_reflection(reflection_results, model):
    assert reflection_results[0][model]["test_mse"] < 1e-3


@pytest.mark.slow  # ~65 s on 2 cores; the reflection tests keep the expressivity claim in the default run
@pytest.mark.parametrize("model", ["open", "closed"])
def test_ncode_separates_annuli(annuli_results, model):
    assert annuli_results[0][model]["test_accuracy"] >= 0.99


def test_outputs_written(reflection_results):
    _, workdir = reflection_results
    for name in ["summary.json", "results.md", "reflection_open/metrics.jsonl", "reflection_trajectories.png",
                 "training_curves.png"]:
        assert (workdir / name).stat().st_size > 0, name
    summary = json.loads((workdir / "summary.json").read_text())
    assert {s["model"] for s in summary["runs"]} == {"node", "open", "closed"}
    rows = engine.read_metrics(workdir / "reflection_open" / "metrics.jsonl")
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(10, 201, 10))
    assert "N-CODE closed" in (workdir / "results.md").read_text()


@pytest.mark.slow  # the CLI path also runs in test_workdir.py; this one adds the figures (~16 s)
def test_cli_smoke(tmp_path, capsys):
    rc = toy.main(["--workdir", str(tmp_path), "--problem", "annuli", "--model", "anode",
                   "--steps", "3", "--log-every", "1", "--solver", "rk4", "--dt", "0.25",
                   "--adjoint", "backsolve", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| annuli | ANODE |" in out
    assert (tmp_path / "annuli_flows.png").exists()


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert toy.main(["--workdir", str(tmp_path), "--steps", "0"]) == 2
    assert "steps=0 is out of range" in capsys.readouterr().err
    assert toy.main(["--workdir", str(tmp_path), "--solver", "rk45"]) == 2
    assert "unknown solver 'rk45'" in capsys.readouterr().err
    assert toy.main(["--workdir", str(tmp_path), "--rtol", "-1"]) == 2  # trained before the engine
    assert "rtol" in capsys.readouterr().err
    assert not (tmp_path / "reflection_open").exists()


def test_config_errors():
    with pytest.raises(ValueError, match="unknown problem"):
        toy.ToyConfig(problem="spirals")
    with pytest.raises(UserError, match="unknown adjoint"):
        build(toy.ToyConfig, {"adjoint": "adjoint"})
    with pytest.raises(UserError, match="dt"):
        build(toy.ToyConfig, {"dt": -0.1})
    with pytest.raises(UserError, match="kinetic=-1.0 is out of range"):
        build(toy.ToyConfig, {"kinetic": -1.0})


def _final_params(workdir, name):
    run = engine.load_run(workdir / name)
    return run.step, run.params


@pytest.mark.slow  # ~30 s; kill-and-resume runs in the default suite for classify, autoencode and workdir
def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    # with the Jacobian regulariser on: its Hutchinson probes come from the step key, so the resumed
    # run must replay them exactly
    cfg = build(toy.ToyConfig, dict(problem="reflection", model="open", steps=20, checkpoint_every=5,
                                    log_every=5, solver="rk4", dt=0.25, jacobian=0.05))
    engine.train(toy.Task, cfg, tmp_path / "straight" / "reflection_open", progress=False)
    _, straight = _final_params(tmp_path / "straight", "reflection_open")

    # Kill the run right after its second checkpoint (step 10).
    def killed_at_step_10():
        assert _final_params(tmp_path / "killed", "reflection_open")[0] == 10

    work = tmp_path / "killed" / "reflection_open"
    kill_and_resume(monkeypatch, lambda: engine.train(toy.Task, cfg, work, progress=False),
                    kill_after_step=10, on_kill=killed_at_step_10)
    step, resumed = _final_params(tmp_path / "killed", "reflection_open")
    assert step == 20
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    lines = (tmp_path / "killed" / "reflection_open" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [5, 10, 15, 20]  # no duplicates
    assert all(r["reg"] > 0 for r in rows if r["kind"] == "train")  # the regulariser is reported
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [20]

    with pytest.raises(UserError, match="different configuration"):
        engine.train(toy.Task, build(toy.ToyConfig, dict(problem="reflection", model="open", lr=0.5)),
                     tmp_path / "killed" / "reflection_open", progress=False)
