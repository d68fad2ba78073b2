"""AutoN-CODE, vanilla AE and VAE on the embedded ``mnist5k`` set (4,000 train / 1,000 held-out
digits), sized for 2 CPU cores: the paper's MNIST coders (table A.1: MLP 400, latent 25,
Bernoulli likelihood) with a shorter budget (30 epochs instead of 50) and the latent flow solved
with fixed-step rk4 (dt 0.5, 20 steps on [0, 10]) instead of an adaptive solver.

Commands::

    python -m train.autoencode --config train/configs/autoencode_mnist5k_cpu.py \
        --workdir runs/ae5k --set model=all
    python -m train.autoencode_eval --workdir runs/ae5k

Expected (measured, 2 CPU cores shared with other jobs, load average 5-6): training 60-80 s per
model; held-out reconstruction MSE AE 0.0103, VAE 0.0133, AutoN-CODE 0.0121; digit-feature FID of
GMM-100 samples AE 15.0, VAE 30.8, AutoN-CODE 23.1 (the README's "Autoencoding and generation"
table has all samplers). The evaluation takes ~13 minutes on loaded cores, mostly the scikit-learn
mixture fits (GMM-10/100/1000 per model).
"""


def get_config() -> dict:
    return dict(dataset="mnist5k", model="ncode", coders="mnist", latent_dim=None, widths=None, kernel=None,
                likelihood="bernoulli", epochs=30, batch_size=64, eval_batch_size=500, lr=1e-3,
                t1=10.0, solver="rk4", dt=0.5, rtol=1e-4, atol=1e-6, adjoint="checkpoint",
                control_scale=0.1, seed=0, data_dir=None, train_split="train", test_split="test",
                train_examples=None, log_every=20, checkpoint_every=200)
