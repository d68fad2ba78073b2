"""Image classification on scikit-learn's ``digits`` (1,438 train / 359 held-out 8×8 digits), the
second embedded set: a few minutes for every model and 5 seeds on 2 CPU cores.

The recipe of ``mnist5k_cpu.py`` (conv block of 16 hidden channels, state augmented by 10, γ a
2-layer MLP of 10 hidden units, 3 fixed rk4 steps on [0, 1], read-out of x(T) average-pooled 2×2,
AdamW with weight decay 1e-4, warm-up then cosine decay, batch 32) on the 8×8 images, with 15
epochs and no random shifts (a 1-pixel shift is an eighth of the image).

Command (every model, 5 seeds; results, commands and wall times in ``docs/experiments.md``)::

    python -m train.classify --config train/configs/digits_cpu.py --workdir runs/digits \\
        --set model=all --set seed=0,1,2,3,4 --set num_devices=1
"""

from .mnist5k_cpu import get_config as _mnist5k


def get_config() -> dict:
    config = _mnist5k()
    config.update(dataset="digits", epochs=15, random_shift=0, warmup_steps=50, eval_batch_size=359,
                  log_every=20, checkpoint_every=200)
    return config
