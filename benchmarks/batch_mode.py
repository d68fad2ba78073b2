"""Batch as one ODE system vs. ``vmap`` over per-sample solves (docs/design.md, "Batch as one system").

Toy closed-loop N-CODE (2-D state, 16-unit MLP field), forward + backward of a mean-square loss,
for adaptive tsit5 and fixed-step rk4, checkpoint and backsolve adjoints. Prints a table of
medians, NFE and the vmap/system ratio; writes ``benchmarks/results/batch_mode.json``.

    python -m benchmarks.batch_mode [--batch 256] [--repeats 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import ncode_jax as nc

from .common import time_fn, write_results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)

    model = nc.NCODE.build("closed", nc.MLPField(2, 16), (2,))
    params = model.init(jax.random.key(0))
    x0 = jax.random.normal(jax.random.key(1), (args.batch, 2))
    rows = []
    for solver, dt in [("tsit5", None), ("rk4", 0.1)]:
        for adjoint in ["checkpoint", "backsolve"]:
            row = {"solver": solver, "dt": dt, "adjoint": adjoint}
            for mode in ["system", "vmap"]:
                def loss(p, mode=mode, solver=solver, dt=dt, adjoint=adjoint):
                    sol = model(p, x0, solver=solver, dt=dt, adjoint=adjoint, batch=mode)
                    return jnp.mean(sol.x**2), jnp.max(sol.stats["nfe"])

                fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
                row[mode] = time_fn(fn, params, repeats=args.repeats)
                row[mode]["nfe"] = int(fn(params)[0][1])
            row["ratio_vmap_over_system"] = round(row["vmap"]["median_ms"] / row["system"]["median_ms"], 2)
            rows.append(row)
            print(f"{solver:6s} dt={dt!s:5s} {adjoint:10s} system {row['system']['median_ms']:8.2f} ms "
                  f"(nfe {row['system']['nfe']:3d})  vmap {row['vmap']['median_ms']:8.2f} ms "
                  f"(max nfe {row['vmap']['nfe']:3d})  ratio {row['ratio_vmap_over_system']:.1f}x",
                  flush=True)
    out = write_results("batch_mode", {"batch": args.batch, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
