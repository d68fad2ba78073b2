"""N-CODE image classification on the embedded ``mnist5k`` set, sized for 2 CPU cores.

Smaller than the paper: 16 hidden channels instead of 50 (the 10 augmented channels are the
paper's), fixed-step rk4 with 4 steps on [0, 1] (16 evaluations) instead of an adaptive solver.
With only 4,000 training images the paper's plain recipe overfits (92.8% held-out after 6 epochs,
100% batch accuracy), so this config adds what a small-data run needs: random shifts of up to
2 pixels, a linear read-out of x(T) average-pooled 2×2 (still linear in x(T), 4× fewer weights),
batch 32, AdamW (weight decay 1e-4) with 100 warm-up steps and cosine decay over 10 epochs.

``checkpoints=4`` stores all 4 rk4 steps for the backward pass: the same gradient, computed
without recomputation (``solve``'s stored-steps path), 1.3× faster per step.

Command (``num_devices=2``: one CPU device per core, each running its half of the batch's
per-image loop; the same global batch and gradient, 1.35× faster again)::

    python -m train.classify --config train/configs/mnist5k_cpu.py --workdir runs/mnist5k --set model=open \
        --set num_devices=2

Expected (N-CODE open, seed 0): 97.3% held-out accuracy, 16 NFE per solve; about 1,250 training
steps at ~0.5 s each on 2 quiet cores (the README table has the measured wall times of all four
models). ``--set model=all`` runs NODE, ANODE, N-CODE open and closed under the same budget.
"""


def get_config() -> dict:
    return dict(dataset="mnist5k", model="open", epochs=10, batch_size=32, eval_batch_size=250,
                lr=3e-3, lr_schedule="cosine", warmup_steps=100, weight_decay=1e-4, random_shift=2, pool=2,
                hidden=16, augment=10, gamma_hidden=(10,), feedback_hidden=(10,), act="relu",
                t1=1.0, solver="rk4", dt=0.25, rtol=1e-3, atol=1e-5, adjoint="checkpoint", checkpoints=4,
                seed=0, log_every=10, checkpoint_every=50)
