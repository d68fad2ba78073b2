"""Subprocess side of tests/test_parallel.py (JAX's device count and jax.distributed must be set
before JAX starts, so these checks run in fresh interpreters).

    python tests/parallel_worker.py equivalence CASE [CASE ...]   # needs XLA_FLAGS device count
    python tests/parallel_worker.py train --workdir DIR --out FILE [--set key=value ...]
    python tests/parallel_worker.py toy --out FILE
    python tests/parallel_worker.py autoencode --workdir DIR --out FILE   # needs XLA_FLAGS device count

``equivalence`` prints one JSON line per case: relative errors of the loss, the gradients and the
Adam-updated parameters between the single-device step and the step sharded over every device.
A case is a function returning ``(loss_fn, params, batch)`` with ``loss_fn(params, batch)`` a
scalar, or a ``(scalar, aux)`` pair whose ``aux`` PyTree (e.g. updated batch-norm statistics) is
compared too, and ``batch`` a tuple of arrays sharing their leading (batch) axis.

``train`` runs ``train.classify.train_and_evaluate`` on tiny digits (multi-process when the
``JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID`` environment variables ask for it)
and writes, to ``FILE``, the steps at which this process took part in a checkpoint save, the
parameters it held at the last one (``.npz`` beside it) and its summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T0 = time.perf_counter()


def mark(what: str) -> None:
    """Phase timings on stderr (the tests print them when a worker fails)."""
    print(f"[{time.perf_counter() - T0:7.2f} s] {what}", file=sys.stderr, flush=True)


TINY = dict(dataset="digits", model="open", epochs=1, batch_size=32, eval_batch_size=128, hidden=4,
            augment=2, solver="euler", dt=0.5, log_every=1, checkpoint_every=100, train_examples=64)


def ncode_open_classifier():
    """N-CODE open-loop classifier on 8x8 digits (batch 16), float32."""
    import optax

    from ncode_jax.data import load_dataset
    from ncode_jax.models.image import image_classifier

    ds = load_dataset("digits", "train", normalize=True)
    images, labels = ds.images[:16], ds.labels[:16]
    model = image_classifier("open", images.shape[1:], 10, hidden=4, augment=2)
    params = model.init(__import__("jax").random.key(0))

    def loss_fn(params, batch):
        images, labels = batch
        logits, _ = model(params, images, t1=1.0, solver="rk4", dt=0.25, adjoint="checkpoint")
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss_fn, params, (images, labels)


def node_classifier():
    """NODE classifier (one shared θ) on 8x8 digits: its kernel gradient is a scan over images."""
    loss_fn, _, batch = ncode_open_classifier()
    import jax
    import optax

    from ncode_jax.models.image import image_classifier

    model = image_classifier("node", batch[0].shape[1:], 10, hidden=4, augment=2)

    def node_loss(params, batch):
        images, labels = batch
        logits, _ = model(params, images, t1=1.0, solver="rk4", dt=0.25, adjoint="checkpoint")
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return node_loss, model.init(jax.random.key(0)), batch


def autoncode():
    """AutoN-CODE with the 'small' conv coders (narrowed to widths 4/8/8, latent 4) on 8x8 digits
    (batch 16), float32: batch norm in encoder and decoder, so ``aux`` holds the batch statistics
    the train step keeps (their batch mean/variance must be those of the global batch)."""
    import jax

    from ncode_jax.data import load_dataset
    from ncode_jax.models.autoencoder import autoencoder
    from ncode_jax.models.coders import architecture

    images = load_dataset("digits", "train").images[:16]
    model = autoencoder("ncode", architecture("small", latent_dim=4, widths=(4, 8, 8)), images.shape[1:],
                        t1=10.0, solver="rk4", dt=2.5, adjoint="checkpoint")
    variables = model.init(jax.random.key(0))

    def loss_fn(params, batch):
        (images,) = batch
        loss, (metrics, stats) = model.loss({"params": params, "batch_stats": variables["batch_stats"]},
                                            images, train=True)
        return loss, {"metrics": metrics, "batch_stats": stats}

    return loss_fn, variables["params"], (images,)


CASES = {"ncode_open_classifier": ncode_open_classifier, "node_classifier": node_classifier,
         "autoncode": autoncode}
# Adam's first step, lr * g / (|g| + eps), turns rounding noise into +-lr wherever the true gradient
# is 0 (AutoN-CODE: every bias right before a batch norm; measured params_rel 0.038 from those
# leaves though grads agree to 3e-6), so that case checks the update with plain SGD.
OPTIMIZERS = {"autoncode": "sgd"}
DEFAULT_CASES = ["ncode_open_classifier", "autoncode"]


def compare_sharded_step(loss_fn, params, batch, *, lr: float = 1e-3, optimizer: str = "adam") -> dict:
    """Relative errors between one Adam step on one device and the same step data-parallel over
    all devices (batch sharded, params and optimizer state replicated), on the same global batch."""
    import jax
    import optax

    from train.parallel import DataParallel

    opt = getattr(optax, optimizer)(lr)
    has_aux = isinstance(jax.eval_shape(loss_fn, params, batch), tuple)

    def step(params, batch):
        (loss, aux), grads = jax.value_and_grad(
            loss_fn if has_aux else lambda p, b: (loss_fn(p, b), None), has_aux=True)(params, batch)
        updates, _ = opt.update(grads, opt.init(params), params)
        return loss, grads, optax.apply_updates(params, updates), aux

    single = jax.device_get(jax.jit(step)(params, batch))
    dp = DataParallel.create()
    sharded_step = dp.jit(step, batch_argnums=(1,))
    placed_batch, placed_params = dp.shard_batch(*batch), dp.replicate(params)
    compiled = sharded_step.lower(placed_params, placed_batch).compile()  # one compile: HLO + run
    hlo = compiled.as_text()
    sharded = jax.device_get(compiled(placed_params, placed_batch))

    def rel(a, b):
        """Max over leaves of ||x - y|| / max(||y||, 1% of the whole tree's norm): a leaf far
        smaller than the rest (a bias right before a batch norm, whose true gradient is 0 and whose
        computed one is rounding noise ~1e-7 on either side) is measured against the tree's scale."""
        pairs = [(np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
        floor = max(1e-2 * float(np.sqrt(sum(np.sum(y**2) for _, y in pairs))), 1e-30)
        return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), floor)) for x, y in pairs)

    return {"num_devices": dp.num_devices,
            "shards_per_batch": len(placed_batch[0].addressable_shards),
            "all_reduce_in_hlo": "all-reduce" in hlo,
            "all_gather_shapes": sorted({line.split("=")[1].split("all-gather(")[0].strip()
                                         for line in hlo.splitlines() if "all-gather(" in line}),
            "loss": float(single[0]), "loss_rel": rel(sharded[0], single[0]),
            "grads_rel": rel(sharded[1], single[1]), "params_rel": rel(sharded[2], single[2]),
            "aux_rel": rel(sharded[3], single[3]) if has_aux else None,
            "aux_leaves": len(jax.tree.leaves(single[3])),
            "dtype": str(jax.tree.leaves(single[1])[0].dtype), "optimizer": optimizer}


def run_equivalence(cases: list[str]) -> None:
    for name in cases:
        loss_fn, params, batch = CASES[name]()
        print(json.dumps({"case": name, **compare_sharded_step(loss_fn, params, batch,
                                                               optimizer=OPTIMIZERS.get(name, "adam"))}),
              flush=True)
    print(json.dumps({"case": "errors", **error_messages()}), flush=True)


def error_messages() -> dict:
    """The messages of the checks on batch size and device count (all devices: 4 here)."""
    import tempfile

    from train import autoencode, classify
    from train.parallel import DataParallel

    def message(fn) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no error"

    dp = DataParallel.create()
    cfg = classify.ClassifyConfig.from_dict(dict(TINY, batch_size=30))
    ae_cfg = autoencode.AutoencodeConfig(dataset="digits", batch_size=30)
    two = DataParallel.create(2)
    two.check_batch(30)
    with tempfile.TemporaryDirectory() as tmp:
        return {"train": message(lambda: classify.train_and_evaluate(cfg, tmp, progress=False)),
                "train_ae": message(lambda: autoencode.train_and_evaluate(ae_cfg, tmp, progress=False)),
                "shard_batch": message(lambda: dp.shard_batch(np.zeros((18, 3)))),
                "too_many": message(lambda: DataParallel.create(dp.num_devices + 1)),
                "two_devices": two.num_devices, "eval_batch_359": dp.round_up(359)}


def run_train(workdir: str, out: str, overrides: list[str]) -> None:
    from train import classify, parallel
    from train.checkpoint import Checkpointer
    from train.config import build, parse_overrides

    parallel.initialize_distributed()  # from the environment, as `python -m train.classify` does
    import jax

    saves: list[int] = []
    last: dict = {}
    real_save = Checkpointer.save

    def recording_save(self, step, state):  # observe what this process holds; save as usual
        real_save(self, step, state)
        saves.append(int(step))
        last["params"] = jax.tree.map(np.asarray, state["state"].params)

    Checkpointer.save = recording_save
    cfg = build(classify.ClassifyConfig, dict(TINY, num_devices=None), parse_overrides(overrides))
    summary = classify.train_and_evaluate(cfg, workdir, progress=False)
    leaves = jax.tree.leaves(last["params"])
    np.savez(out + ".npz", *leaves)
    Path(out).write_text(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                     "devices": jax.device_count(), "saves": saves, "summary": summary}))


def run_toy(out: str, steps: int = 3, batch: int = 8) -> None:
    """A few Adam steps of the toy open-loop N-CODE (reflection x -> -x), data-parallel over every
    device of every process (``jax.distributed`` from the environment); also the same steps on
    process 0's first device alone, as the reference. Writes the parameter sets (.npz)."""
    from train import parallel

    parallel.initialize_distributed()
    mark("jax.distributed initialised")
    import jax
    import jax.numpy as jnp
    import optax

    import ncode_jax as nc

    model = nc.NCODE.build("open", nc.MLPField(dim=2, hidden=8), data_shape=(2,))
    opt = optax.adam(1e-2)

    def step(params, opt_state, x):
        def loss_fn(p):
            sol = model(p, x, t1=1.0, solver="euler", dt=0.5, adjoint="direct")
            return jnp.mean((sol.x + x) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params0 = jax.device_get(model.init(jax.random.key(0)))
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (batch, 2)).astype(np.float32) for _ in range(steps)]

    dp = parallel.DataParallel.create()
    sharded_step = dp.jit(step, batch_argnums=(2,))
    params, opt_state = dp.replicate((params0, opt.init(params0)))
    for x in batches:
        params, opt_state, loss = sharded_step(params, opt_state, *dp.shard_batch(x))
        mark(f"sharded step, loss {float(loss):.6f}")

    np.savez(out + ".npz", *[np.asarray(a) for a in jax.tree.leaves(params)])
    ref_loss = None
    if jax.process_index() == 0:  # the reference: the same steps on this process's device alone
        with jax.default_device(jax.local_devices()[0]):
            ref, ref_state = params0, opt.init(params0)
            single_step = jax.jit(step)
            for x in batches:
                ref, ref_state, ref_loss = single_step(ref, ref_state, x)
                mark(f"single-device step, loss {float(ref_loss):.6f}")
        np.savez(out + ".ref.npz", *[np.asarray(a) for a in jax.tree.leaves(ref)])
        ref_loss = float(ref_loss)
    rows = str(dp.shard_batch(x)[0].addressable_shards[0].index[0])  # this process's part of the batch
    Path(out).write_text(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                     "devices": jax.device_count(), "rows": rows,
                                     "loss": float(loss), "ref_loss": ref_loss}))


TINY_AE = dict(dataset="digits", model="ncode", coders="mnist", widths=(32,), latent_dim=4, epochs=1,
               batch_size=32, eval_batch_size=90, solver="rk4", dt=2.5, log_every=1, checkpoint_every=100,
               train_examples=64)


def run_autoencode(workdir: str, out: str) -> None:
    """``train.autoencode.train_and_evaluate`` (AutoN-CODE, 2 steps, held-out eval in batches of
    90 padded to 92) on every device and on one device; writes both summaries, the train losses
    and the relative difference of the final checkpointed variables."""
    import jax

    from train import autoencode
    from train.engine import load_run

    runs = {}
    for name, n in (("all", None), ("one", 1)):
        cfg = autoencode.AutoencodeConfig.from_dict(dict(TINY_AE, num_devices=n))
        summary = autoencode.train_and_evaluate(cfg, Path(workdir) / name, progress=False)
        mark(f"autoencode on {summary['num_devices']} device(s)")
        rows = [json.loads(x) for x in (Path(workdir) / name / "metrics.jsonl").read_text().splitlines()]
        variables = load_run(Path(workdir) / name).params
        runs[name] = (summary, [r["loss"] for r in rows if r["kind"] == "train"], jax.tree.leaves(variables))
    # whole-tree relative difference (per leaf, the biases before a batch norm, 0 + two Adam steps
    # of +-lr from rounding noise, differ by ~100% between the runs without changing the model)
    diff = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
               for a, b in zip(runs["all"][2], runs["one"][2], strict=True))
    rel = float(np.sqrt(diff / sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in runs["one"][2])))
    Path(out).write_text(json.dumps({"summaries": {k: v[0] for k, v in runs.items()},
                                     "losses": {k: v[1] for k, v in runs.items()},
                                     "variables_rel": rel, "leaves": len(runs["one"][2])}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["equivalence", "train", "toy", "autoencode"])
    p.add_argument("cases", nargs="*")
    p.add_argument("--workdir")
    p.add_argument("--out")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    if args.mode == "equivalence":
        run_equivalence(args.cases or DEFAULT_CASES)
    elif args.mode == "toy":
        run_toy(args.out)
    elif args.mode == "autoencode":
        run_autoencode(args.workdir, args.out)
    else:
        run_train(args.workdir, args.out, args.set)


if __name__ == "__main__":
    main()
