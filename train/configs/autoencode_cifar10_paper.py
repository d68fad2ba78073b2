"""The paper's CIFAR-10 autoencoders (sec. 5.3, table A.1): conv 256/512/1024 (4×4 kernels, stride
2, batch norm), latent 128, MSE loss, Adam 1e-3 halved on plateaus (patience 2 epochs: not in the
paper), batch 64, 50 epochs, latent flow on [0, 10].
Needs the tfds ``cifar10`` set prepared. Commands (a GPU machine)::

    python -m train.autoencode --config train/configs/autoencode_cifar10_paper.py \
        --workdir runs/ae_cifar10 --set model=all
    python -m train.autoencode_eval --workdir runs/ae_cifar10 --inception-weights <file>

Paper (figure 9): Inception FID of AutoN-CODE samples on CIFAR-10 down to 24.19.
"""

from .autoencode_mnist5k_cpu import get_config as _cpu


def get_config() -> dict:
    config = _cpu()
    config.update(dataset="cifar10", coders="cifar10", likelihood="mse", epochs=50, batch_size=64,
                  lr_schedule="plateau", plateau_patience=2,
                  eval_batch_size=250, solver="dopri5", dt=None, rtol=1e-4, atol=1e-6,
                  checkpoint_every=1000)
    return config
