"""Toy N-CODE training step: JAX (ncode_jax + diffrax + optax) vs PyTorch (torchdiffeq + Adam).

One training step = forward solve + backward + Adam update, on the same model (2-D state,
16-unit MLP field, γ/g with 32 hidden units), the same weights (the JAX init loaded into torch),
the same batch, solver and tolerances. Cases: {open, closed} loop × {rk4 dt=0.1, dopri5 rtol=1e-3
atol=1e-6} × {JAX ``checkpoint`` vs torch ``odeint`` (both differentiate the discrete solve),
JAX ``backsolve`` vs torch ``odeint_adjoint`` (both solve the continuous adjoint backwards)}.

JAX's step is one ``jax.jit``; torch runs eagerly with ``torch.set_num_threads(--threads)``. Both
start every timed step from the same parameters (torch's are reset outside the timed region), and
the two frameworks' steps are interleaved within each repeat so that machine load hits both
alike. Reports median ms, first-call time (JAX: trace + compile + run), forward NFE and the field
evaluations of the backward pass, the ratio torch/JAX, and both losses as a sanity check.

    python -m benchmarks.toy_step [--batch 256] [--repeats 30] [--threads 2] [--device cpu]
    python -m benchmarks.toy_step --sweep batch      # batch 32..1024 (fewer repeats)
    python -m benchmarks.toy_step --sweep horizon    # T in (0.5, 1, 2, 4)
    python -m benchmarks.toy_step --checkpoints steps  # diffrax's loop, one checkpoint per step

``--checkpoints`` sets ``solve(checkpoints=...)`` of the checkpoint adjoint: ``default`` (the
library's default: every fixed step stored while the states fit
``ncode_jax.STORED_STEPS_MAX_BYTES``, i.e. ``adjoint="stored"``; adaptive steps diffrax's
O(log n) checkpoints), ``1`` (diffrax's recomputing loop), ``steps`` (diffrax's loop with one
checkpoint per step, so no recomputation: rk4 ``ceil(T/dt)``; dopri5 :data:`ADAPTIVE_CHECKPOINTS`,
more than the toy solves take) or a number (diffrax's loop with that many checkpoints).

Writes ``benchmarks/results/toy_step[_<sweep>][<tag>].json`` and a ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ncode_jax as nc
from ncode_jax.solve import fixed_step_count

from .common import (
    RESULTS,
    CountingMLPField,
    eval_flops,
    evaluations,
    hardware_fraction,
    interleaved,
    matmul_peak,
    pick_devices,
    require_torch,
    summarize,
    time_fn,
    torch_step,
    write_results,
)

LOOPS = ("open", "closed")
SOLVERS = {"rk4": dict(solver="rk4", dt=0.1), "dopri5": dict(solver="dopri5", dt=None)}
ADAPTIVE_CHECKPOINTS = 64  # dopri5 takes 4-8 steps on these toys


def checkpoints_for(spec: str, solver_name: str, t1: float) -> int | None:
    """``solve(checkpoints=...)`` for ``--checkpoints spec`` (None: the library's default)."""
    if spec == "default":
        return None
    if spec == "steps":
        dt = SOLVERS[solver_name]["dt"]
        return ADAPTIVE_CHECKPOINTS if dt is None else fixed_step_count(0.0, t1, dt, np.float32)
    return int(spec)
PAIRS = {"checkpoint": "odeint", "backsolve": "odeint_adjoint"}  # JAX adjoint -> torch call
SWEEPS = {"batch": (32, 64, 128, 256, 512, 1024), "horizon": (0.5, 1.0, 2.0, 4.0)}




def loss_and_nfe(model, params, x0, solve_kw):
    sol = model(params, x0, **solve_kw)
    return jnp.mean((sol.x + x0) ** 2), sol.stats["nfe"]  # learn the reflection x -> -x


def jax_backward_nfe(kind, x0, params, solve_kw) -> int:
    """Field evaluations during the backward pass (recomputation or adjoint solve), counted by a
    host callback in a separately compiled, instrumented copy of the loss."""
    model = nc.NCODE.build(kind, CountingMLPField(2, 16), (2,))
    fwd = jax.jit(lambda p: loss_and_nfe(model, p, x0, solve_kw))
    both = jax.jit(jax.value_and_grad(lambda p: loss_and_nfe(model, p, x0, solve_kw), has_aux=True))
    return evaluations(both, params) - evaluations(fwd, params)


def build_case(kind, solver_name, adjoint, *, batch, t1, lr, rtol, atol, jdev, tdev, checkpoints=None):
    """The two training steps of one case, sharing weights and data."""
    import torch

    from .torch_baseline import ToyNCODE, load_jax_params

    solver, dt = SOLVERS[solver_name]["solver"], SOLVERS[solver_name]["dt"]
    solve_kw = dict(t1=t1, solver=solver, dt=dt, rtol=rtol, atol=atol, adjoint=adjoint)
    if adjoint == "checkpoint" and checkpoints is not None:
        solve_kw["checkpoints"] = checkpoints
    model = nc.NCODE.build(kind, nc.MLPField(2, 16), (2,))
    # committed to jdev, so every jit below runs there (also when another backend is the default)
    params = jax.device_put(model.init(jax.random.key(0)), jdev)
    x0 = jax.device_put(jax.random.normal(jax.random.key(1), (batch, 2)), jdev)
    opt = optax.adam(lr)
    opt_state = jax.device_put(opt.init(params), jdev)

    @jax.jit
    def jstep(p, s, x):
        (loss, nfe), g = jax.value_and_grad(lambda p_: loss_and_nfe(model, p_, x, solve_kw),
                                            has_aux=True)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, nfe

    tmodel = load_jax_params(ToyNCODE(kind), jax.device_get(params)).to(tdev)
    topt = torch.optim.Adam(tmodel.parameters(), lr=lr, fused=True)  # fastest measured here
    tx0 = torch.as_tensor(np.array(x0), device=tdev)
    torch_kw = dict(t1=t1, solver=solver, dt=dt, rtol=rtol, atol=atol, adjoint=adjoint == "backsolve")
    tstep, treset = torch_step(lambda: ((tmodel(tx0, **torch_kw) + tx0) ** 2).mean(),
                               tmodel.parameters(), topt, tdev)

    return dict(
        jax=(lambda: jstep(params, opt_state, x0), lambda: None),
        torch=(tstep, treset),
        tmodel=tmodel,
        jax_extra=(params, x0, solve_kw),
        flops=eval_flops(model, params, x0),
    )


def run_case(kind, solver_name, adjoint, *, batch, t1, repeats, args, jdev, tdev, count_backward,
             peak):
    ck = checkpoints_for(args.checkpoints, solver_name, t1) if adjoint == "checkpoint" else None
    case = build_case(kind, solver_name, adjoint, batch=batch, t1=t1, lr=args.lr, rtol=args.rtol,
                      atol=args.atol, jdev=jdev, tdev=tdev, checkpoints=ck)
    fns = {"jax": case["jax"], "torch": case["torch"]}
    row = {"loop": kind, "solver": solver_name, "dt": SOLVERS[solver_name]["dt"],
           "rtol": None if solver_name == "rk4" else args.rtol,
           "atol": None if solver_name == "rk4" else args.atol,
           "jax_adjoint": adjoint, "torch_call": PAIRS[adjoint], "batch": batch, "t1": t1,
           "jax_checkpoints": ck}
    # first calls: JAX traces + compiles; torch warms up (time_fn: first call + one timed call)
    warm = {k: time_fn(lambda c=call, r=reset: (r(), c())[1], repeats=1) for k, (call, reset) in fns.items()}
    _, _, jloss, jnfe = case["jax"][0]()
    case["torch"][1]()
    tloss = case["torch"][0]()
    tm = case["tmodel"]
    row["jax"] = {"first_call_s": warm["jax"]["compile_s"], "nfe_fwd": int(jnfe), "loss": float(jloss)}
    row["torch"] = {"first_call_s": warm["torch"]["compile_s"], "nfe_fwd": tm.last_nfe,
                    "nfe_bwd": tm.counter.nfe - tm.last_nfe, "loss": float(tloss)}
    if count_backward:
        params, x0, solve_kw = case["jax_extra"]
        row["jax"]["nfe_bwd"] = jax_backward_nfe(kind, x0, params, solve_kw)
    times = interleaved(fns, repeats)
    for k in fns:
        row[k].update(summarize(times[k]))
        model_flops = row[k]["nfe_fwd"] * case["flops"]["fwd_bwd"]
        row[k].update(hardware_fraction(model_flops, row[k]["median_ms"], peak))
    row["eval_flops"] = case["flops"]
    row["ratio_torch_over_jax"] = round(row["torch"]["median_ms"] / row["jax"]["median_ms"], 2)
    # same-repeat ratios: robust to load that changes between repeats
    row["ratio_median_of_pairs"] = round(statistics.median(
        t / j for t, j in zip(times["torch"], times["jax"])), 2)
    return row


def fmt_row(r) -> str:
    j, t = r["jax"], r["torch"]
    bwd = lambda d: "?" if d.get("nfe_bwd") is None else d["nfe_bwd"]  # noqa: E731
    ck = "" if r.get("jax_checkpoints") is None else f" ck={r['jax_checkpoints']}"
    return (f"{r['loop']:6s} {r['solver']:6s} {r['jax_adjoint'] + ck:16s}/{r['torch_call']:14s} "
            f"B={r['batch']:<5d} T={r['t1']:<4g} JAX {j['median_ms']:8.2f} ms (nfe {j['nfe_fwd']:3d}+"
            f"{bwd(j)!s:>3s}, first {j['first_call_s']:5.2f} s)  torch {t['median_ms']:8.2f} ms "
            f"(nfe {t['nfe_fwd']:3d}+{bwd(t)!s:>3s})  peak% {100 * j['fraction_of_matmul_peak']:.2f}/"
            f"{100 * t['fraction_of_matmul_peak']:.2f}  torch/JAX {r['ratio_torch_over_jax']:5.2f}  "
            f"loss {j['loss']:.5f}/{t['loss']:.5f}")


def plot_main(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    all_ms = [r[k]["median_ms"] for r in rows for k in ("jax", "torch")]
    for ax, loop in zip(axes, LOOPS):
        rs = [r for r in rows if r["loop"] == loop]
        x = np.arange(len(rs))
        jm = [r["jax"]["median_ms"] for r in rs]
        tm = [r["torch"]["median_ms"] for r in rs]
        ax.bar(x - 0.2, jm, 0.4, label="JAX (jit, diffrax)", color="tab:blue")
        ax.bar(x + 0.2, tm, 0.4, label="PyTorch (torchdiffeq)", color="tab:orange")
        for i, r in enumerate(rs):
            ax.text(i, max(jm[i], tm[i]) * 1.08, f"{r['ratio_torch_over_jax']:.1f}×", ha="center",
                    fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['solver']}\n{r['jax_adjoint']}\nvs {r['torch_call']}\n"
                            f"fwd NFE {r['jax']['nfe_fwd']}/{r['torch']['nfe_fwd']}" for r in rs],
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(min(all_ms) / 1.6, max(all_ms) * 2.0)
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_title(f"{loop} loop")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].set_ylabel("ms per training step (median)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title + "  (number above bars: torch / JAX)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows, key, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.6), sharex=True)
    colors = {("rk4", "checkpoint"): "tab:blue", ("rk4", "backsolve"): "tab:green",
              ("dopri5", "checkpoint"): "tab:red", ("dopri5", "backsolve"): "tab:purple"}
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    xs_all = sorted({r[key] for r in rows})
    for col, loop in enumerate(LOOPS):
        ax, axr = axes[0, col], axes[1, col]
        for (solver, adjoint), c in colors.items():
            rs = sorted((r for r in rows if r["loop"] == loop and r["solver"] == solver
                         and r["jax_adjoint"] == adjoint), key=lambda r: r[key])
            if not rs:
                continue
            xs = [r[key] for r in rs]
            lab = f"{solver} {adjoint}/{PAIRS[adjoint]}"
            ax.plot(xs, [r["jax"]["median_ms"] for r in rs], "-o", color=c, label=f"JAX {lab}")
            ax.plot(xs, [r["torch"]["median_ms"] for r in rs], "--s", color=c, mfc="none",
                    label=f"torch {lab}")
            axr.plot(xs, [r["ratio_torch_over_jax"] for r in rs], "-o", color=c, label=lab)
        ax.set_title(f"{loop} loop")
        ax.set_ylabel("ms per training step (median)")
        axr.axhline(1.0, color="k", lw=1.0)
        axr.set_ylabel("torch / JAX  (>1: JAX faster)")
        axr.set_xlabel({"batch": "batch size", "t1": "horizon T"}[key])
        for a in (ax, axr):
            a.set_xscale("log")
            a.set_yscale("log")
            a.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            a.yaxis.set_major_formatter(fmt)
            a.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            a.grid(alpha=0.3, which="both")
        lo = min(0.8, min(r["ratio_torch_over_jax"] for r in rows) / 1.2)
        axr.set_ylim(lo, max(r["ratio_torch_over_jax"] for r in rows) * 1.3)
        axr.set_xticks(xs_all)
        axr.set_xticklabels([f"{v:g}" for v in xs_all])
        axr.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title + "  (solid: JAX, dashed: PyTorch)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--t1", type=float, default=1.0, help="horizon T")
    p.add_argument("--repeats", type=int, default=None, help="default 30, or 7 in a sweep")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (JAX uses all cores)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--sweep", choices=tuple(SWEEPS), default=None)
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    p.add_argument("--solvers", nargs="+", choices=tuple(SOLVERS), default=list(SOLVERS))
    p.add_argument("--adjoints", nargs="+", choices=tuple(PAIRS), default=list(PAIRS),
                   help="JAX adjoints (checkpoint pairs with odeint, backsolve with odeint_adjoint)")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--checkpoints", default="default",
                   help="checkpoint adjoint: 'default' (diffrax, recomputes), 'steps' (none) or N")
    p.add_argument("--no-backward-count", action="store_true",
                   help="skip the instrumented JAX run that counts backward field evaluations")
    args = p.parse_args(argv)
    require_torch("benchmarks.toy_step")
    import torch

    torch.set_num_threads(args.threads)
    jdev, tdev = pick_devices(args.device)
    repeats = args.repeats if args.repeats is not None else (7 if args.sweep else 30)
    count_backward = not args.no_backward_count and args.sweep is None
    points = [(args.batch, args.t1)]
    if args.sweep == "batch":
        points = [(b, args.t1) for b in SWEEPS["batch"]]
    elif args.sweep == "horizon":
        points = [(args.batch, t) for t in SWEEPS["horizon"]]
    print(f"JAX {jax.__version__} on {jdev} | torch {torch.__version__} on {tdev}, "
          f"{torch.get_num_threads()} thread(s) | repeats {repeats}", flush=True)
    load_start = os.getloadavg()
    with jax.default_device(jdev):
        peak_before = matmul_peak()
    print(f"f32 matmul peak: {peak_before['gflops']:.1f} GFLOP/s", flush=True)
    rows = []
    for batch, t1 in points:
        for kind in args.loops:
            for solver_name in args.solvers:
                for adjoint in args.adjoints:
                    row = run_case(kind, solver_name, adjoint, batch=batch, t1=t1, repeats=repeats,
                                   args=args, jdev=jdev, tdev=tdev, count_backward=count_backward,
                                   peak=peak_before["gflops"])
                    rows.append(row)
                    print(fmt_row(row), flush=True)
    name = "toy_step" + (f"_{args.sweep}" if args.sweep else "") + args.tag
    settings = {k: v for k, v in vars(args).items()}
    settings["repeats"] = repeats
    settings["torch"] = torch.__version__
    settings["loadavg_1_5_15_start_end"] = [list(load_start), list(os.getloadavg())]
    settings["jax_cpu_threads"] = "XLA default (all cores)"
    settings["nfe_notes"] = (
        "nfe_fwd: field evaluations of the forward solve (JAX stats['nfe'], torch: call counter). "
        "nfe_bwd: field evaluations made during the backward pass (JAX: counted by a host "
        "callback in an instrumented copy; checkpoint = recomputation from checkpoints, "
        "backsolve = adjoint solve, each a VJP; torch odeint: 0, autograd replays the stored "
        "graph; odeint_adjoint: adjoint solve)")
    settings["flops_notes"] = (
        "eval_flops: XLA cost analysis of one right-hand-side evaluation (fwd) and of it with its VJP "
        "w.r.t. state and parameters (fwd_bwd). model_gflop = nfe_fwd * fwd_bwd (no checkpoint "
        "recomputation counted); fraction = achieved GFLOP/s / f32 matmul peak measured before the "
        "cases (matmul_peak.before).")
    with jax.default_device(jdev):
        peak_after = matmul_peak()
    out = write_results(name, {"settings": settings, "rows": rows,
                               "matmul_peak": {"before": peak_before, "after": peak_after}})
    fixed = {"batch": f"T={args.t1:g}", "horizon": f"batch={args.batch}",
             None: f"batch={args.batch}, T={args.t1:g}"}[args.sweep]
    title = f"Toy N-CODE training step, {args.device}, torch threads={args.threads}, {fixed}"
    png = RESULTS / f"{name}.png"
    if args.sweep is None:
        plot_main(rows, png, title)
    else:
        plot_sweep(rows, "batch" if args.sweep == "batch" else "t1", png, title)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
