"""The paper's CelebA 64×64 autoencoders (sec. 5.3, table A.1): conv 256/512/1024 (5×5 kernels,
stride 2, batch norm), latent 64, MSE loss, Adam 1e-3, 40 epochs, latent flow on [0, 10]; batch
16 for AutoN-CODE as in appendix A.5 (the paper used 64 for the other models:
``--set batch_size=64``).

Needs the tfds ``celeb_a`` set prepared (see ``autoencode_mnist_paper.py``); images are centre-
cropped to 140×140 and resized to 64×64 by ``ncode_jax.data.images``.

Commands (a GPU machine)::

    python -m train.autoencode --config train/configs/autoencode_celeba_paper.py \
        --workdir runs/ae_celeba --set model=ncode
    python -m train.autoencode --config train/configs/autoencode_celeba_paper.py \
        --workdir runs/ae_celeba --set model=ae,vae --set batch_size=64
    python -m train.autoencode_eval --workdir runs/ae_celeba --inception-weights <file>

Deviations: table A.1 lists an ``FC_{64*10}`` encoder head for CelebA; here the head has 2n = 128
outputs (two non-zeros per row, as in sec. 5.3, so that AutoN-CODE and the VAE have equal
parameter counts), and the decoder starts from a 16×16 map (see ``ncode_jax.models.coders``).
"""

from .autoencode_cifar10_paper import get_config as _cifar10


def get_config() -> dict:
    return {**_cifar10(), "dataset": "celeb_a", "coders": "celeba", "epochs": 40, "batch_size": 16,
            "checkpoint_every": 2000}
