"""The paper's MNIST setting (sec. 5.2): conv block 1×1→3×3→1×1 with 50 channels, state augmented
by 10 channels, γ a 2-layer MLP with 10 hidden units, adaptive dopri5; no augmentation, constant
learning rate, read-out of the whole state. Needs the tfds ``mnist`` set prepared (``pip install -e
".[tfds]"``; on a machine with network ``tfds.builder('mnist').download_and_prepare()``). Command
(a GPU machine; hours on a CPU)::

    python -m train.classify --config train/configs/mnist_paper.py --workdir runs/mnist --set model=open

Paper's result: NODE 96.4%, ANODE 98.2%, N-CODE open 99.2% test accuracy.
"""

from train.configs.mnist5k_cpu import get_config as _cpu


def get_config() -> dict:
    config = _cpu()
    config.update(dataset="mnist", epochs=10, batch_size=128, eval_batch_size=500, lr=1e-3,
                  hidden=50, augment=10, solver="dopri5", dt=None, rtol=1e-3, atol=1e-4,
                  checkpoint_every=200)
    # the paper's training: no augmentation, constant learning rate, read-out of the whole state
    config.update(random_shift=0, lr_schedule="constant", warmup_steps=0, weight_decay=0.0, pool=1)
    return config
