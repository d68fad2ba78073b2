"""The paper's CIFAR-10 setting (sec. 5.2): ``mnist_paper.py`` on 32×32×3 images, 20 epochs; needs
the tfds ``cifar10`` set prepared; the backsolve adjoint, as there. Command (a GPU machine)::

    python -m train.classify --config train/configs/cifar10_paper.py --workdir runs/cifar10 --set model=open

Paper's result: NODE 53.7%, ANODE 60.6%, N-CODE open 66.7% test accuracy.
"""

from .mnist_paper import get_config as _mnist


def get_config() -> dict:
    config = _mnist()
    config.update(dataset="cifar10", epochs=20)
    return config
