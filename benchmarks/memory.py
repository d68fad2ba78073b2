"""Peak memory of one training step vs the number of fixed rk4 steps, per adjoint.

Toy closed-loop N-CODE (2-D state, 16-unit MLP field, g with 32 hidden units, P = 82 weights per
sample, so the ODE state is (batch, 84)) with a large batch (default 4096: one state is 1.4 MB)
so that whatever is kept of the trajectory dominates. Fixed rk4 with dt = 0.1 and T = steps·dt.
One training step = forward solve + backward + Adam update.

Two measurements, each point in a fresh subprocess:

* JAX, compiler estimate: ``jax.jit(step).lower(...).compile().memory_analysis()``;
  ``xla_peak = argument + output + temp − alias`` bytes (``temp_size_in_bytes`` is the XLA buffer
  assignment's scratch space: it holds the saved trajectory/checkpoints; arguments and outputs are
  the parameters, optimiser state and batch).
* Process peak RSS (JAX and PyTorch alike): after one warm-up step (compilation, lazy
  initialisation), the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), then
  ``ΔRSS = VmHWM − VmRSS`` over one more step. The subprocess runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so large buffers are mmap'ed and returned to the OS when freed
  (otherwise glibc keeps freed memory and a warm step shows no growth).

Adjoints: JAX ``checkpoint`` (RecursiveCheckpointAdjoint, diffrax's default O(√steps)
checkpoints), ``backsolve`` (BacksolveAdjoint), ``direct`` (DirectAdjoint); torch ``odeint``
(autograd keeps the whole tape) and ``odeint_adjoint``.

    python -m benchmarks.memory [--batch 4096] [--steps 10 20 40 80] [--threads 2]

Writes ``benchmarks/results/memory.json`` and ``memory.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

MB = 2**20
JAX_ADJOINTS = ("checkpoint", "backsolve", "direct")
TORCH_CALLS = ("odeint", "odeint_adjoint")
DT = 0.1


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(step, sync) -> dict:
    """Warm-up step, reset the peak-RSS counter, then ΔRSS over one step."""
    sync(step())
    gc.collect()
    reset = _reset_peak()
    base = _proc_status()["VmRSS"]
    t = time.perf_counter()
    sync(step())
    wall = time.perf_counter() - t
    st = _proc_status()
    return {"rss_base_mb": base / MB, "rss_peak_mb": st["VmHWM"] / MB,
            "rss_delta_mb": (st["VmHWM"] - base) / MB, "peak_reset": reset,
            "step_s": round(wall, 4)}


def worker_jax(adjoint: str, steps: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import ncode_jax as nc

    model = nc.NCODE.build("closed", nc.MLPField(2, 16), (2,))
    params = model.init(jax.random.key(0))
    x0 = jax.random.normal(jax.random.key(1), (batch, 2))
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    solve_kw = dict(t1=steps * DT, solver="rk4", dt=DT, adjoint=adjoint)

    def step(p, s, x):
        def loss_fn(p_):
            sol = model(p_, x, **solve_kw)
            return jnp.mean((sol.x + x) ** 2), sol.stats["nfe"]

        (loss, nfe), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, nfe

    compiled = jax.jit(step).lower(params, opt_state, x0).compile()
    ma = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    xla = {f: int(getattr(ma, f)) for f in fields}
    xla["xla_peak_bytes"] = (xla["argument_size_in_bytes"] + xla["output_size_in_bytes"]
                             + xla["temp_size_in_bytes"] - xla["alias_size_in_bytes"])
    nfe = int(compiled(params, opt_state, x0)[3])
    rss = _measure(lambda: compiled(params, opt_state, x0), jax.block_until_ready)
    return {"framework": "jax", "adjoint": adjoint, "steps": steps, "batch": batch, "nfe_fwd": nfe,
            **xla, **rss}


def worker_torch(call: str, steps: int, batch: int, threads: int) -> dict:
    import torch

    from .torch_baseline import ToyNCODE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ToyNCODE("closed")
    x0 = torch.randn(batch, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        xt = model(x0, t1=steps * DT, solver="rk4", dt=DT, adjoint=call == "odeint_adjoint")
        loss = ((xt + x0) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    rss = _measure(step, lambda out: out)
    return {"framework": "torch", "adjoint": call, "steps": steps, "batch": batch,
            "nfe_fwd": model.last_nfe, "nfe_total": model.counter.nfe, **rss}


def run_worker(spec: str, batch: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", spec, "--batch", str(batch),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows, steps, path, batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"checkpoint": "tab:blue", "backsolve": "tab:green", "direct": "tab:red",
              "odeint": "tab:orange", "odeint_adjoint": "tab:purple"}

    def series(fw, adj, key):
        rs = sorted((r for r in rows if r["framework"] == fw and r["adjoint"] == adj),
                    key=lambda r: r["steps"])
        return [r["steps"] for r in rs], [r[key] for r in rs]

    for adj in JAX_ADJOINTS:
        xs, ys = series("jax", adj, "xla_peak_bytes")
        a1.plot(xs, [y / MB for y in ys], "-o", color=colors[adj], label=f"JAX {adj}")
    xs = list(steps)
    per_state = batch * 84 * 4 / MB
    a1.plot(xs, [per_state * 5 * n for n in xs], ":", color="gray",
            label="5 states per step (full tape of rk4)")
    a1.set_title("JAX: XLA memory_analysis (args + out + temp − alias)")
    for adj in JAX_ADJOINTS:
        xs, ys = series("jax", adj, "rss_delta_mb")
        a2.plot(xs, ys, "-o", color=colors[adj], label=f"JAX {adj}")
    for call in TORCH_CALLS:
        xs, ys = series("torch", call, "rss_delta_mb")
        a2.plot(xs, ys, "--s", color=colors[call], label=f"torch {call}")
    a2.set_title("Peak RSS growth during one warm step (both frameworks)")
    from matplotlib.ticker import FuncFormatter

    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "235" else ""))
        ax.set_xticks(list(steps))
        ax.set_xticklabels([str(s) for s in steps])
        ax.set_xlabel("rk4 steps (dt = 0.1)")
        ax.set_ylabel("MB")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Toy closed-loop N-CODE training step, batch {batch} (state 1 sample = 84 floats)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in the workers")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        fw, adj, n = args.worker.split(":")
        res = (worker_jax(adj, int(n), args.batch) if fw == "jax"
               else worker_torch(adj, int(n), args.batch, args.threads))
        print(json.dumps(res))
        return

    from .common import RESULTS, write_results

    have_torch = not args.no_torch
    if have_torch:
        try:
            import torch  # noqa: F401
            import torchdiffeq  # noqa: F401
        except ImportError as e:
            print(f"torch extra missing ({e}); measuring JAX only")
            have_torch = False
    specs = [("jax", a) for a in JAX_ADJOINTS] + ([("torch", c) for c in TORCH_CALLS] if have_torch else [])
    rows = []
    for n in args.steps:
        for fw, adj in specs:
            r = run_worker(f"{fw}:{adj}:{n}", args.batch, args.threads)
            rows.append(r)
            xla = f"xla {r['xla_peak_bytes'] / MB:8.1f} MB (temp {r['temp_size_in_bytes'] / MB:8.1f})" \
                if fw == "jax" else " " * 34
            print(f"{fw:5s} {adj:14s} steps {n:3d} nfe {r['nfe_fwd']:3d}  {xla}  "
                  f"ΔRSS {r['rss_delta_mb']:8.1f} MB  (step {r['step_s']:.2f} s)", flush=True)

    def get(fw, adj, n, key):
        return next(r[key] for r in rows if r["framework"] == fw and r["adjoint"] == adj
                    and r["steps"] == n)

    n0, n1 = min(args.steps), max(args.steps)
    cols = [("jax", a, "xla_peak_bytes") for a in JAX_ADJOINTS] + \
           [("jax", a, "rss_delta_mb") for a in JAX_ADJOINTS] + \
           [("torch", c, "rss_delta_mb") for c in (TORCH_CALLS if have_torch else ())]

    def val(fw, adj, n, key):
        v = get(fw, adj, n, key)
        return v / MB if key.endswith("bytes") else v

    head = " | ".join(f"{fw} {adj} {'XLA' if k.endswith('bytes') else 'ΔRSS'}" for fw, adj, k in cols)
    print(f"\nMB per training step (batch {args.batch}):\n| steps | {head} |")
    print("|---" * (len(cols) + 1) + "|")
    for n in args.steps:
        print(f"| {n} | " + " | ".join(f"{val(fw, a, n, k):.1f}" for fw, a, k in cols) + " |")
    growth = {f"{fw}:{a}:{'xla' if k.endswith('bytes') else 'rss'}":
              round(val(fw, a, n1, k) / max(val(fw, a, n0, k), 1e-9), 2) for fw, a, k in cols}
    print(f"| growth {n0}→{n1} ({n1 // n0}× steps) | "
          + " | ".join(f"{growth[f'{fw}:{a}:' + ('xla' if k.endswith('bytes') else 'rss')]:.2f}×"
                       for fw, a, k in cols) + " |")
    g_bs, g_cp = growth["jax:backsolve:xla"], growth["jax:checkpoint:xla"]
    print(f"\nmeasured (XLA estimate): backsolve grows {g_bs:.2f}× over {n1 // n0}× steps "
          f"({'flat within 10%' if abs(g_bs - 1) <= 0.10 else 'NOT flat within 10%'}); checkpoint "
          f"grows {g_cp:.2f}× ({'sub-linear' if g_cp < 0.9 * n1 / n0 else 'NOT sub-linear'}); "
          f"direct grows {growth['jax:direct:xla']:.2f}×")
    out = write_results("memory", {
        "settings": {"batch": args.batch, "steps": args.steps, "dt": DT, "torch_threads": args.threads,
                     "model": "closed-loop toy N-CODE, MLPField(2, 16), g hidden (32,), state (B, 84)",
                     "xla_peak": "argument + output + temp - alias (compiled.memory_analysis())",
                     "rss": "VmHWM - VmRSS over one warm step after resetting the peak via "
                            "/proc/self/clear_refs; fresh subprocess per point; "
                            "MALLOC_MMAP_THRESHOLD_=65536"},
        "growth": growth, "rows": rows})
    png = RESULTS / "memory.png"
    plot(rows, args.steps, png, args.batch)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
