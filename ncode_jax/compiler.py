"""XLA compiler options under which the per-sample kernels of :mod:`ncode_jax.conv` run fastest.

Pass them to the ``jax.jit`` of a training step::

    step = jax.jit(step, compiler_options=ncode_jax.compiler_options())

(:func:`jit` does this lazily; the training engine, the FID/digit-feature networks and
``train.autoencode_eval`` compile with them.)

What they change, and why (measured on the 2-core CPU of this project's machines, jaxlib 0.10.2;
numbers in ``benchmarks/README.md``, "Fourth session"):

* **CPU.** XLA:CPU hands convolutions to YNNPACK by default
  (``xla_cpu_experimental_ynn_fusion_type`` contains ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``).
  Those convolutions run on one thread: a batch-1 3×3 50→50 convolution on 28×28 took the same
  time on one core as on two (0.55–0.68 ms), where XLA's own (Eigen) convolution uses both cores
  (0.47 ms; batch 8: 2.8 ms against YNNPACK's 4.3 ms). Its kernel-gradient convolutions are slower
  still: plain autodiff of a shared-kernel conv block took 587 ms with YNNPACK and 117 ms without.
  The options keep every other default YNNPACK fusion (dot, reduce) and leave only convolutions to
  XLA. The per-sample conv block (``impl="map"``) becomes 1.09–1.3× faster, the conv N-CODE
  training step ~8% on one device, the Inception-v3 forward of the FID 1.9× (8 images, 1454 →
  752 ms); programs without a YNNPACK convolution (e.g. a 16-channel block) compile unchanged.
* **Other backends:** none (``{}``).

An ``xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` is the user's choice and wins: the
function then returns ``{}``. So does a jaxlib that does not know the option (checked once by
compiling a one-line program with it; a warning names the error).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

#: the YNNPACK fusion kinds XLA:CPU enables by default in the pinned jaxlib (0.10.2), less
#: INDIVIDUAL_CONVOLUTION (the default set was read off compiled HLO: dot, convolution, reduce)
CPU_YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE")
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def _cpu_options() -> dict[str, str]:
    return {_YNN_OPTION: ",".join(CPU_YNN_FUSION_TYPES)}


@functools.cache
def _accepted(items: tuple[tuple[str, str], ...]) -> bool:
    """Whether the installed jaxlib's compiler accepts these options (compiles ``x + 1`` from an
    abstract argument: no device placement, so it also works under a multi-device ``set_mesh``).
    Only a refusal of the options themselves counts; any other error propagates (not cached)."""
    try:
        jax.jit(lambda a: a + 1).lower(jax.ShapeDtypeStruct((2,), jnp.float32)).compile(dict(items))
    except jax.errors.JaxRuntimeError as e:
        if not any(name in str(e) for name, _ in items) and "compile option" not in str(e):
            raise
        warnings.warn(f"ncode_jax.compiler_options: this jaxlib refuses {dict(items)} ({e}); "
                      "compiling with XLA's defaults", RuntimeWarning, stacklevel=3)
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA compiler options for jitting ncode_jax models on ``backend``.

    Args:
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``, ...; ``None`` means JAX's default backend.

    Returns:
      A new dict for ``jax.jit(..., compiler_options=...)`` or ``Lowered.compile(...)``: on CPU
      ``{"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,
      LIBRARY_FUSION_TYPE_REDUCE"}`` (convolutions left to XLA's multi-threaded implementation,
      see the module docstring); ``{}`` on other backends, when ``XLA_FLAGS`` already sets that
      option, or when the installed jaxlib refuses it (with a ``RuntimeWarning``, once).

    The options change which library runs a convolution, not what it computes: results agree
    to float rounding (``tests/test_compiler.py``).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or _YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    opts = _cpu_options()
    return opts if _accepted(tuple(sorted(opts.items()))) else {}


def jit(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs)``, built at the first call.

    For module-level jitted functions (the FID and digit-feature networks): building lazily means
    importing the module starts no JAX backend (``XLA_FLAGS`` such as a CPU device count can still
    be set after the import), and the options are those of the backend in use at that call.
    ``.lower(*args)`` lowers the same function."""

    @functools.cache
    def build() -> Callable:
        return jax.jit(fn, compiler_options=compiler_options(), **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return build()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: build().lower(*args, **kwargs)
    return call
