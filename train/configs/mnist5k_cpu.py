"""N-CODE image classification on the embedded ``mnist5k`` set, sized for 2 CPU cores.

Smaller than the paper: 16 hidden channels instead of 50 (the 10 augmented channels are the
paper's), fixed-step rk4 with 3 steps on [0, 1] (12 evaluations) instead of an adaptive solver
(4 steps, 16 evaluations, took 1.25× the time per training step, measured interleaved:
217.7 vs 174.0 ms on 2 devices, for the same held-out accuracy within the ±0.5 points one seed
moves by: 96.9% against 97.0%).
With only 4,000 training images the paper's plain recipe overfits (92.8% held-out after 6 epochs,
100% batch accuracy), so this config adds what a small-data run needs: random shifts of up to
2 pixels, a linear read-out of x(T) average-pooled 2×2 (still linear in x(T), 4× fewer weights),
batch 32, AdamW (weight decay 1e-4) with 100 warm-up steps and cosine decay over 10 epochs.

The checkpoint adjoint's default (``checkpoints`` unset) stores all 3 rk4 steps for the backward
pass: the same gradient, computed without recomputation (the stored-steps integrator, by name
``adjoint="stored"``), 1.3× faster per step (measured with 4 steps).

Command (``num_devices=2``: one CPU device per core, each running its half of the batch's
per-image loop; the same global batch and gradient, 1.35× faster again with 4 steps)::

    python -m train.classify --config train/configs/mnist5k_cpu.py --workdir runs/mnist5k --set model=open \
        --set num_devices=2

Expected (N-CODE open, ``num_devices=2``, 2 CPU cores; with 2 devices the conv block's ``auto``
implementation is Winograd's): 12 NFE per solve, 1,250 training steps, **134–135 s** of wall time
including an evaluation per epoch, held-out accuracy 96.2%, 96.7%, 97.0% for seeds 0, 1, 2 (on a
machine whose matmul peak is ~300 GFLOP/s; the same config with the direct ``map`` convolution on
that machine: 150 s, and 97.2%, 95.3%, 96.3%). On the slower machine of the guide's
table, with ``map``: 97.0%, 97.0%, 97.1% in 233–238 s. One seed's accuracy moves by about ±0.5–1
point with the order of a sum, so compare seeds together. The guide "Reproducing the paper" has
all four models. ``--set model=all`` runs NODE, ANODE, ANODE with N-CODE open's parameter count
(``anode_matched``: 66 hidden channels, 62,369 parameters against open's 61,808), N-CODE open and
closed under the same budget.

With statistics (5 seeds, the same data order per seed for every model, so differences are
paired; ``results.md`` gets mean ± std, per-seed values and 95% intervals of the paired
differences, ``curves.png`` the spread over seeds)::

    python -m train.classify --config train/configs/mnist5k_cpu.py --workdir runs/mnist5k_seeds \
        --set model=all --set seed=0,1,2,3,4 --set num_devices=2
    python -m train.robustness --workdir runs/mnist5k_seeds

Expected wall time of the sweep on 2 quiet CPU cores: about 2.9 hours, 20 minutes per seed of it
the wide ANODE (0.94 s per training step against ANODE's 0.22 s; ``docs/experiments.md``). The runs
resume, so the sweep may be run in parts.
"""


def get_config() -> dict:
    return dict(dataset="mnist5k", model="open", epochs=10, batch_size=32, eval_batch_size=250,
                lr=3e-3, lr_schedule="cosine", warmup_steps=100, weight_decay=1e-4, random_shift=2, pool=2,
                hidden=16, augment=10, gamma_hidden=(10,), feedback_hidden=(10,), act="relu",
                t1=1.0, solver="rk4", dt=1 / 3, rtol=1e-3, atol=1e-5, adjoint="checkpoint",
                seed=0, log_every=10, checkpoint_every=50)
