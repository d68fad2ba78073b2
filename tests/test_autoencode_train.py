"""train.autoencode: kill-and-resume equality, config and checkpoint errors (float32, as users run it)."""

import json

import jax
import numpy as np
import pytest
from helpers import kill_and_resume

from train import autoencode
from train.checkpoint import CheckpointError
from train.engine import load_run

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False

TINY = dict(dataset="digits", coders="mnist", widths=(32,), latent_dim=4, epochs=2, batch_size=32,
            eval_batch_size=128, solver="rk4", dt=2.5, log_every=1, checkpoint_every=3,
            train_examples=192)


def tiny_config(**kw):
    return autoencode.AutoencodeConfig.from_dict({**TINY, **kw})


@pytest.mark.parametrize("kind", ["vae", pytest.param("ncode", marks=pytest.mark.slow)])
def test_train_and_resume_matches_uninterrupted(kind, tmp_path, monkeypatch):
    cfg = tiny_config(model=kind)
    straight = autoencode.train_and_evaluate(cfg, tmp_path / "a", progress=False)
    assert straight["steps"] == 12 and 0 < straight["test_mse"] < 0.3

    # killed at the end of epoch 1 (6 steps of 32 out of 192 examples)
    saves, resumed = kill_and_resume(
        monkeypatch, lambda: autoencode.train_and_evaluate(cfg, tmp_path / "b", progress=False),
        kill_after_step=6)
    assert saves == [3, 6]
    assert resumed["steps"] == 12
    assert resumed["test_mse"] == pytest.approx(straight["test_mse"], rel=1e-5)
    va, vb = load_run(tmp_path / "a").params, load_run(tmp_path / "b").params
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
    if kind == "vae":
        with pytest.raises(CheckpointError, match="does not fit this model"):
            load_run(tmp_path / "b", latent_dim=6)  # the checkpoint has latent size 4
        with pytest.raises(ValueError, match="different configuration"):
            autoencode.train_and_evaluate(tiny_config(model=kind, latent_dim=6), tmp_path / "b",
                                          progress=False)


def test_cli(tmp_path, capsys):
    rc = autoencode.main(["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir", str(tmp_path),
                          "--set", "epochs=0"])
    assert rc == 2 and "epochs=0 is out of range" in capsys.readouterr().err
    rc = autoencode.main(["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir", str(tmp_path),
                          "--set", "model=gan"])
    assert rc == 2 and "unknown model 'gan'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no config.json"):
        load_run(tmp_path)


def test_eval_rejects_more_components_than_codes(tmp_path, capsys):
    from train import autoencode_eval

    # only the config is needed: the check runs before any model is loaded
    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "config.json").write_text(json.dumps({"task": "autoencode",
                                                             "config": {**TINY, "model": "ae"}}))
    rc = autoencode_eval.main(["--workdir", str(tmp_path), "--components", "10,500"])
    err = capsys.readouterr().err
    assert rc == 2 and "[500] components to the 192 latent codes of the train split" in err
    rc = autoencode_eval.main(["--workdir", str(tmp_path / "nothing")])
    assert rc == 2 and "holds no trained models" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_end_to_end(tmp_path):
    from train import autoencode_eval

    rc = autoencode.main(["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir", str(tmp_path),
                          "--set", "dataset=digits", "--set", "model=all", "--set", "widths=(32,)",
                          "--set", "latent_dim=4", "--set", "epochs=1", "--set", "batch_size=32",
                          "--set", "dt=2.5", "--no-progress"])
    assert rc == 0
    rc = autoencode_eval.main(["--workdir", str(tmp_path), "--components", "2,20", "--samples", "200",
                               "--tsne-points", "100"])
    assert rc == 0
    meta = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert meta["fid_name"] == "digit-feature FID"
    got = {r["model"]: r for r in meta["results"]}
    assert set(got) == {"ae", "vae", "ncode"}
    assert set(got["vae"]["samplers"]) == {"GMM-2", "GMM-20", "KDE", "prior N(0,I)"}
    assert all(s["fid"] >= 0 for r in got.values() for s in r["samplers"].values())
    for name in ["orbit.png", "samples_ncode.png", "interpolation.png", "tsne.png", "results.md"]:
        assert (tmp_path / "eval" / name).exists(), name


def test_flow_regularisers_enter_the_autoncode_loss_only(capsys):
    """kinetic/jacobian add mean ∫ℓ dt to the AutoN-CODE training loss (reported as reg), leave the
    evaluation model plain, and are refused for models without a latent flow."""
    batch_key = jax.random.key(1)
    losses = {}
    for kw in [{}, {"kinetic": 0.01}, {"jacobian": 0.01}]:
        task = autoencode.Task(tiny_config(model="ncode", **kw))
        params, stats = task.init(jax.random.key(0))
        batch = (task.train.images[:32],)
        value_and_grad = jax.jit(jax.value_and_grad(task.loss, has_aux=True))  # jitted: 33 -> 27 s
        (loss, (metrics, _)), grads = value_and_grad(params, stats, batch, batch_key)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        assert task.model.running_cost is None  # held-out evaluation solves the plain flow
        losses[tuple(kw)] = (float(loss), float(metrics.get("reg", 0.0)), float(metrics["recon"]))
    (base, _, recon), (kin, kin_reg, kin_recon), (jac, jac_reg, _) = losses.values()
    assert kin_recon == pytest.approx(recon) and kin_reg > 0 and jac_reg > 0
    assert kin == pytest.approx(base + kin_reg, rel=1e-6) and jac == pytest.approx(base + jac_reg, rel=1e-6)
    rc = autoencode.main(["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir",
                          "/nonexistent/x", "--set", "model=ae", "--set", "kinetic=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a latent flow; the AE has none" in err and len(err.splitlines()) == 1, err


def test_every_solver_key_reaches_the_latent_flow(capsys):
    """The config's solver keys are the latent flow's (before: only t1, solver, dt, rtol, atol and
    adjoint were passed on; checkpoints, max_steps, seminorm and batch were dropped silently)."""
    cfg = tiny_config(model="ncode", checkpoints=4, max_steps=7, batch="vmap")
    task = autoencode.Task(cfg)
    want = {k: v for k, v in cfg.solve.kwargs().items() if k != "t0"}
    assert task.model.solve_options == want
    # max_steps takes effect: 4 rk4 steps of dt 2.5 cover [0, 10]; 3 do not
    task = autoencode.Task(tiny_config(model="ncode", max_steps=3))
    params, stats = task.init(jax.random.key(0))
    with pytest.raises(Exception, match="max_steps=3"):
        task.eval_sums(params, stats, task.test.images[:4], task.test.labels[:4], np.ones(4))
    rc = autoencode.main(["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir",
                          "/nonexistent/x", "--set", "model=ncode", "--set", "t0=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "starts at t0 = 0" in err and len(err.splitlines()) == 1, err
