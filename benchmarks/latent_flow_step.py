"""AutoN-CODE latent flow training step: JAX (ncode_jax ``SparseLinearField`` + diffrax + optax)
vs PyTorch (``benchmarks/torch_baseline/latent_flow.py`` + torchdiffeq + Adam).

A miniature AutoN-CODE (paper sec. 5.3) with linear encoder and decoder so that the latent flow
is what is measured: ``θ = u W_e + b_e`` (2n entries per sample), ``dx/dt = A(θ) x`` with two
non-zeros per row on ``[0, T = 10]`` from the constant ``x(0) = 1/√n``, ``û = x(T) W_d + b_d``,
loss ``mean((û − u)²)``, Adam on ``W_e, b_e, W_d, b_d``. Random inputs ``u`` (784 features),
latent size n (25 for MNIST in the paper), the same initial weights on both sides. Cases: rk4
with ``--dt`` (fixed NFE) and dopri5 (``--rtol``/``--atol``) × {JAX checkpoint vs torch
``odeint``, JAX backsolve vs torch ``odeint_adjoint``}. Medians of interleaved repeats after a
warm-up call; first-call time separately.

    python -m benchmarks.latent_flow_step [--batch 256] [--latent 25] [--dt 0.25] [--repeats 20]
                                          [--threads 2] [--device cpu] [--solvers rk4 dopri5]

Writes ``benchmarks/results/latent_flow_step<tag>.json`` and a ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ncode_jax as nc

from .common import (
    RESULTS,
    interleaved,
    pick_devices,
    require_torch,
    summarize,
    time_fn,
    torch_step,
    write_results,
)

PAIRS = {"checkpoint": "odeint", "backsolve": "odeint_adjoint"}
FEATURES = 784


def build_case(solver, adjoint, *, args, jdev, tdev):
    import torch

    from .torch_baseline import LatentFlow

    n, b = args.latent, args.batch
    field = nc.SparseLinearField(n)
    dt = args.dt if solver == "rk4" else None
    solve_kw = dict(t1=args.t1, solver=solver, dt=dt, rtol=args.rtol, atol=args.atol, adjoint=adjoint)
    k = jax.random.split(jax.random.key(0), 3)
    params = {"enc": {"w": 0.1 * jax.random.normal(k[0], (FEATURES, field.num_params)) / math.sqrt(FEATURES),
                      "b": jnp.zeros(field.num_params)},
              "dec": {"w": jax.random.normal(k[1], (n, FEATURES)) / math.sqrt(n), "b": jnp.zeros(FEATURES)}}
    params = jax.device_put(params, jdev)
    u = jax.device_put(jax.random.uniform(k[2], (b, FEATURES)), jdev)
    x0 = jnp.full((n,), 1 / math.sqrt(n))
    dyn = nc.Dynamics(field)
    opt = optax.adam(args.lr)
    opt_state = jax.device_put(opt.init(params), jdev)

    def loss_fn(p, u):
        theta = u @ p["enc"]["w"] + p["enc"]["b"]
        sol = nc.solve(dyn, jnp.broadcast_to(x0, (u.shape[0], n)), theta, **solve_kw)
        rec = sol.x @ p["dec"]["w"] + p["dec"]["b"]
        return jnp.mean((rec - u) ** 2), sol.stats["nfe"]

    @jax.jit
    def jstep(p, s, u):
        (loss, nfe), g = jax.value_and_grad(loss_fn, has_aux=True)(p, u)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, nfe

    host = jax.device_get(params)
    tp = [torch.nn.Parameter(torch.as_tensor(np.array(a), device=tdev))
          for a in (host["enc"]["w"], host["enc"]["b"], host["dec"]["w"], host["dec"]["b"])]
    flow = LatentFlow(n)
    topt = torch.optim.Adam(tp, lr=args.lr, fused=True)
    tu = torch.as_tensor(np.array(u), device=tdev)
    tx0 = torch.as_tensor(np.array(x0), device=tdev)
    torch_kw = dict(t1=args.t1, solver=solver, dt=dt, rtol=args.rtol, atol=args.atol,
                    adjoint=adjoint == "backsolve")

    def tloss():
        xt = flow(torch.addmm(tp[1], tu, tp[0]), tx0, **torch_kw)
        return ((torch.addmm(tp[3], xt, tp[2]) - tu) ** 2).mean()

    tstep, treset = torch_step(tloss, tp, topt, tdev)

    return dict(jax=(lambda: jstep(params, opt_state, u), lambda: None), torch=(tstep, treset), flow=flow)


def run_case(solver, adjoint, *, args, jdev, tdev):
    case = build_case(solver, adjoint, args=args, jdev=jdev, tdev=tdev)
    fns = {"jax": case["jax"], "torch": case["torch"]}
    row = {"solver": solver, "dt": args.dt if solver == "rk4" else None, "jax_adjoint": adjoint,
           "torch_call": PAIRS[adjoint], "batch": args.batch, "latent": args.latent, "t1": args.t1}
    warm = {k: time_fn(lambda c=call, r=reset: (r(), c())[1], repeats=1) for k, (call, reset) in fns.items()}
    _, _, jloss, jnfe = case["jax"][0]()
    case["torch"][1]()
    tloss = case["torch"][0]()
    fl = case["flow"]
    row["jax"] = {"first_call_s": warm["jax"]["compile_s"], "nfe_fwd": int(jnfe), "loss": float(jloss)}
    row["torch"] = {"first_call_s": warm["torch"]["compile_s"], "nfe_fwd": fl.last_nfe,
                    "nfe_bwd": fl.counter.nfe - fl.last_nfe, "loss": float(tloss)}
    times = interleaved(fns, args.repeats)
    for k in fns:
        row[k].update(summarize(times[k]))
    row["ratio_torch_over_jax"] = round(row["torch"]["median_ms"] / row["jax"]["median_ms"], 2)
    row["ratio_median_of_pairs"] = round(statistics.median(
        t / j for t, j in zip(times["torch"], times["jax"])), 2)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--latent", type=int, default=25, help="latent size n (θ has 2n entries)")
    p.add_argument("--t1", type=float, default=10.0)
    p.add_argument("--dt", type=float, default=0.25, help="rk4 step size")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--solvers", nargs="+", choices=("rk4", "dopri5"), default=["rk4", "dopri5"])
    p.add_argument("--adjoints", nargs="+", choices=tuple(PAIRS), default=list(PAIRS))
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    require_torch("benchmarks.latent_flow_step")
    import torch

    jax.config.update("jax_enable_x64", False)
    torch.set_num_threads(args.threads)
    jdev, tdev = pick_devices(args.device)
    load_start = os.getloadavg()
    rows = []
    for solver in args.solvers:
        for adjoint in args.adjoints:
            r = run_case(solver, adjoint, args=args, jdev=jdev, tdev=tdev)
            rows.append(r)
            j, t = r["jax"], r["torch"]
            print(f"{solver:6s} {adjoint:10s}/{r['torch_call']:14s} JAX {j['median_ms']:8.2f} ms (nfe "
                  f"{j['nfe_fwd']}, first {j['first_call_s']:.1f} s)  torch {t['median_ms']:8.2f} ms (nfe "
                  f"{t['nfe_fwd']}+{t['nfe_bwd']})  torch/JAX {r['ratio_torch_over_jax']:.2f}  loss "
                  f"{j['loss']:.5f}/{t['loss']:.5f}", flush=True)
    settings = dict(vars(args))
    settings["torch"] = torch.__version__
    settings["loadavg_1_5_15_start_end"] = [list(load_start), list(os.getloadavg())]
    name = "latent_flow_step" + args.tag
    out = write_results(name, {"settings": settings, "rows": rows})
    png = RESULTS / f"{name}.png"
    from .conv_step import plot

    for r in rows:
        r.setdefault("kind", f"n={args.latent}")
    plot(rows, png, f"AutoN-CODE latent flow training step, {args.device}, batch {args.batch}, "
                    f"latent {args.latent}, T={args.t1:g}, torch threads={args.threads}")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
