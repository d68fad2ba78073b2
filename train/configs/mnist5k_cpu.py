"""N-CODE image classification on the embedded ``mnist5k`` set, sized for 2 CPU cores.

Smaller than the paper: 16 hidden channels instead of 50, 5 augmented channels instead of 10,
fixed-step rk4 with 4 steps on [0, 1] instead of an adaptive solver.

Command::

    python -m train.classify --config train/configs/mnist5k_cpu.py --workdir runs/mnist5k --set model=open

Expected: see the README's classification table (accuracy, NFE and wall time per model).
"""


def get_config() -> dict:
    return dict(
        dataset="mnist5k",
        model="open",
        epochs=6,
        batch_size=64,
        eval_batch_size=250,
        lr=3e-3,
        hidden=16,
        augment=5,
        gamma_hidden=(10,),
        feedback_hidden=(10,),
        act="relu",
        t1=1.0,
        solver="rk4",
        dt=0.25,
        rtol=1e-3,
        atol=1e-5,
        adjoint="checkpoint",
        seed=0,
        log_every=10,
        checkpoint_every=50,
    )
