"""Conv-block N-CODE classifier training step: JAX (ncode_jax + diffrax + optax) vs PyTorch
(``benchmarks/torch_baseline/conv.py`` + torchdiffeq + Adam).

One training step = forward solve + read-out + cross-entropy + backward + Adam update, on the
paper's MNIST classifier (sec. 5.2: 28×28×1 images augmented by 10 zero channels, conv block
11→50→50→11 with per-sample kernels (open/closed) or shared ones (node/anode), γ/g with 10 hidden
units, linear read-out of x(T)), random images and labels, the same weights on both sides (the JAX
init loaded into torch), the same batch, solver and tolerances. Cases: kinds (default open and
closed) × solvers (default rk4 with dt = 0.25 on [0, 1]: 16 forward evaluations on both sides;
``dopri5`` adaptive with ``--rtol``/``--atol`` on request) × {JAX ``checkpoint`` vs torch
``odeint``, JAX ``backsolve`` vs torch ``odeint_adjoint``}.

JAX variants: ``--impls`` (the ``ConvBlockField`` implementation, default ``auto``; e.g.
``--impls conv_map map`` prints a before/after in one run) × ``--checkpoints`` (for
the checkpoint adjoint: ``default`` = the library's default (every fixed step stored while the
states fit ``ncode_jax.STORED_STEPS_MAX_BYTES``, i.e. ``adjoint="stored"``), ``steps`` =
diffrax's loop with one checkpoint per step (no recomputation), ``1`` = diffrax's recomputing
loop with one checkpoint, or another number of checkpoints in diffrax's loop) ×
``--xla`` (``ncode``: compiled with
:func:`ncode_jax.compiler_options`, as the training engine does; ``default``: XLA's defaults);
every JAX variant of a case is timed
interleaved with the same torch step, and the ratio is taken per variant.

``--devices N`` (CPU) runs the JAX step data-parallel over N simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set by the script; batch sharded along the
mesh axis ``data``, parameters replicated, traced under ``jax.set_mesh`` so that the per-image
loops run per device, as ``train/parallel.py`` does): the same two cores, but each device's
per-image loop keeps one core busy, where a single device's loop runs on about one core.

JAX's step is one ``jax.jit``; torch runs eagerly with ``torch.set_num_threads(--threads)`` and the
per-sample convolution ``--torch-conv`` (default ``vmap``, the fastest measured, see
``benchmarks/torch_baseline/conv.py``; several, e.g. ``--torch-conv unfold vmap grouped``, are each
timed interleaved with every JAX variant, one row per pair). Steps are interleaved per repeat;
medians after a warm-up call; first-call time (JAX: trace + compile + run) reported separately;
NFE forward and, for torch, of the backward pass.

Fraction of the hardware limit: model FLOPs per step = forward NFE × the XLA cost analysis of one
evaluation of the right-hand side with its VJP (``benchmarks.common.eval_flops``; recomputation
by checkpointing not counted, like MFU), divided by the step time and by the f32 matmul peak
measured in the same run (``benchmarks.common.matmul_peak``).

    python -m benchmarks.conv_step [--batch 64] [--repeats 5] [--threads 2] [--device cpu]
                                   [--kinds open closed] [--solvers rk4 dopri5] [--adjoints ...]
                                   [--impls conv_map map] [--checkpoints default steps]
                                   [--xla ncode default]

Writes ``benchmarks/results/conv_step<tag>.json`` and a ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import jax
import numpy as np
import optax

from ncode_jax.conv import IMPLS, resolve_impl
from ncode_jax.models.image import IMAGE_KINDS, image_classifier
from ncode_jax.solve import fixed_step_count

from .common import (
    RESULTS,
    add_xla_flag,
    eval_flops,
    hardware_fraction,
    interleaved,
    matmul_peak,
    pick_devices,
    require_torch,
    summarize,
    time_fn,
    torch_step,
    write_results,
    xla_options,
)

PAIRS = {"checkpoint": "odeint", "backsolve": "odeint_adjoint"}  # JAX adjoint -> torch call
SOLVERS = ("rk4", "dopri5")


def _with_impl(clf, impl):
    """The classifier with its conv field's implementation replaced (the model is unchanged)."""
    field = dataclasses.replace(clf.flow.field, impl=impl)
    return dataclasses.replace(clf, flow=dataclasses.replace(clf.flow, field=field))


def _checkpoints(spec: str, solver: str, args) -> int | None:
    if spec == "default" or solver != "rk4":
        return None  # the library's default (adaptive steps: diffrax's O(log n) checkpoints)
    if spec == "steps":  # diffrax's step count in float32: one checkpoint per step in diffrax's loop
        return fixed_step_count(0.0, args.t1, args.dt, np.float32)
    return int(spec)


def jax_variants(adjoint: str, solver: str, args) -> list[tuple[str, str, int | None, str]]:
    """``(label, impl, checkpoints, xla)`` of every JAX variant timed in one case (``xla``:
    ``"ncode"`` = compiled with :func:`ncode_jax.compiler_options`, ``"default"`` = XLA's own)."""
    out = []
    for impl in args.impls:
        specs = args.checkpoints if adjoint == "checkpoint" else ["default"]
        for spec in dict.fromkeys(specs):
            for xla in dict.fromkeys(args.xla):
                ck = _checkpoints(spec, solver, args)
                label = impl if adjoint != "checkpoint" else f"{impl}/ck={spec}"
                label += "" if xla == "ncode" else f"/xla={xla}"
                if (label, impl, ck, xla) not in out:
                    out.append((label, impl, ck, xla))
    return out


def build_case(kind, solver, adjoint, *, args, jdev, tdev):
    import torch

    from .torch_baseline import ConvNCODE, load_jax_params

    shape = (args.size, args.size, 1)
    clf0 = image_classifier(kind, shape, hidden=args.hidden)
    dt = args.dt if solver == "rk4" else None
    solve_kw = dict(t1=args.t1, solver=solver, dt=dt, rtol=args.rtol, atol=args.atol, adjoint=adjoint)
    params = jax.device_put(clf0.init(jax.random.key(0)), jdev)
    images = jax.device_put(jax.random.uniform(jax.random.key(1), (args.batch, *shape)), jdev)
    labels = jax.device_put(jax.random.randint(jax.random.key(2), (args.batch,), 0, 10), jdev)
    opt = optax.adam(args.lr)
    opt_state = jax.device_put(opt.init(params), jdev)

    mesh = None
    if args.devices > 1:
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = Mesh(np.array(jax.devices("cpu")[: args.devices]), ("data",))
        rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        params, opt_state = jax.device_put((params, opt_state), rep)
        images, labels = jax.device_put((images, labels), rows)

    def make_step(clf, kw, xla):
        opts = xla_options(xla, jdev.platform)
        def loss_fn(p, x, y):
            logits, sol = clf(p, x, **kw)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), sol.stats["nfe"]

        def step(p, s, x, y):
            (loss, nfe), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss, nfe

        if mesh is None:
            jstep = jax.jit(step, compiler_options=opts)
            return lambda: jstep(params, opt_state, images, labels)
        jstep = jax.jit(step, in_shardings=(rep, rep, rows, rows), out_shardings=rep,
                        compiler_options=opts)

        def call():
            with jax.set_mesh(mesh):  # the per-image loops then run per device (ncode_jax.sharding)
                return jstep(params, opt_state, images, labels)

        return call

    jax_fns = {}
    for label, impl, ck, xla in jax_variants(adjoint, solver, args):
        kw = dict(solve_kw, checkpoints=ck) if ck is not None else solve_kw
        resolved = resolve_impl(impl, devices=args.devices)  # what the step runs on its devices
        jax_fns[label] = dict(call=make_step(_with_impl(clf0, impl), kw, xla), impl=impl,
                              field=_with_impl(clf0, resolved).flow.field, resolved_impl=resolved,
                              checkpoints=ck, xla=xla)

    torch_kw = dict(t1=args.t1, solver=solver, dt=dt, rtol=args.rtol, atol=args.atol,
                    adjoint=adjoint == "backsolve")
    tx = torch.as_tensor(np.array(images), device=tdev)
    ty = torch.as_tensor(np.array(labels), device=tdev, dtype=torch.long)

    def torch_case(conv):
        """``(step, reset, model)`` of the torch step with per-sample convolution ``conv``."""
        tmodel = load_jax_params(ConvNCODE(kind, shape, hidden=args.hidden, conv_impl=conv),
                                 jax.device_get(params)).to(tdev)
        topt = torch.optim.Adam(tmodel.parameters(), lr=args.lr, fused=True)
        loss = lambda: torch.nn.functional.cross_entropy(tmodel(tx, **torch_kw), ty)  # noqa: E731
        return (*torch_step(loss, tmodel.parameters(), topt, tdev), tmodel)

    # FLOPs of one right-hand-side evaluation (+ VJP), from the loop-free twin of the field
    twin = _with_impl(clf0, "reference").flow
    flops = eval_flops(twin, params["flow"], images)
    return dict(jax=jax_fns, torch={conv: torch_case(conv) for conv in dict.fromkeys(args.torch_conv)},
                flops=flops)


def run_case(kind, solver, adjoint, *, args, jdev, tdev, peak):
    """Rows (one per JAX variant) of one (kind, solver, adjoint) case; JAX variants and torch
    interleaved, so every ratio compares steps timed side by side."""
    case = build_case(kind, solver, adjoint, args=args, jdev=jdev, tdev=tdev)
    fns = {f"jax:{k}": (v["call"], lambda: None) for k, v in case["jax"].items()}
    fns.update({f"torch:{conv}": (step, reset) for conv, (step, reset, _) in case["torch"].items()})
    warm = {k: time_fn(lambda c=call, r=reset: (r(), c())[1], repeats=1) for k, (call, reset) in fns.items()}
    trows = {}
    for conv, (step, reset, tm) in case["torch"].items():
        reset()
        tloss = step()
        trows[conv] = {"first_call_s": warm[f"torch:{conv}"]["compile_s"], "nfe_fwd": tm.last_nfe,
                       "nfe_bwd": tm.counter.nfe - tm.last_nfe, "loss": float(tloss)}
    times = interleaved(fns, args.repeats)
    for conv, trow in trows.items():
        trow.update(summarize(times[f"torch:{conv}"]))
        trow.update(hardware_fraction(trow["nfe_fwd"] * case["flops"]["fwd_bwd"], trow["median_ms"], peak))
    rows = []
    for label, v in case["jax"].items():
        _, _, jloss, jnfe = v["call"]()
        key = f"jax:{label}"
        jrow = {"first_call_s": warm[key]["compile_s"], "nfe_fwd": int(jnfe), "loss": float(jloss),
                **summarize(times[key])}
        jrow.update(hardware_fraction(jrow["nfe_fwd"] * case["flops"]["fwd_bwd"], jrow["median_ms"], peak))
        # what the implementation multiplies: Winograd's 3×3 layer does fewer products than the
        # direct-equivalent count above (ConvBlockField.flops(executed=True)), forward + 2 gradients
        field = v["field"]
        saved = 3 * (field.flops(args.batch) - field.flops(args.batch, executed=True))
        executed = jrow["nfe_fwd"] * (case["flops"]["fwd_bwd"] - saved)
        jrow.update(executed_gflop=round(executed / 1e9, 4),
                    executed_gflops=round(executed / jrow["median_ms"] / 1e6, 2))
        for conv, trow in trows.items():
            fixed = solver == "rk4"
            row = {"kind": kind, "solver": solver, "dt": args.dt if fixed else None,
                   "rtol": None if fixed else args.rtol, "atol": None if fixed else args.atol,
                   "jax_adjoint": adjoint, "torch_call": PAIRS[adjoint], "batch": args.batch, "t1": args.t1,
                   "jax_impl": v["impl"], "jax_impl_resolved": v["resolved_impl"],
                   "jax_checkpoints": v["checkpoints"], "jax_compiler_options": v["xla"], "variant": label,
                   "torch_conv": conv, "eval_flops": case["flops"], "jax": jrow, "torch": dict(trow)}
            row["ratio_torch_over_jax"] = round(trow["median_ms"] / jrow["median_ms"], 2)
            row["ratio_median_of_pairs"] = round(statistics.median(
                t / j for t, j in zip(times[f"torch:{conv}"], times[key])), 2)
            rows.append(row)
    return rows


def fmt_row(r) -> str:
    j, t = r["jax"], r["torch"]
    return (f"{r['kind']:6s} {r['solver']:6s} {r['jax_adjoint']:10s}/{r['torch_call']:14s} "
            f"{r.get('variant', ''):26s} torch conv {r.get('torch_conv', ''):7s} "
            f"B={r['batch']:<4d} JAX {j['median_ms']:8.1f} ms (nfe {j['nfe_fwd']:3d}, first "
            f"{j['first_call_s']:5.1f} s, {100 * j['fraction_of_matmul_peak']:4.1f}% of peak, executed "
            f"{j.get('executed_gflops', float('nan')):5.1f} GFLOP/s)  torch "
            f"{t['median_ms']:8.1f} ms (nfe {t['nfe_fwd']:3d}+{t['nfe_bwd']:3d}, "
            f"{100 * t['fraction_of_matmul_peak']:4.1f}%)  torch/JAX {r['ratio_torch_over_jax']:5.2f}  "
            f"loss {j['loss']:.4f}/{t['loss']:.4f}")


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.6))
    x = np.arange(len(rows))
    jm = [r["jax"]["median_ms"] for r in rows]
    tm = [r["torch"]["median_ms"] for r in rows]
    ax.bar(x - 0.2, jm, 0.4, label="JAX (jit, diffrax)", color="tab:blue")
    ax.bar(x + 0.2, tm, 0.4, label="PyTorch (torchdiffeq)", color="tab:orange")
    for i, r in enumerate(rows):
        ax.text(i, max(jm[i], tm[i]) * 1.03, f"{r['ratio_torch_over_jax']:.2f}×", ha="center", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['kind']} {r['solver']}\n{r['jax_adjoint']} {r.get('variant', '')}\n"
                        f"vs {r['torch_call']}{' (' + r['torch_conv'] + ')' if 'torch_conv' in r else ''}\n"
                        f"fwd NFE {r['jax']['nfe_fwd']}/{r['torch']['nfe_fwd']}"
                        for r in rows], fontsize=8)
    ax.set_ylabel("ms per training step (median)")
    ax.set_ylim(0, max(jm + tm) * 1.2)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title + "\n(number above bars: torch / JAX)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from .torch_baseline.conv import CONV_IMPLS, DEFAULT_CONV_IMPL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28, help="image height = width (MNIST-like, 1 channel)")
    p.add_argument("--hidden", type=int, default=50, help="conv block width")
    p.add_argument("--t1", type=float, default=1.0, help="horizon T")
    p.add_argument("--dt", type=float, default=0.25, help="rk4 step size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (JAX uses all cores)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--kinds", nargs="+", choices=IMAGE_KINDS, default=["open", "closed"])
    p.add_argument("--solvers", nargs="+", choices=SOLVERS, default=["rk4"])
    p.add_argument("--adjoints", nargs="+", choices=tuple(PAIRS), default=list(PAIRS),
                   help="JAX adjoints (checkpoint pairs with odeint, backsolve with odeint_adjoint)")
    p.add_argument("--impls", nargs="+", choices=[i for i in IMPLS if i != "reference"], default=["auto"],
                   help="ConvBlockField implementations timed (auto: map on CPU, grouped on GPU)")
    p.add_argument("--checkpoints", nargs="+", default=["default"],
                   help="checkpoint adjoint: 'default' (diffrax, O(log n), recomputes), 'steps' (one "
                        "per rk4 step: no recomputation) or a number; several values are timed side by side")
    add_xla_flag(p)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--torch-conv", nargs="+", choices=CONV_IMPLS, default=[DEFAULT_CONV_IMPL],
                   help="torch per-sample convolution(s); several are timed side by side, each "
                        "interleaved with every JAX variant")
    p.add_argument("--devices", type=int, default=1,
                   help="CPU: run the JAX step data-parallel on this many simulated CPU devices")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    args = p.parse_args(argv)
    if args.devices > 1:
        if args.device != "cpu":
            p.error("--devices simulates CPU devices; use --device cpu")
        if args.batch % args.devices:
            p.error(f"--batch {args.batch} must be divisible by --devices {args.devices}")
        # read when the CPU backend starts, i.e. at the first JAX computation below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    require_torch("benchmarks.conv_step")
    import torch

    jax.config.update("jax_enable_x64", False)
    torch.set_num_threads(args.threads)
    jdev, tdev = pick_devices(args.device)
    print(f"JAX {jax.__version__} on {jdev} | torch {torch.__version__} on {tdev}, "
          f"{torch.get_num_threads()} thread(s), conv {' '.join(args.torch_conv)} | repeats {args.repeats} | "
          f"JAX step on {args.devices} of {jax.device_count()} device(s)", flush=True)
    load_start = os.getloadavg()
    with jax.default_device(jdev):
        peak_before = matmul_peak()
    print(f"f32 matmul peak: {peak_before['gflops']:.1f} GFLOP/s", flush=True)
    rows = []
    for kind in args.kinds:
        for solver in args.solvers:
            for adjoint in args.adjoints:
                for row in run_case(kind, solver, adjoint, args=args, jdev=jdev, tdev=tdev,
                                    peak=peak_before["gflops"]):
                    rows.append(row)
                    print(fmt_row(row), flush=True)
    with jax.default_device(jdev):
        peak_after = matmul_peak()
    settings = dict(vars(args))
    settings["torch"] = torch.__version__
    settings["loadavg_1_5_15_start_end"] = [list(load_start), list(os.getloadavg())]
    settings["jax_cpu_threads"] = "XLA default (all cores)"
    settings["flops_notes"] = (
        "eval_flops: XLA cost analysis of one right-hand-side evaluation (fwd) and of it with its VJP "
        "w.r.t. state and parameters (fwd_bwd), loop-free twin of the field (impl='reference'). "
        "model_gflop = nfe_fwd * fwd_bwd (no checkpoint recomputation counted); fraction = "
        "achieved GFLOP/s / f32 matmul peak measured before the cases (matmul_peak.before).")
    name = "conv_step" + args.tag
    out = write_results(name, {"settings": settings, "matmul_peak": {"before": peak_before,
                                                                     "after": peak_after},
                               "rows": rows})
    png = RESULTS / f"{name}.png"
    plot(rows, png, f"Conv N-CODE classifier training step, {args.device}, batch {args.batch}, "
                    f"{args.size}x{args.size}, torch threads={args.threads}, "
                    f"conv={'/'.join(args.torch_conv)}")
    print(f"matmul peak before/after: {peak_before['gflops']:.1f}/{peak_after['gflops']:.1f} GFLOP/s")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
