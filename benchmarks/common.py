"""Timing helpers for benchmarks: warm-up, medians, machine/version records."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ncode_jax as nc

# fields that count their evaluations, and the counters (shared with the tests)
from ncode_jax.evaluations import (  # noqa: F401
    CountingConvField,
    CountingMLPField,
    count_evaluation,
    counted,
    evaluations,
)

RESULTS = Path(__file__).parent / "results"

# Precision policy of every benchmark: float32 products in full float32 on both sides. JAX would
# use TF32 for float32 dots and convolutions on recent NVIDIA GPUs, PyTorch TF32 for cuDNN
# convolutions (not for matmuls); on CPU neither changes anything. Recorded in every result file.
PRECISION = "float32, full precision (jax_default_matmul_precision=highest; torch allow_tf32 off)"
jax.config.update("jax_default_matmul_precision", "highest")


def torch_precision() -> None:
    """PyTorch's side of :data:`PRECISION` (TF32 off for matmuls and cuDNN convolutions)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def time_fn(fn: Callable, *args, repeats: int = 20) -> dict:
    """Compile time (first call) and the median/min of ``repeats`` timed calls, in ms."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return {"compile_s": round(compile_s, 3), "median_ms": round(statistics.median(times), 3),
            "min_ms": round(min(times), 3), "repeats": repeats}


def machine() -> dict:
    import diffrax
    import equinox

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "diffrax": diffrax.__version__,
            "equinox": equinox.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "precision": PRECISION}


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return out


def require_torch(who: str):
    try:
        import torch  # noqa: F401
        import torchdiffeq  # noqa: F401
    except ImportError as e:
        sys.exit(f"{who} needs the torch extra: pip install -e '.[torch]' ({e})")
    torch_precision()


def pick_devices(device: str):
    """``(jax device, torch device string)``; exits with a clear message if one is missing."""
    import torch

    if device == "cpu":
        return jax.devices("cpu")[0], "cpu"
    try:
        jdev = jax.devices("gpu")[0]
    except RuntimeError as e:
        sys.exit(f"--device gpu: JAX has no GPU backend here ({e}); install a CUDA jaxlib or use "
                 "--device cpu")
    if not torch.cuda.is_available():
        sys.exit(f"--device gpu: this torch ({torch.__version__}) has no CUDA device; the project "
                 "pins a CPU wheel — install a CUDA build of torch==2.13.0 or use --device cpu")
    return jdev, "cuda"


XLA_VARIANTS = ("ncode", "default")  # --xla: ncode_jax.compiler_options (as training) or XLA's own


def torch_step(loss_fn: Callable, params, optimizer, device: str):
    """``(step, reset)`` of a PyTorch training step: ``step()`` zeroes the gradients, runs
    ``loss_fn()``, backpropagates, steps ``optimizer``, waits for the device (``"cuda"``) and
    returns the detached loss; ``reset()`` puts ``params`` back to their values of now (call it
    outside the timed region, so every timed step starts from the same weights)."""
    import torch

    params = list(params)
    initial = [p.detach().clone() for p in params]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        sync()
        return loss.detach()

    def reset():
        with torch.no_grad():
            for p, q in zip(params, initial):
                p.copy_(q)

    return step, reset


def add_xla_flag(parser) -> None:
    """``--xla {ncode,default} ...``: the compiler options the JAX variants are timed with."""
    parser.add_argument("--xla", nargs="+", choices=XLA_VARIANTS, default=["ncode"],
                        help="JAX compiler options: 'ncode' = ncode_jax.compiler_options() (what the "
                             "training engine uses), 'default' = XLA's defaults; both: timed side by side")


def xla_options(variant: str, platform: str) -> dict:
    """The ``compiler_options`` of one ``--xla`` variant on ``platform``."""
    return nc.compiler_options(platform) if variant == "ncode" else {}


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Times (ms) of ``repeats`` calls of each ``(call, reset)``, alternating the order per
    repeat; ``reset`` runs outside the timed region."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            call, reset = fns[k]
            reset()
            t = time.perf_counter()
            jax.block_until_ready(call())
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def summarize(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
            "repeats": len(times)}


def matmul_peak(n: int = 2048, repeats: int = 10) -> dict:
    """Median f32 GFLOP/s of an ``n×n @ n×n`` matmul (XLA's own GEMM, all cores)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    t = time_fn(jax.jit(lambda a: a @ a), a, repeats=repeats)
    return {"n": n, **t, "gflops": round(2 * n**3 / t["median_ms"] / 1e6, 1)}


def eval_flops(flow, params: dict, x0) -> dict:
    """FLOPs of ONE evaluation of the flow's right-hand side ``h(t, z)`` on the batch ``x0``, from
    XLA's cost analysis: ``fwd`` (h alone) and ``fwd_bwd`` (h and its VJP w.r.t. the state and
    every parameter, as one backward step needs).

    Whole solves cannot be costed this way: XLA's cost analysis counts a while loop's body once,
    whatever its trip count (checked: a fixed-step rk4 solve+grad reports the same FLOPs for 10
    and 20 steps). Callers multiply by the NFE. A flow whose field loops internally (the fast
    ``ConvBlockField`` path maps over images) must be passed with a loop-free twin
    (``impl="reference"``: same maths, same FLOPs).
    """
    from ncode_jax.control import augment

    theta0 = flow.initial_theta(params, x0)
    dyn = flow.dynamics
    z0, theta_const = dyn.initial_state(augment(x0, flow.augment), theta0)
    args = {"theta": theta_const, "feedback": params.get("feedback"), "cost": None}

    def h(z, a):
        return dyn(0.0, z, a)

    def total(z, a):
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(h(z, a)))

    def cost(fn):
        return float(jax.jit(fn).lower(z0, args).compile().cost_analysis().get("flops", float("nan")))

    return {"fwd": cost(h), "fwd_bwd": cost(jax.grad(total, argnums=(0, 1)))}


def hardware_fraction(flops: float, ms: float, peak_gflops: float) -> dict:
    """Achieved GFLOP/s of ``flops`` in ``ms`` milliseconds, and its fraction of the peak."""
    gflops = flops / ms / 1e6
    return {"model_gflop": round(flops / 1e9, 4), "gflops": round(gflops, 2),
            "fraction_of_matmul_peak": round(gflops / peak_gflops, 4)}
