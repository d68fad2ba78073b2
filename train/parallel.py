"""Data-parallel and multi-host training on JAX's own runtime: a mesh, shardings, process roles.

Training state (parameters, optimizer state) is **replicated** on every device; each global batch
is **sharded** along its first axis over a one-axis mesh ``('data',)``. A step is an ordinary
``jax.jit`` with those in/out shardings (:meth:`DataParallel.jit`): XLA inserts the gradient
all-reduce, so the loss, gradients and updated parameters are those of the single-device step on
the same global batch (up to floating-point summation order). ``jit`` + shardings is used rather
than ``shard_map``, which fails around a diffrax solve with the checkpoint adjoint; the step is
traced under ``jax.set_mesh(mesh)`` so that loops over the batch inside the model (per-sample
convolution kernels) run per device (:mod:`ncode_jax.sharding`) instead of being all-gathered.

Multi-host (several processes, e.g. one per machine): call :func:`initialize_distributed` (driven
by the ``--coordinator-address/--num-processes/--process-id`` flags of :func:`add_distributed_flags`
or the ``JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID`` environment variables) before
anything else touches JAX. Every process then builds the same global batch from the same seeded
iterator and places only the rows of its own devices (:meth:`DataParallel.shard_batch`) — no
process ships data to another. Only :attr:`DataParallel.is_main` (process 0) writes logs, metrics,
checkpoints and figures; every process reads the checkpoint on resume. :mod:`train.engine` is the
one user of this module (every training script runs through it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ncode_jax.compiler import compiler_options
from ncode_jax.sharding import BATCH_AXIS as AXIS

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def add_distributed_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coordinator-address``, ``--num-processes``, ``--process-id`` and
    ``--coordinator-timeout`` to a parser."""
    g = parser.add_argument_group("multi-host (jax.distributed); defaults from the environment")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordinator (env {ENV['coordinator_address']})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"total number of processes (env {ENV['num_processes']})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's index in [0, num_processes) (env {ENV['process_id']})")
    g.add_argument("--coordinator-timeout", type=float, default=COORDINATOR_TIMEOUT, metavar="SECONDS",
                   help="how long a process waits for the coordinator before giving up "
                        f"(default {COORDINATOR_TIMEOUT})")
    return parser


#: seconds a process waits for the coordinator (process 0) to answer before giving up
COORDINATOR_TIMEOUT = 120


def _check_coordinator(address: str, process_id: int, timeout: float) -> None:
    """Fail in one line, within ``timeout`` seconds, where ``jax.distributed`` would wait minutes
    and then abort the process: process 0 must be able to listen on the address's port, the others
    must reach it (retried until ``timeout``: process 0 may start later)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r} must look like HOST:PORT")
    host = host.strip("[]")
    if process_id == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", int(port)))
        except OSError as e:
            raise ValueError(f"process 0 cannot serve as the coordinator at {address}: port {port}: "
                             f"{e.strerror or e}") from None
        return
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise ValueError(f"cannot reach the coordinator at {address} (process 0) within {timeout:g} s "
                             f"({getattr(last, 'strerror', None) or last}): is process 0 running, and is "
                             "the address right?")
        time.sleep(0.5)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, environ=None,
                           timeout: float = COORDINATOR_TIMEOUT) -> bool:
    """Start ``jax.distributed`` when a multi-process run is requested; returns whether it did.

    Arguments left None are read from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Nothing requested (all unset, or ``num_processes == 1``): a plain
    single-process run, False. A partial request is a ValueError naming what is missing; this
    must run before JAX starts its backend. A coordinator that process 0 cannot serve, or that
    another process cannot reach within ``timeout`` seconds, is a ValueError naming the address
    (``jax.distributed`` itself waits minutes, then aborts the process).
    """
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    for key, value in given.items():
        if value is None and (raw := environ.get(ENV[key])):
            try:
                given[key] = raw if key == "coordinator_address" else int(raw)
            except ValueError:
                raise ValueError(f"environment variable {ENV[key]}={raw!r} is not an integer") from None
    if all(v is None for v in given.values()) or given["num_processes"] == 1:
        return False
    if missing := [k for k, v in given.items() if v is None]:
        raise ValueError("a multi-process run needs coordinator address, number of processes and "
                         f"process id; missing {missing} (flag --{missing[0].replace('_', '-')} or env "
                         f"{ENV[missing[0]]})")
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(f"need 0 <= process_id < num_processes, got {given}")
    _check_coordinator(str(given["coordinator_address"]), given["process_id"], timeout)
    jax.distributed.initialize(**given, initialization_timeout=max(int(timeout), 1))
    return True


def initialize_from_args(args: argparse.Namespace) -> bool:
    """:func:`initialize_distributed` from the flags :func:`add_distributed_flags` added."""
    return initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                  timeout=getattr(args, "coordinator_timeout", COORDINATOR_TIMEOUT))


def ensure_cpu_devices(num_devices) -> None:
    """Let ``num_devices`` (> 1) CPU devices exist (``jax_num_cpu_devices``) unless a count is set
    (``XLA_FLAGS=--xla_force_host_platform_device_count``) or JAX's backends have started: on a
    CPU machine ``num_devices=2`` then runs one per-image loop per core. GPU/TPU runs are unaffected."""
    n = int(num_devices) if str(num_devices).isdigit() else 1  # None: all; a mistake: the config names it
    unset = jax.config.jax_num_cpu_devices == -1 and "device_count" not in os.environ.get("XLA_FLAGS", "")
    if n > 1 and unset:
        with contextlib.suppress(RuntimeError):  # backends already started (e.g. in a test): keep them
            jax.config.update("jax_num_cpu_devices", n)


def select_devices(num_devices: int | None = None) -> list:
    """The devices of the mesh, ordered process by process.

    ``None`` -> every device of every process. ``k`` -> the first ``k / process_count`` local
    devices of each process (``k`` must be a multiple of the process count, since every process
    must own part of the mesh).
    """
    devices, nproc = jax.devices(), jax.process_count()
    if num_devices is None:
        chosen = devices
    else:
        if isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer) or num_devices < 1:
            raise ValueError(f"num_devices must be a positive int or None (all), got {num_devices!r}")
        if num_devices > len(devices):
            raise ValueError(
                f"num_devices={num_devices} but only {len(devices)} devices exist "
                f"({jax.default_backend()}, {nproc} process(es)); on CPU, "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices")
        if num_devices % nproc:
            raise ValueError(f"num_devices={num_devices} is not a multiple of the process count "
                             f"{nproc}: every process must hold the same number of mesh devices")
        per = num_devices // nproc
        chosen = [d for p in range(nproc) for d in [d for d in devices if d.process_index == p][:per]]
    return sorted(chosen, key=lambda d: (d.process_index, d.id))


@dataclass(frozen=True)
class DataParallel:
    """A one-axis device mesh with the shardings of data-parallel training."""

    mesh: Mesh

    @classmethod
    def create(cls, num_devices: int | None = None) -> DataParallel:
        return cls(Mesh(np.asarray(select_devices(num_devices)), (AXIS,)))

    # --- roles ---------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def backend(self) -> str:
        """The mesh devices' platform (``"cpu"``, ``"gpu"``, ...)."""
        return self.mesh.devices.flat[0].platform

    @property
    def is_main(self) -> bool:
        """True on the one process that writes logs, metrics, summaries and figures."""
        return jax.process_index() == 0

    # --- shardings -----------------------------------------------------------------------------
    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) axis split over the mesh, other axes whole."""
        return NamedSharding(self.mesh, P(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def check_batch(self, global_batch: int, name: str = "batch_size") -> None:
        """Raise ValueError unless ``global_batch`` splits evenly over devices and processes."""
        for count, what in ((self.num_devices, "device count"), (jax.process_count(), "process count")):
            if global_batch % count:
                lo = global_batch // count * count
                raise ValueError(
                    f"{name}={global_batch} (the global batch) is not divisible by the {what} "
                    f"{count} (mesh of {self.num_devices} devices over {jax.process_count()} "
                    f"process(es)); use a multiple of {count}, e.g. {lo or count} or {lo + count}, "
                    "or change num_devices")

    def round_up(self, batch: int) -> int:
        """The smallest multiple of the device count >= ``batch`` (for padded, masked eval batches)."""
        return -(-batch // self.num_devices) * self.num_devices

    # --- placement -----------------------------------------------------------------------------
    def shard_batch(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """Global numpy batch arrays -> global ``jax.Array`` s sharded along axis 0 (a tuple).

        Every process passes the *same* global batch (a pure function of seed and position) and
        places only the rows of its own devices (``jax.make_array_from_callback``)."""
        sizes = {np.shape(a)[0] for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"batch arrays disagree on the batch size: {[np.shape(a) for a in arrays]}")
        self.check_batch(sizes.pop())
        return tuple(self.place(a, self.batch_sharding) for a in arrays)

    def replicate(self, tree: Any) -> Any:
        """Place a PyTree (numpy or JAX arrays, equal on every process) on every mesh device."""
        return jax.tree.map(lambda x: self.place(x, self.replicated), tree)

    @staticmethod
    def place(x, sharding: NamedSharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def jit(self, fn: Callable, *, batch_argnums: Sequence[int], donate_argnums: Sequence[int] = ()
            ) -> Callable:
        """``jax.jit(fn)`` with the positional arguments in ``batch_argnums`` sharded along the batch
        axis and every other argument and every output replicated, traced under the mesh (so batch
        loops in the model stay per device), compiled with :func:`ncode_jax.compiler_options` of the
        mesh's backend; ``.lower(*args)`` for HLO inspection. ``fn`` may already be jitted (the
        outer shardings then govern). The arguments in ``donate_argnums`` are donated: their
        buffers are reused for the outputs, and the caller must use the outputs instead (the
        engine donates its train state)."""

        opts = compiler_options(self.backend)  # here, not under the mesh: its probe compiles

        @functools.cache
        def jitted(n: int) -> Callable:  # one compiled function per argument count
            shardings = [self.batch_sharding if i in batch_argnums else self.replicated for i in range(n)]
            return jax.jit(fn, in_shardings=tuple(shardings), out_shardings=self.replicated,
                           donate_argnums=tuple(donate_argnums), compiler_options=opts)

        def under_mesh(call: Callable) -> Callable:
            def run(*args):
                with jax.set_mesh(self.mesh):
                    return call(jitted(len(args)), *args)
            return run

        step = under_mesh(lambda f, *args: f(*args))
        step.lower = under_mesh(lambda f, *args: f.lower(*args))
        return step
