"""Backsolve adjoint with and without the seminorm (Kidger et al. 2021): backward NFE and time.

``solve(..., adjoint="backsolve", seminorm=True)`` controls the backward solve's step size with
``diffrax.adjoint_rms_seminorm``: the error norm sees the re-integrated state and its adjoint but
not the parameter-gradient integrals (``∫ aᵀ ∂h/∂args dt``). One training-step gradient
(forward + backward) per case, same weights and batch on both sides:

* ``toy``: the toy N-CODE of ``benchmarks/toy_step.py`` (2-D state, ``MLPField(2, 16)``, γ/g with 32
  hidden units, loss ``mean((x(T) + x0)²)``), batch 256, open and closed loop;
* ``conv``: the paper's conv-block MNIST classifier (``image_classifier`` layout: 28×28×1 + 10
  augmented channels, block 11→50→50→11, γ with 10 hidden units, open loop), random images and
  labels, cross-entropy, batch ``--conv-batch``.

Adaptive ``dopri5`` (toy rtol 1e-3 atol 1e-6; conv rtol 1e-3 atol 1e-4, as ``conv_step``).
Reports forward NFE (``stats["nfe"]``; a counted copy agreed in a smoke run), backward NFE
(field evaluations counted by a host callback in an instrumented copy of ``value_and_grad``,
minus the forward NFE), the median time of the uninstrumented
jitted gradient (variants interleaved per repeat), and the relative difference of the gradient
from the checkpoint adjoint's (toy) or between the two backsolve variants (conv).

    python -m benchmarks.seminorm [--cases toy conv] [--repeats 20] [--conv-repeats 3]
        [--variants plain seminorm zeroed] [--toy-batches 32 256]

``zeroed`` is a proposed fix measured here without touching the library: ``seminorm=True`` with
``diffrax.adjoint_rms_seminorm`` swapped, for that solve's tracing only, for
:func:`zeroed_rms_seminorm` (the parameter channels count as zeros in the RMS mean instead of
being dropped from it).

Writes ``benchmarks/results/seminorm<tag>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import diffrax
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

import ncode_jax as nc
from ncode_jax.models import FlowClassifier

from .common import CountingConvField, CountingMLPField, evaluations, write_results

_DIFFRAX_SEMINORM = diffrax.adjoint_rms_seminorm


def zeroed_rms_seminorm(x):
    """Kidger et al.'s seminorm read literally: the RMS norm of the backward state with the
    parameter-gradient channels set to zero (their entries still count in the mean).
    ``diffrax.adjoint_rms_seminorm`` instead takes the RMS over (y, a_y) only, a mean over fewer
    entries that can exceed the full norm (then the backward solve takes *more* steps). Never
    larger than the plain RMS norm, so never more backward steps."""
    y, a_y, a_args, a_terms = x
    leaves = jax.tree.leaves((y, a_y))
    n_all = sum(jnp.size(leaf) for leaf in jax.tree.leaves(x))
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.abs(leaf))) for leaf in leaves) / max(n_all, 1))


class _Seminorm:
    """Within the block, ``solve(..., seminorm=True)`` uses ``norm`` (solve.py reads
    ``diffrax.adjoint_rms_seminorm`` at call time, i.e. at trace time)."""

    def __init__(self, norm):
        self.norm = norm

    def __enter__(self):
        diffrax.adjoint_rms_seminorm = self.norm

    def __exit__(self, *exc):
        diffrax.adjoint_rms_seminorm = _DIFFRAX_SEMINORM


VARIANTS = {"plain": (False, _DIFFRAX_SEMINORM), "seminorm": (True, _DIFFRAX_SEMINORM),
            "zeroed": (True, zeroed_rms_seminorm)}


def rel(a, b) -> float:
    fa, fb = jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0]
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def toy_case(kind, batch):
    def build(field_cls):
        return nc.NCODE.build(kind, field_cls(2, 16), (2,))

    x0 = jax.random.normal(jax.random.key(1), (batch, 2))
    params = build(nc.MLPField).init(jax.random.key(0))

    def make_loss(model, solve_kw):
        def loss(p):
            sol = model(p, x0, **solve_kw)
            return jnp.mean((sol.x + x0) ** 2), sol.stats["nfe"]
        return loss

    return build, params, make_loss, dict(t1=1.0, solver="dopri5", rtol=1e-3, atol=1e-6)


def conv_case(batch):
    shape = (28, 28, 1)

    def build(field_cls):
        field = field_cls(channels=11, height=28, width=28, hidden=50, act="relu")
        flow = nc.NCODE.build("open", field, shape, augment=10, hidden=(10,))
        return FlowClassifier(flow, 10)

    images = jax.random.uniform(jax.random.key(1), (batch, *shape))
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    params = build(nc.ConvBlockField).init(jax.random.key(0))

    def make_loss(model, solve_kw):
        def loss(p):
            logits, sol = model(p, images, **solve_kw)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), sol.stats["nfe"]
        return loss

    return build, params, make_loss, dict(t1=1.0, solver="dopri5", rtol=1e-3, atol=1e-4)


def run(name, build, params, make_loss, solve_kw, counting_cls, plain_cls, repeats, reference, variants):
    row = {"case": name, **{k: v for k, v in solve_kw.items()}}
    grads, fns = {}, {}
    for key in variants:
        semi, norm = VARIANTS[key]
        kw = dict(solve_kw, adjoint="backsolve", seminorm=semi)
        counted = build(counting_cls)
        with _Seminorm(norm):  # traced (and compiled) inside: the norm is baked in
            both = jax.jit(jax.value_and_grad(make_loss(counted, kw), has_aux=True))
            n_all = evaluations(both, params)  # forward + backward evaluations
            f = jax.jit(jax.value_and_grad(make_loss(build(plain_cls), kw), has_aux=True))
            t = time.perf_counter()
            (loss, nfe), g = jax.block_until_ready(f(params))
        row[key] = {"nfe_fwd": int(nfe), "nfe_bwd": n_all - int(nfe),
                    "loss": float(loss), "first_call_s": round(time.perf_counter() - t, 2)}
        grads[key], fns[key] = g, f
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            jax.block_until_ready(fns[k](params))
            times[k].append((time.perf_counter() - t) * 1e3)
    for k in fns:
        row[k]["median_ms"] = round(statistics.median(times[k]), 2)
        row[k]["min_ms"] = round(min(times[k]), 2)
    for k in fns:
        if k == "plain":
            continue
        row[f"time_ratio_{k}_over_plain"] = round(statistics.median(
            s / p for s, p in zip(times[k], times["plain"])), 3)
        row[f"nfe_bwd_ratio_{k}"] = round(row[k]["nfe_bwd"] / row["plain"]["nfe_bwd"], 3)
    if reference:
        ref_loss = make_loss(build(plain_cls), dict(solve_kw, adjoint="checkpoint"))
        ref = jax.jit(jax.grad(lambda p: ref_loss(p)[0]))
        g_ref = ref(params)
        row["grad_rel_err_vs_checkpoint"] = {k: rel(grads[k], g_ref) for k in grads}
    row["grad_rel_diff_vs_plain"] = {k: rel(grads[k], grads["plain"]) for k in grads if k != "plain"}
    row["repeats"] = repeats
    row["loadavg_end"] = list(os.getloadavg())
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["toy", "conv"], choices=["toy", "conv"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--conv-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--conv-repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="plain: backsolve; seminorm: seminorm=True (diffrax.adjoint_rms_seminorm); zeroed: "
                        "seminorm=True with the norm replaced by zeroed_rms_seminorm (a proposed fix)")
    p.add_argument("--toy-batches", nargs="+", type=int, default=None, help="default: --batch")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    rows = []
    if "toy" in args.cases:
        for batch in args.toy_batches or [args.batch]:
            for kind in ("open", "closed"):
                build, params, make_loss, kw = toy_case(kind, batch)
                rows.append(run(f"toy {kind} B={batch}", build, params, make_loss, kw, CountingMLPField,
                                nc.MLPField, args.repeats, reference=True, variants=args.variants))
                print(rows[-1], flush=True)
    if "conv" in args.cases:
        build, params, make_loss, kw = conv_case(args.conv_batch)
        rows.append(run(f"conv open B={args.conv_batch}", build, params, make_loss, kw, CountingConvField,
                        nc.ConvBlockField, args.conv_repeats, reference=False, variants=args.variants))
        print(rows[-1], flush=True)
    settings = dict(vars(args))
    settings["loadavg_1_5_15_start_end"] = [list(load_start), list(os.getloadavg())]
    out = write_results("seminorm" + args.tag, {"settings": settings, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
