"""The paper's MNIST autoencoders (sec. 5.3, table A.1): MLP 400, latent 25, Bernoulli likelihood,
Adam 1e-3, batch 64, 50 epochs, latent flow on [0, 10] with adaptive dopri5. Needs the tfds
``mnist`` set prepared (see ``mnist_paper.py``). Commands (GPU, or CPU: the coders are small)::

    python -m train.autoencode --config train/configs/autoencode_mnist_paper.py \
        --workdir runs/ae_mnist --set model=all
    python -m train.autoencode_eval --workdir runs/ae_mnist

Learning rate halved whenever the epoch-mean training loss stops improving (the paper's schedule;
its patience, 2 epochs here, and threshold are not in the paper). 2n = 50 controls (the text;
table A.1 lists 25: ``--set controls_per_row=1``), no latent normalisation (not in the paper:
``--set latent_norm=true``). The evaluation's digit-feature FID is not comparable to the paper's
Inception FIDs (figure 9).
"""

from .autoencode_mnist5k_cpu import get_config as _cpu


def get_config() -> dict:
    config = _cpu()
    config.update(dataset="mnist", epochs=50, lr_schedule="plateau", plateau_patience=2, solver="dopri5",
                  dt=None, rtol=1e-4, atol=1e-6, checkpoint_every=1000)
    return config
