"""Data-parallel step time vs device count: one training step of the N-CODE open-loop classifier.

The global batch is fixed (weak scaling would change the problem): each device gets
``batch / devices`` images. Each device count runs in a fresh subprocess — on CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (simulated devices that share the
machine's cores, so **no speed-up is expected on a 2-core machine**: the same FLOPs run on the
same cores, plus the gradient all-reduce); on GPU (``--platform gpu``) with ``num_devices=N`` of
the real devices. The step is the engine's train step (``train.engine.make_step``) jitted by
``train.parallel.DataParallel.jit`` (batch sharded, parameters and Adam state replicated).

Variants: ``throw`` (diffrax/equinox runtime errors on, the library default) and ``nan``
(``EQX_ON_ERROR=nan``: no error callbacks). Each ``eqx.error_if`` on a batch-sized array is a
conditional pinned to device 0, so with ``throw`` XLA gathers that array onto device 0 and
scatters it back ("Involuntary full rematerialization" warnings); ``nan`` shows the step without
those transfers.

    python -m benchmarks.scaling [--counts 1 2 4] [--batch 64] [--repeats 10] [--variants throw nan]
    python -m benchmarks.scaling --platform gpu --counts 1 2 4 8 --batch 256 --tag _gpu

Writes ``benchmarks/results/scaling<tag>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> dict:
    """One device count: compile and time the sharded train step; print a JSON line."""
    import jax
    import numpy as np
    import optax

    from benchmarks.common import time_fn
    from train import classify, engine
    from train.config import build
    from train.parallel import DataParallel

    cfg = build(classify.ClassifyConfig, dict(dataset=args.dataset, model="open", batch_size=args.batch,
                                              hidden=args.hidden, augment=args.augment, solver="rk4",
                                              dt=args.dt, adjoint=args.adjoint, num_devices=args.devices))
    task = classify.Task(cfg)
    train = task.train
    opt = optax.adam(cfg.lr)
    dp = DataParallel.create(cfg.num_devices)
    dp.check_batch(cfg.batch_size)
    step = dp.jit(engine.make_step(task, opt, jax.random.key(0)), batch_argnums=(4,))
    params, extra = task.init(jax.random.key(0))
    params, extra, opt_state = dp.replicate((params, extra, opt.init(params)))
    batch = dp.shard_batch(train.images[: args.batch], train.labels[: args.batch])

    t = time.perf_counter()
    compiled = step.lower(params, extra, opt_state, 0, batch).compile()
    compile_s = time.perf_counter() - t
    hlo = compiled.as_text()

    def run(params, opt_state):
        return compiled(params, extra, opt_state, 0, batch)[3]  # the loss: waits for the whole step

    timing = {**time_fn(run, params, opt_state, repeats=args.repeats), "compile_s": round(compile_s, 2)}
    return {"devices": dp.num_devices, "platform": jax.default_backend(),
            "device_kinds": sorted({d.device_kind for d in dp.mesh.devices.flat}),
            "eqx_on_error": os.environ.get("EQX_ON_ERROR", "raise"),
            "all_reduces": hlo.count("all-reduce("), "all_gathers": hlo.count("all-gather("),
            "loss": float(run(params, opt_state)),
            "rows_per_device": args.batch // dp.num_devices, **timing,
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params)))}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(9, 3.4))
    for variant in sorted({r["variant"] for r in rows}):
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["devices"])
        n = [r["devices"] for r in rs]
        ax_t.plot(n, [r["median_ms"] for r in rs], "o-", label=variant)
        ax_s.plot(n, [r["speedup"] for r in rs], "o-", label=variant)
    counts = sorted({r["devices"] for r in rows})
    ax_s.plot(counts, counts, "k:", label="ideal")
    ax_t.set(xlabel="devices", ylabel="median step time (ms)", title=title, xticks=counts)
    ax_s.set(xlabel="devices", ylabel="speed-up vs 1 device", title="same global batch", xticks=counts)
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--variants", nargs="+", choices=["throw", "nan"], default=["throw", "nan"])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--augment", type=int, default=5)
    p.add_argument("--dt", type=float, default=0.25)
    p.add_argument("--adjoint", default="checkpoint")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tag", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    from benchmarks.common import RESULTS, write_results

    load_start = os.getloadavg()
    rows = []
    for variant in args.variants:
        for n in args.counts:
            env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EQX_ON_ERROR")}
            env["PYTHONPATH"] = str(ROOT)
            if args.platform == "cpu":
                env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
            if variant == "nan":
                env["EQX_ON_ERROR"] = "nan"
            cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", "--devices", str(n),
                   "--dataset", args.dataset, "--batch", str(args.batch), "--hidden", str(args.hidden),
                   "--augment", str(args.augment), "--dt", str(args.dt), "--adjoint", args.adjoint,
                   "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker for {n} device(s), variant {variant} failed")
            row = {"variant": variant, **json.loads(proc.stdout.strip().splitlines()[-1]),
                   "loadavg_1_5_15": list(os.getloadavg())}
            rows.append(row)
            print(f"{variant:5s} {n} device(s): median {row['median_ms']:8.1f} ms  "
                  f"(min {row['min_ms']:.1f}, compile {row['compile_s']:.1f} s, "
                  f"{row['all_reduces']} all-reduce, {row['all_gathers']} all-gather, "
                  f"load {row['loadavg_1_5_15'][0]:.1f})", flush=True)
    for r in rows:
        base = next(b for b in rows if b["variant"] == r["variant"] and b["devices"] == min(args.counts))
        r["speedup"] = round(base["median_ms"] / r["median_ms"] * min(args.counts), 3)
    settings = {k: getattr(args, k) for k in ("counts", "platform", "variants", "dataset", "batch", "hidden",
                                               "augment", "dt", "adjoint", "repeats")}
    settings["model"] = "open"
    settings["solver"] = "rk4"
    settings["loadavg_1_5_15_start_end"] = [list(load_start), list(os.getloadavg())]
    out = write_results(f"scaling{args.tag}", {"settings": settings, "rows": rows})
    png = RESULTS / f"scaling{args.tag}.png"
    plot(rows, png, f"N-CODE open, batch {args.batch}, {args.platform}")
    print("\n| variant | devices | rows/device | median ms | speed-up | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['devices']} | {r['rows_per_device']} | {r['median_ms']:.1f} | "
              f"{r['speedup']:.2f}× | {r['compile_s']:.1f} |")
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
