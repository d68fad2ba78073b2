"""Image classification pipeline (paper sec. 5.2): models, train step, resume, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import kill_and_resume

from ncode_jax.models.image import IMAGE_KINDS, image_classifier
from train import classify, engine

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False

TINY = dict(dataset="digits", epochs=1, batch_size=32, eval_batch_size=128, hidden=4, augment=2,
            solver="euler", dt=0.5, log_every=1, checkpoint_every=3, train_examples=192)


def tiny_config(**kw):
    return classify.ClassifyConfig.from_dict({**TINY, **kw})


@pytest.fixture(scope="module")
def digits_batch():
    from ncode_jax.data import load_dataset

    ds = load_dataset("digits", "train", normalize=True)
    return ds.images[:32], ds.labels[:32]


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in ("node", "anode") else k
                                  for k in IMAGE_KINDS])  # node/anode: same code path, -m slow
def test_loss_decreases_on_fixed_batch(kind, digits_batch):
    images, labels = digits_batch
    cfg = tiny_config(model=kind)
    task = classify.Task(cfg)
    opt = optax.adam(1e-2)
    train_step = jax.jit(engine.make_step(task, opt))
    state = engine.init_state(task, opt)  # key(seed=0)
    losses = []
    for _ in range(8):
        state, m = train_step(state, (images, labels))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(m["nfe"]) == 2  # euler, dt=0.5 on [0, 1]
    # the second and later calls reuse the compiled step
    assert train_step._cache_size() == 1


def test_models_have_expected_structure():
    node = image_classifier("node", (28, 28, 1), hidden=50, augment=10)
    anode = image_classifier("anode", (28, 28, 1), hidden=50, augment=10)
    open_ = image_classifier("open", (28, 28, 1), hidden=50, augment=10)
    assert node.flow.field.state_shape == (28, 28, 1)
    assert anode.flow.field.state_shape == (28, 28, 11)
    assert open_.flow.initial.hidden == (10,)  # γ: 2-layer MLP with 10 hidden units (paper)
    # 1x1 (11->50) + 3x3 (50->50) + 1x1 (50->11), with biases
    assert open_.flow.field.layout.size == 11 * 50 + 50 + 9 * 50 * 50 + 50 + 50 * 11 + 11


@pytest.mark.slow  # ~33 s; the engine's resume runs by default: test_autoencode_train[vae], test_workdir
def test_train_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    # with every source of step-dependence on: shifted images, lr schedule, weight decay, pooling
    cfg = tiny_config(model="open", epochs=2, random_shift=1, lr_schedule="cosine", warmup_steps=2,
                      weight_decay=1e-4, pool=2)
    straight = classify.train_and_evaluate(cfg, tmp_path / "a", progress=False)
    assert straight["steps"] == 12 and 0 <= straight["test_accuracy"] <= 1

    # killed at the end of epoch 1 (6 steps of 32 out of 192 examples)
    saves, resumed = kill_and_resume(
        monkeypatch, lambda: classify.train_and_evaluate(cfg, tmp_path / "b", progress=False),
        kill_after_step=6)
    assert saves == [3, 6]
    assert resumed["steps"] == 12
    assert resumed["test_accuracy"] == pytest.approx(straight["test_accuracy"])
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]


def test_cli_all_models_on_mock_tfds_mnist(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=64):
        rc = classify.main(["--config", "train/configs/mnist5k_cpu.py", "--workdir", str(tmp_path),
                            "--set", "dataset=mnist", "--set", "model=node,open", "--set", "hidden=4",
                            "--set", "augment=1", "--set", "epochs=1", "--set", "batch_size=32",
                            "--set", "solver=euler", "--set", "dt=1.0", "--set", "eval_batch_size=64",
                            "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| NODE |" in out and "| N-CODE open |" in out
    for name in ["summary.json", "results.md", "curves.png", "node/metrics.jsonl", "open/summary.json"]:
        assert (tmp_path / name).exists(), name


def test_bad_input_errors(digits_batch):
    images, labels = digits_batch
    cfg = tiny_config(model="open")
    model = classify.build_model(cfg, images.shape[1:], 10)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="shape"):
        model(params, jnp.zeros((4, 10, 10, 1)), **cfg.solve.kwargs())  # wrong image size
    with pytest.raises(ValueError, match="shape"):
        model(params, jnp.zeros((4, 8, 8, 3)), **cfg.solve.kwargs())  # wrong channel count
    bad = np.array(images[:4])
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(Exception, match="NaN"):
        jax.block_until_ready(jax.jit(lambda p, x: model(p, x, **cfg.solve.kwargs())[0])(params, bad))
    with pytest.raises(ValueError, match="unknown model"):
        tiny_config(model="resnet")
    with pytest.raises(ValueError, match="unknown dataset"):
        tiny_config(dataset="imagenet")
    with pytest.raises(ValueError, match="out of range"):
        tiny_config(lr=-1.0)
    with pytest.raises(ValueError, match="dt must be a positive"):
        tiny_config(dt=-1.0)


def test_cli_reports_config_errors(tmp_path, capsys):
    rc = classify.main(["--config", "train/configs/mnist5k_cpu.py", "--workdir", str(tmp_path),
                        "--set", "epochs=0"])
    assert rc == 2 and "epochs=0 is out of range" in capsys.readouterr().err
    rc = classify.main(["--config", "train/configs/mnist5k_cpu.py", "--workdir", str(tmp_path),
                        "--set", "nosuchkey=1"])
    assert rc == 2 and "unknown config key" in capsys.readouterr().err
    # keys the file leaves out take the ClassifyConfig defaults and can still be overridden
    rc = classify.main(["--config", "train/configs/mnist5k_cpu.py", "--workdir", str(tmp_path),
                        "--set", "pool=0"])
    assert rc == 2 and "pool=0 is out of range" in capsys.readouterr().err
    rc = classify.main(["--config", "train/configs/mnist5k_cpu.py", "--workdir", str(tmp_path),
                        "--set", "lr_schedule=step"])
    assert rc == 2 and "unknown lr_schedule 'step'" in capsys.readouterr().err


def test_pooled_readout_is_linear_in_the_average_pooled_state():
    model = image_classifier("anode", (8, 8, 1), hidden=4, augment=2, pool=2)
    assert model.features == 4 * 4 * 3
    params = model.init(jax.random.key(0))
    xT = jax.random.normal(jax.random.key(1), (5, 8, 8, 3))
    pooled = np.asarray(xT).reshape(5, 4, 2, 4, 2, 3).mean(axis=(2, 4)).reshape(5, -1)
    want = pooled @ np.asarray(params["head"]["w"]) + np.asarray(params["head"]["b"])
    np.testing.assert_allclose(model.readout(params, xT), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        image_classifier("anode", (8, 8, 1), hidden=4, augment=2, pool=3)


def test_make_optimizer_schedule_and_weight_decay():
    cfg = tiny_config(lr=0.1, lr_schedule="cosine", warmup_steps=10, weight_decay=0.5)
    opt = classify.make_optimizer(cfg, total_steps=100)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    zero = {"w": jnp.zeros(3)}
    updates, state = opt.update(zero, state, params)  # step 0 of the warm-up: lr 0
    np.testing.assert_allclose(updates["w"], 0.0)
    for _ in range(10):
        updates, state = opt.update(zero, state, params)
    # at the peak, a zero gradient leaves only the decoupled decay: -lr * wd * w
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones(3), rtol=1e-3)


@pytest.mark.slow  # ~30 s: two compilations of the 28×28 model
def test_winograd_trains_like_map_on_mnist5k_config():
    """A few Adam steps of the ``mnist5k_cpu`` N-CODE open model (its widths, solver and adjoint)
    with the Winograd conv block reach the same losses as with ``map`` to float32 rounding."""
    from ncode_jax.data import load_dataset
    from train.configs import mnist5k_cpu

    c = mnist5k_cpu.get_config()
    ds = load_dataset("mnist5k", "train", normalize=True)
    images, labels = ds.images[:8], ds.labels[:8]
    losses = {}
    for impl in ("map", "winograd"):
        model = image_classifier("open", images.shape[1:], 10, hidden=c["hidden"], augment=c["augment"],
                                 gamma_hidden=c["gamma_hidden"], pool=c["pool"], conv_impl=impl)
        params = model.init(jax.random.key(0))
        opt = optax.adam(c["lr"])
        opt_state = opt.init(params)

        @jax.jit
        def step(params, opt_state, model=model, opt=opt):
            def loss_fn(p):
                logits, _ = model(p, images, t1=c["t1"], solver=c["solver"], dt=c["dt"],
                                  adjoint=c["adjoint"], checkpoints=c.get("checkpoints"))
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, g = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = opt.update(g, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss

        losses[impl] = []
        for _ in range(4):
            params, opt_state, loss = step(params, opt_state)
            losses[impl].append(float(loss))
    assert losses["map"][-1] < losses["map"][0]
    np.testing.assert_allclose(losses["winograd"], losses["map"], rtol=1e-4)
