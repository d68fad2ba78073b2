"""AutoN-CODE options beyond the paper's text: latent normalisation, the halve-on-plateau schedule,
the number of controls, and generation by sampling the controls θ (float32, tiny digits runs)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import autoencode, autoencode_eval, engine

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False

TINY = dict(dataset="digits", coders="mnist", widths=(32,), latent_dim=4, epochs=2, batch_size=32,
            eval_batch_size=128, solver="rk4", dt=2.5, log_every=1, checkpoint_every=3, train_examples=32)


def tiny_task(**kw):
    return autoencode.Task(autoencode.AutoencodeConfig.from_dict({**TINY, **kw}))


def two_steps(task):
    """Two engine train steps on the task's first batch of each epoch; returns the last state."""
    opt = task.optimizer(task.total_steps)
    step = jax.jit(engine.make_step(task, opt))
    state = engine.init_state(task, opt)  # key(seed=0)
    it = task.batches()
    for i in range(2):
        state, metrics = step(state, task.prepare(next(it), i))
        assert np.isfinite(float(metrics["loss"]))
    return state.params, state.extra, state.opt_state


def test_latent_norm_normalises_the_code_at_the_decoder_input():
    task = tiny_task(model="ncode", latent_norm=True, solver="euler", dt=10.0)  # 1 step: a quick compile
    params, extra, _ = two_steps(task)
    bn = extra["decoder"]["ComponentNorm_0"]["BatchNorm_0"]
    assert np.abs(np.asarray(bn["mean"])).max() > 0  # the running statistics were updated by training
    model, variables = task.model, task.variables(params, extra)
    images = jnp.asarray(task.test.images[:8])
    z = jax.jit(model.latent)(variables, images)  # the code itself stays x(t1), unnormalised
    theta = jax.jit(model.encode)(variables, images)
    np.testing.assert_allclose(z, jax.jit(model.controls_to_latent)(theta), rtol=1e-6)
    scale = params["decoder"]["ComponentNorm_0"]["BatchNorm_0"]
    mean, var, gain, bias = (v[None] for v in (bn["mean"], bn["var"], scale["scale"], scale["bias"]))
    zn = (z - mean) / jnp.sqrt(var + 1e-5) * gain + bias
    inner = model.arch.decoder(model.image_shape)
    want = jax.nn.sigmoid(inner.apply({"params": params["decoder"]["decoder"]}, zn, train=False))
    np.testing.assert_allclose(model.decode(variables, z), want, rtol=1e-5, atol=1e-6)
    # the AE takes the option too; without it the decoder has no statistics
    assert "ComponentNorm_0" in tiny_task(model="ae", latent_norm=True).init(jax.random.key(0))[1]["decoder"]
    assert tiny_task(model="ncode").init(jax.random.key(0))[1]["decoder"] == {}


def test_plateau_schedule_halves_the_learning_rate():
    cfg = autoencode.AutoencodeConfig.from_dict({**TINY, "lr_schedule": "plateau", "plateau_patience": 1})
    opt = autoencode.make_optimizer(cfg, steps_per_epoch=2)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    g = {"w": jnp.ones(3)}
    for value in [1.0, 1.0, 1.0, 1.0]:  # epoch 1 sets the best loss, epoch 2 does not improve on it
        _, state = opt.update(g, state, params, value=jnp.float32(value))
    assert float(state[1].scale) == 0.5
    # a two-step run of the engine (one step per epoch; lr so small the loss cannot improve)
    task = tiny_task(model="ae", lr_schedule="plateau", plateau_patience=1, lr=1e-9)
    assert task.steps_per_epoch == 1
    *_, state = two_steps(task)
    assert float(state[1].scale) == 0.5
    *_, state = two_steps(tiny_task(model="ae", lr_schedule="plateau", plateau_patience=2, lr=1e-9))
    assert float(state[1].scale) == 1.0


def test_controls_per_row(capsys):
    one, two = tiny_task(model="ncode", controls_per_row=1).model, tiny_task(model="ncode").model
    assert (one.enc_dim, two.enc_dim) == (4, 8) and one.field.offsets == (0,)
    # 4 more outputs of the last layer: 32·4 weights + 4 biases, and their norm's 4 scales + 4 shifts
    assert two.num_params() - one.num_params() == 32 * 4 + 4 + 4 * 2
    rc = autoencode.main(["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir",
                          "/nonexistent/x", "--set", "model=vae", "--set", "controls_per_row=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "applies to AutoN-CODE only" in err and len(err.splitlines()) == 1


class PixelFeatures:  # a cheap feature map for the FID: the first 16 pixels
    name = "pixel FID"

    def __call__(self, images):
        return np.asarray(images).reshape(len(images), -1)[:, :16].astype(np.float64)


def test_sampling_the_controls():
    task = tiny_task(model="ncode")
    variables = task.model.init(jax.random.key(0))
    run = engine.Run(task.model, variables, task.config, 0, True, task)
    feats = PixelFeatures()
    result, _ = autoencode_eval.evaluate_model(
        run, task.train, task.test, feats, feats(task.test.images), components=(2,), n_samples=50,
        fit_split="test", kde_bandwidth=None, seed=0, controls=True, figures=False)
    entry = result["samplers"]["controls GMM-2"]
    assert entry["fit"]["dim"] == task.model.enc_dim == 8
    assert entry["fit"]["n_codes"] == task.test.num_examples
    assert np.isfinite(entry["fid"]) and entry["fid"] >= 0 and np.isfinite(result["samplers"]["GMM-2"]["fid"])
    theta = jnp.zeros((3, 8))
    assert task.model.controls_to_latent(theta).shape == (3, 4)
    np.testing.assert_allclose(task.model.controls_to_latent(theta), 1.0, rtol=1e-6)  # A = 0: x(t1) = x(0)
    with pytest.raises(ValueError, match=r"needs \(batch, 8\)"):
        task.model.controls_to_latent(jnp.zeros((3, 4)))
    ae = tiny_task(model="ae").model
    with pytest.raises(ValueError, match="only AutoN-CODE has controls"):
        ae.controls_to_latent(theta)
    assert isinstance(optax.contrib.reduce_on_plateau(), optax.GradientTransformationExtraArgs)
