"""Conv-block vector field: shared kernels vs per-sample kernels (docs/design.md, "Per-sample convolutions").

Forward + backward (gradient w.r.t. the state x and θ) of the paper's conv block
(1×1 C→h, ReLU, 3×3 h→h, ReLU, 1×1 h→C) on a float32 NHWC batch, for

* ``shared``       — θ ``(P,)``, ``ConvBlockField`` CPU path (convolutions + matmul kernel grad);
* ``shared_lax``   — θ ``(P,)``, plain ``lax.conv`` + autodiff (``impl="reference"``; also what
  ``impl="grouped"`` runs for shared θ);
* ``per_sample_<impl>`` — θ ``(B, P)``, one row per per-sample implementation of
  ``ConvBlockField`` (``--impls``, default all: ``map`` — the whole block under one custom VJP,
  image by image, im2col matrix products; ``conv_map`` — the previous path, batch-1 ``lax.conv``
  per image; ``grouped`` — the accelerator path, grouped convolutions + batched kernel-gradient
  matmuls);
* ``naive``        — θ ``(B, P)``, ``vmap(lax.conv)`` + autodiff (``impl="reference"``).

Every rate ("GFLOP/s") uses the SAME analytic, direct-equivalent FLOP count: 3 × the forward
multiply-adds ×2 of the shared block (all 9 taps everywhere, biases/activations ignored; XLA's
cost analysis of the ``shared_lax`` program is printed beside it). "executed" columns count what
each implementation multiplies (``ConvBlockField.flops(executed=True)``: Winograd's 3×3 layer
does half the direct count). ``--breakdown`` also times each implementation's per-sample 3×3
layer alone (``conv3x3_<impl>``) and reports the rest of the block (1×1 layers, biases,
activations, the loop) as ``rest_<impl>`` = block − 3×3 layer. The fast variants are timed in
interleaved rounds and ratios are taken within a round; the naive one (tens of seconds per call)
once. A square f32 matmul gives the machine's peak for context. With ``--torch`` the same per-sample block
(and the shared one) is timed in PyTorch for every per-sample convolution of
``benchmarks/torch_baseline/conv.py`` (forward + backward w.r.t. x and θ, same θ, NCHW,
``torch.set_num_threads(--threads)``); this picks the baseline's default. Every JAX variant is
compiled with :func:`ncode_jax.compiler_options` (as the training engine does); ``--xla ncode
default`` adds each compiled with XLA's defaults (``…_xla_default`` rows), timed in the same rounds. Writes
``benchmarks/results/conv_block.json``.

    python -m benchmarks.conv_block [--batch 64] [--size 28] [--channels 11] [--hidden 50]
                                    [--repeats 10] [--rounds 3] [--naive-repeats 1] [--skip-naive]
                                    [--impls map conv_map grouped] [--xla ncode default]
                                    [--device cpu|gpu]
                                    [--torch] [--torch-repeats 5] [--threads 2] [--tag _gpu]

On ``--device gpu`` the JAX variants run on the first GPU (``--torch`` is CPU only); the naive
variant is skipped there unless asked for with ``--naive-repeats``.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from ncode_jax import ConvBlockField
from ncode_jax.conv import per_sample_conv3x3

from .common import add_xla_flag, matmul_peak, time_fn, write_results, xla_options

PER_SAMPLE_IMPLS = ("map", "winograd", "conv_map", "grouped")
XLA_DEFAULT = "_xla_default"  # suffix of the rows compiled with XLA's default options (--xla default)


def torch_variants(args, theta, theta_b, x_nhwc, flops) -> dict:
    """Median fwd+bwd ms of the PyTorch block per per-sample convolution impl (and shared θ)."""
    import time

    import torch

    from .common import require_torch

    require_torch("benchmarks.conv_block --torch")
    from .torch_baseline.conv import CONV_IMPLS, ConvNCODE

    torch.set_num_threads(args.threads)
    s = args.size
    x = torch.as_tensor(x_nhwc).permute(0, 3, 1, 2).contiguous().requires_grad_()
    out = {}
    cases = [("shared", "unfold", theta)] + [(f"per_sample_{i}", i, theta_b) for i in CONV_IMPLS]
    for name, impl, th in cases:
        # the block of a model whose state has `channels` channels: augment = channels - 1
        m = ConvNCODE("anode", (s, s, 1), hidden=args.hidden, augment=args.channels - 1, conv_impl=impl)
        t = torch.as_tensor(np.asarray(th)).requires_grad_()
        times = []
        for _ in range(args.torch_repeats + 1):
            x.grad = t.grad = None
            t0 = time.perf_counter()
            (0.5 * (m.field(x, m.weights(t)) ** 2).sum()).backward()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times[1:])
        out[name] = {"median_ms": round(ms, 2), "min_ms": round(min(times[1:]), 2),
                     "first_ms": round(times[0], 2), "gflops": round(flops / ms / 1e6, 2),
                     "threads": args.threads}
        print(f"torch {name}: {ms:.1f} ms", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28, help="image height = width")
    p.add_argument("--channels", type=int, default=11)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (fast variants)")
    p.add_argument("--naive-repeats", type=int, default=None, help="default 1 on CPU, skipped on GPU")
    p.add_argument("--skip-naive", action="store_true", help="skip the slow vmap(conv) baseline")
    p.add_argument("--impls", nargs="+", choices=PER_SAMPLE_IMPLS, default=list(PER_SAMPLE_IMPLS),
                   help="per-sample ConvBlockField implementations timed")
    add_xla_flag(p)  # rows of the 'default' variant end in XLA_DEFAULT
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch per-sample variants (CPU)")
    p.add_argument("--torch-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each impl's 3x3 layer alone (conv3x3_<impl>) and report the rest")
    p.add_argument("--tag", default="", help="suffix for the output file name")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_x64", False)
    if args.device == "gpu":
        try:
            dev = jax.devices("gpu")[0]
        except RuntimeError as e:
            raise SystemExit(f"--device gpu: JAX has no GPU backend here ({e}); "
                             "pip install -e '.[cuda12]'") from None
        if args.torch:
            raise SystemExit("--torch times the CPU PyTorch block; run it with --device cpu")
    else:
        dev = jax.devices("cpu")[0]
    naive_repeats = args.naive_repeats
    if naive_repeats is None:
        naive_repeats = 1 if args.device == "cpu" else 0
    skip_naive = args.skip_naive or naive_repeats < 1

    b, s = args.batch, args.size
    fast = ConvBlockField(args.channels, s, s, args.hidden, impl="map")
    ref = ConvBlockField(args.channels, s, s, args.hidden, impl="reference")
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.standard_normal((b, s, s, args.channels)), jnp.float32), dev)
    theta = jax.device_put(fast.layout.init(jax.random.key(0)), dev)
    # per-sample θ: the shared one plus a per-sample perturbation of 10% of each weight's init std
    noise = jnp.asarray(rng.standard_normal((b, fast.num_params)), jnp.float32)
    theta_b = jax.device_put(theta + 0.1 * fast.layout.init_std() * noise, dev)

    def fwd_bwd(field, xla="ncode"):
        def loss(x, th):
            return 0.5 * jnp.sum(field(0.0, x, th) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=xla_options(xla, dev.platform))

    variants = {}
    impl_of = {}  # variant -> the ConvBlockField impl it runs (for its executed FLOPs)
    for xla in dict.fromkeys(args.xla):  # suffix "" = ncode_jax.compiler_options (what training uses)
        sfx = "" if xla == "ncode" else XLA_DEFAULT
        variants[f"shared{sfx}"] = (fwd_bwd(fast, xla), theta)
        variants[f"shared_lax{sfx}"] = (fwd_bwd(ref, xla), theta)
        impl_of.update({f"shared{sfx}": "map", f"shared_lax{sfx}": "reference"})
        if "winograd" in args.impls:
            wino = ConvBlockField(args.channels, s, s, args.hidden, impl="winograd")
            variants[f"shared_winograd{sfx}"] = (fwd_bwd(wino, xla), theta)
            impl_of[f"shared_winograd{sfx}"] = "winograd"
        for impl in args.impls:
            field = ConvBlockField(args.channels, s, s, args.hidden, impl=impl)
            variants[f"per_sample_{impl}{sfx}"] = (fwd_bwd(field, xla), theta_b)
            impl_of[f"per_sample_{impl}{sfx}"] = impl
    conv_only = {}  # --breakdown: the per-sample 3×3 layer alone, forward + backward (x and kernel)
    if args.breakdown:
        h_in = jnp.asarray(rng.standard_normal((b, s, s, args.hidden)), jnp.float32)
        kernels = jax.vmap(fast.layout.unflatten)(theta_b)["w2"]
        for impl in args.impls:
            def loss3(h, w, impl=impl):
                return 0.5 * jnp.sum(per_sample_conv3x3(h, w, impl) ** 2)

            fn = jax.jit(jax.grad(loss3, argnums=(0, 1)), compiler_options=xla_options("ncode", dev.platform))
            conv_only[f"conv3x3_{impl}"] = fn
            impl_of[f"conv3x3_{impl}"] = impl
        x_of = {k: h_in for k in conv_only}
        th_of = {k: kernels for k in conv_only}
    timed = list(variants) + list(conv_only)
    variants.update({k: (f, None) for k, f in conv_only.items()})
    variants["naive"] = (fwd_bwd(ref), theta_b)
    flops = 3 * fast.flops(b)
    xla_flops = variants[timed[1]][0].lower(x, theta).compile().cost_analysis().get("flops")
    print(f"conv block {args.channels}->{args.hidden}->{args.hidden}->{args.channels}, batch {b}, "
          f"{s}x{s}, f32, {dev}, forward+backward (grad x, theta): analytic {flops / 1e9:.3f} GFLOP "
          f"(XLA cost analysis of {timed[1]}: {xla_flops / 1e9:.3f})", flush=True)

    with jax.default_device(dev):
        peak_before = matmul_peak()
    print(f"f32 matmul 2048^3: {peak_before['gflops']:.1f} GFLOP/s", flush=True)

    rounds = {k: [] for k in timed}
    compile_s = {}
    ps = [k for k in timed if k.startswith("per_sample_")]
    suffix = lambda k: XLA_DEFAULT if k.endswith(XLA_DEFAULT) else ""  # noqa: E731
    per_round_ratio = {f"{k}/shared{suffix(k)}": [] for k in ps}
    per_round_ratio.update({f"{k}/per_sample_conv_map{suffix(k)}": [] for k in ps
                            if not k.startswith("per_sample_conv_map")
                            and f"per_sample_conv_map{suffix(k)}" in ps})
    per_round_ratio.update({f"{k}/{k}{XLA_DEFAULT}": [] for k in timed if f"{k}{XLA_DEFAULT}" in timed})
    for r in range(args.rounds):
        for name in timed:
            fn, th = variants[name]
            args_ = (x_of[name], th_of[name]) if name in conv_only else (x, th)
            t = time_fn(fn, *args_, repeats=args.repeats)
            compile_s.setdefault(name, t["compile_s"])
            rounds[name].append(t)
        med = {k: rounds[k][-1]["median_ms"] for k in timed}
        for key in per_round_ratio:  # rate ratio a/b = time b / time a
            a, ref_name = key.split("/")
            per_round_ratio[key].append(med[ref_name] / med[a])
        print(f"round {r + 1}: " + "  ".join(f"{k} {v:.1f} ms" for k, v in med.items()), flush=True)

    with jax.default_device(dev):
        peak_after = matmul_peak()
    peak = max(peak_before["gflops"], peak_after["gflops"])

    results = {}
    conv_flops = 3 * 2 * b * s * s * 9 * args.hidden**2  # the 3×3 layer alone, direct-equivalent
    for name in timed:
        ms = statistics.median(t["median_ms"] for t in rounds[name])
        field = ConvBlockField(args.channels, s, s, args.hidden, impl=impl_of[name])
        if name in conv_only:
            direct, executed = conv_flops, conv_flops - 3 * (field.flops(b) - field.flops(b, executed=True))
        else:
            direct, executed = flops, 3 * field.flops(b, executed=True)
        results[name] = {"median_ms": round(ms, 2), "min_ms": min(t["min_ms"] for t in rounds[name]),
                         "compile_s": compile_s[name],
                         "round_medians_ms": [t["median_ms"] for t in rounds[name]],
                         "gflops": round(direct / ms / 1e6, 2),
                         "executed_gflop": round(executed / 1e9, 3),
                         "executed_gflops": round(executed / ms / 1e6, 2)}
    for impl in args.impls:  # what the 3×3 layer leaves: 1×1 layers, biases, activations, the loop
        block, conv = results.get(f"per_sample_{impl}"), results.get(f"conv3x3_{impl}")
        if block and conv:
            rest_ms = block["median_ms"] - conv["median_ms"]
            rest_flops = 3 * 2 * b * s * s * 2 * args.channels * args.hidden
            results[f"rest_{impl}"] = {"median_ms": round(rest_ms, 2),
                                       "gflops": round(rest_flops / max(rest_ms, 1e-9) / 1e6, 2),
                                       "executed_gflop": round(rest_flops / 1e9, 3),
                                       "executed_gflops": round(rest_flops / max(rest_ms, 1e-9) / 1e6, 2),
                                       "note": "per_sample block minus its 3x3 layer alone"}
    if not skip_naive:
        fn, th = variants["naive"]
        t = time_fn(fn, x, th, repeats=naive_repeats)
        results["naive"] = {**t, "gflops": round(flops / t["median_ms"] / 1e6, 3)}

    if args.torch:
        results["torch"] = torch_variants(args, theta, theta_b, np.asarray(x), flops)

    # rate ratios (= inverse time ratios); the per-round medians pair runs made close in time
    ratios = {k: round(statistics.median(v), 3) for k, v in per_round_ratio.items()}
    if "naive" in results and "shared" in results:
        ratios["naive/shared"] = round(results["naive"]["gflops"] / results["shared"]["gflops"], 4)
        for k in ps:
            ratios[f"{k}/naive"] = round(results[k]["gflops"] / results["naive"]["gflops"], 1)

    print(f"\n{'variant':32s} {'median ms':>10s} {'GFLOP/s':>9s} {'% of matmul peak':>17s} "
          f"{'executed GFLOP':>15s} {'executed GFLOP/s':>17s}")
    rows = {k: v for k, v in results.items() if k != "torch"}
    rows.update({f"torch_{k}": v for k, v in results.get("torch", {}).items()})
    for name, r in rows.items():
        ex = (f" {r['executed_gflop']:15.3f} {r['executed_gflops']:17.2f}" if "executed_gflop" in r else "")
        print(f"{name:32s} {r['median_ms']:10.1f} {r['gflops']:9.2f} {100 * r['gflops'] / peak:16.1f}%{ex}")
    print(f"matmul peak (f32 2048^3, max of before/after): {peak:.1f} GFLOP/s")
    for k, v in ratios.items():
        print(f"rate ratio {k}: {v}")

    out = write_results("conv_block" + args.tag, {
        "settings": {"batch": b, "size": s, "channels": args.channels, "hidden": args.hidden,
                     "dtype": "float32", "repeats": args.repeats, "rounds": args.rounds,
                     "naive_repeats": 0 if skip_naive else naive_repeats, "impls": args.impls,
                     "xla": args.xla, "compiler_options": xla_options("ncode", dev.platform),
                     "device": str(dev), "loadavg_1_5_15_end": list(os.getloadavg())},
        "flops_fwd_bwd_analytic": flops,
        "flops_fwd_bwd_xla_shared_lax": xla_flops,
        "flop_count_note": "rates use the analytic count 3*2*B*H*W*(C*h + 9*h*h + h*C) for every variant",
        "matmul_peak": {"before": peak_before, "after": peak_after, "gflops": peak},
        "results": results,
        "ratios": ratios,
        "per_round_ratios": {k: [round(v, 3) for v in vs] for k, vs in per_round_ratio.items()},
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
