"""Generic ``ModuleField`` (a Flax module, per-sample θ by ``vmap``) vs the hand-written ``MLPField``.

Same maths on both sides: Dense(hidden) → tanh → Dense(d), the ModuleField's θ a permutation of the
MLPField's (so both take identical steps). Forward + backward (``value_and_grad`` of a mean-square
loss w.r.t. x0 and θ0) of a solve with per-sample θ ``(B, P)`` (N-CODE open loop) and shared θ
``(P,)`` (NODE), f32, for fixed-step rk4 and adaptive tsit5, checkpoint and backsolve adjoints.
Calls of the two fields alternate, so their ratio is measured in the same run; the load average is
recorded before and after each case. Writes ``benchmarks/results/module_field<tag>.json``.

    python -m benchmarks.module_field [--batch 256] [--dim 2] [--hidden 16] [--repeats 30] [--tag _d32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ncode_jax as nc

from .common import write_results


class FlaxMLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden)(x)  # Dense_0: first layer (Flax names modules in creation order)
        return nn.Dense(x.shape[-1])(jnp.tanh(h))


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args(argv)
    B, D, H = args.batch, args.dim, args.hidden

    mlp = nc.MLPField(D, H)
    mod = nc.ModuleField.from_flax(FlaxMLP(H), jnp.zeros((1, D)), jax.random.key(0))

    def to_module(theta):
        w = mlp.layout.unflatten(theta)
        return mod.flatten({"Dense_0": {"kernel": w["w1"], "bias": w["b1"]},
                            "Dense_1": {"kernel": w["w2"], "bias": w["b2"]}})

    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
    base = mlp.layout.init(jax.random.key(1))
    thetas = {"per-sample": base + 0.1 * jnp.asarray(rng.standard_normal((B, mlp.num_params)), jnp.float32),
              "shared": base}
    rows = []
    print(f"batch {B}, dim {D}, hidden {H}, P {mlp.num_params}; load average (1/5/15 min) {_load()}")
    for which, theta in thetas.items():
        for solver, dt in [("rk4", 0.1), ("tsit5", None)]:
            for adjoint in ["checkpoint", "backsolve"]:
                load_before = _load()
                fns = {}
                for name, field, th in [("MLPField", mlp, theta), ("ModuleField", mod, to_module(theta))]:
                    def loss(x0_, th_, field=field, solver=solver, dt=dt, adjoint=adjoint):
                        sol = nc.solve(nc.Dynamics(field), x0_, th_, solver=solver, dt=dt, adjoint=adjoint)
                        return jnp.mean(sol.x**2), sol.stats["nfe"]

                    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
                    t = time.perf_counter()
                    (_, nfe), _ = jax.block_until_ready(fn(x0, th))
                    fns[name] = (fn, th, round(time.perf_counter() - t, 2), int(nfe))
                times = {k: [] for k in fns}
                for r in range(args.repeats):
                    for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                        fn, th, _, _ = fns[k]
                        t = time.perf_counter()
                        jax.block_until_ready(fn(x0, th))
                        times[k].append((time.perf_counter() - t) * 1e3)
                med = {k: statistics.median(v) for k, v in times.items()}
                row = {"theta": which, "solver": solver, "dt": dt, "adjoint": adjoint,
                       **{f"{k}_ms": round(v, 3) for k, v in med.items()},
                       **{f"{k}_compile_s": fns[k][2] for k in fns},
                       "nfe": {k: fns[k][3] for k in fns},
                       "ratio_module_over_mlp": round(med["ModuleField"] / med["MLPField"], 3),
                       "load_before": load_before, "load_after": _load()}
                rows.append(row)
                nfe = f"{fns['MLPField'][3]}/{fns['ModuleField'][3]}"
                print(f"{which:10s} {solver:5s} dt={dt!s:4s} {adjoint:10s} "
                      f"MLPField {med['MLPField']:8.2f} ms  ModuleField {med['ModuleField']:8.2f} ms  "
                      f"ratio {row['ratio_module_over_mlp']:.2f}x  nfe {nfe}  "
                      f"load {load_before} -> {row['load_after']}", flush=True)
    out = write_results(f"module_field{args.tag}",
                        {"batch": B, "dim": D, "hidden": H, "repeats": args.repeats, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
