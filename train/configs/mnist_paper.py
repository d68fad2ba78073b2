"""The paper's MNIST setting (sec. 5.2): conv block 1×1→3×3→1×1 with 50 channels, state augmented
by 10 channels, γ a 2-layer MLP with 10 hidden units, adaptive dopri5; no augmentation, constant
learning rate, read-out of the whole state. Needs the tfds ``mnist`` set prepared (``pip install -e
".[tfds]"``; on a machine with network ``tfds.builder('mnist').download_and_prepare()``). Command
(a GPU machine; hours on a CPU)::

    python -m train.classify --config train/configs/mnist_paper.py --workdir runs/mnist --set model=open

Paper's result: NODE 96.4%, ANODE 98.2%, N-CODE open 99.2% test accuracy.

Adjoint: ``backsolve``, the continuous adjoint the paper trained with: O(1) memory in the number of
steps (the checkpoint adjoint's memory grows with them: 1.32× over 8× the steps in
``benchmarks/memory.py``), and the faster of the two against PyTorch in the conv step on CPU
(torch/JAX 1.9 with ``odeint_adjoint`` vs 1.0 with ``odeint``, loaded machine, batch 64, rk4).
With adaptive dopri5 its gradient is approximate to the tolerances (a few % at rtol 1e-3 on the
toy problem, docs/design.md); no GPU measurement of accuracy or memory at equal settings exists
yet, so switch to ``--set adjoint=checkpoint`` if such a measurement favours it.
"""

from .mnist5k_cpu import get_config as _cpu


def get_config() -> dict:
    config = _cpu()
    config.update(dataset="mnist", epochs=10, batch_size=128, eval_batch_size=500, lr=1e-3,
                  hidden=50, augment=10, solver="dopri5", dt=None, rtol=1e-3, atol=1e-4, adjoint="backsolve",
                  checkpoints=None, checkpoint_every=200)
    # the paper's training: no augmentation, constant learning rate, read-out of the whole state
    config.update(random_shift=0, lr_schedule="constant", warmup_steps=0, weight_decay=0.0, pool=1)
    return config
