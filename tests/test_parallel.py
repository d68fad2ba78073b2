"""Data-parallel and multi-process training (train/parallel.py).

The device count (``XLA_FLAGS=--xla_force_host_platform_device_count``) and ``jax.distributed``
must be fixed before JAX starts, so the multi-device checks run tests/parallel_worker.py in fresh
interpreters and read what it prints or writes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import autoencode, classify, parallel

X64 = False
ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "parallel_worker.py")
TIMEOUT = 600


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    return env


def _run(args, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, WORKER, *args], env=_env(**env), cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"worker {args} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(args_for, n: int = 2) -> list[subprocess.CompletedProcess]:
    """Start ``n`` workers as the processes of one jax.distributed run on 127.0.0.1."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, *args_for(i)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i)))
             for i in range(n)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"process {i} of {n} failed (rc {rc}):\n{out}\n{err[-4000:]}"
    return results


def _leaves(path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _rel(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)) for x, y in zip(a, b))


# --- four simulated devices ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def equivalence():
    proc = _run(["equivalence"], XLA_FLAGS="--xla_force_host_platform_device_count=4")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in rows}


@pytest.mark.slow  # ~40 s (one 4-device subprocess); the in-process mesh tests stay in the default run
@pytest.mark.parametrize("case", ["ncode_open_classifier", "autoncode"])
def test_sharded_step_matches_single_device(equivalence, case):
    r = equivalence[case]
    assert r["num_devices"] == 4 and r["shards_per_batch"] == 4, r  # really split over 4 devices
    assert r["all_reduce_in_hlo"], r  # and gradients really reduced across them
    assert r["all_gather_shapes"] == [], r  # no device gathers the batch (per-sample kernel loops
    # run per device via ncode_jax.sharding; solve's error checks carry a scalar, not the batch)
    assert r["dtype"] == "float32"
    assert r["loss_rel"] <= 1e-5 and r["grads_rel"] <= 1e-5 and r["params_rel"] <= 1e-5, r
    assert np.isfinite(r["loss"]) and r["loss"] > 0
    if case == "autoncode":  # batch-norm statistics of the sharded batch are the global ones
        assert r["aux_leaves"] >= 10 and r["aux_rel"] <= 1e-5, r


@pytest.mark.slow
def test_sharded_step_matches_single_device_node():
    """NODE: shared kernels, whose gradient sums a scan over the images (ncode_jax.sharding.batch_sum)."""
    proc = _run(["equivalence", "node_classifier"], XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = json.loads(proc.stdout.splitlines()[0])
    assert r["case"] == "node_classifier" and r["shards_per_batch"] == 4, r
    assert r["all_gather_shapes"] == [], r
    assert r["loss_rel"] <= 1e-5 and r["grads_rel"] <= 1e-5 and r["params_rel"] <= 1e-5, r


@pytest.mark.slow
def test_autoencode_trains_data_parallel_like_one_device(tmp_path):
    """train.autoencode (AutoN-CODE) on 4 devices: same train losses, held-out MSE (eval batches
    padded from 90 to 92 and masked) and checkpointed variables (batch statistics included) as on
    one device."""
    out = tmp_path / "ae.json"
    _run(["autoencode", "--workdir", str(tmp_path), "--out", str(out)],
         XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = json.loads(out.read_text())
    assert [r["summaries"][k]["num_devices"] for k in ("all", "one")] == [4, 1], r
    assert len(r["losses"]["all"]) == 2, r
    print(r)
    # step 1 equal to 1e-6; Adam's first update turns rounding noise in zero-gradient entries into
    # +-lr (see OPTIMIZERS in the worker), so later values agree only to ~1e-4 (measured)
    np.testing.assert_allclose(r["losses"]["all"][0], r["losses"]["one"][0], rtol=1e-6)
    np.testing.assert_allclose(r["losses"]["all"], r["losses"]["one"], rtol=2e-4)
    assert r["summaries"]["all"]["test_mse"] == pytest.approx(r["summaries"]["one"]["test_mse"], rel=2e-3)
    assert r["leaves"] >= 6 and r["variables_rel"] <= 1e-3, r


@pytest.mark.slow  # shares the 4-device subprocess (~45 s) with the equivalence tests
def test_batch_not_divisible_is_a_clear_error(equivalence):
    r = equivalence["errors"]
    assert "batch_size=30 (the global batch) is not divisible by the device count 4" in r["train"], r
    assert "batch_size=30 (the global batch) is not divisible by the device count 4" in r["train_ae"], r
    assert "not divisible by the device count 4" in r["shard_batch"], r
    assert "num_devices=5 but only 4 devices exist" in r["too_many"], r
    assert r["two_devices"] == 2, r  # num_devices=2 of 4: batch 30 then splits (checked in the worker)
    assert r["eval_batch_359"] == 360, r  # eval batches are padded (masked) up to a multiple of 4


# --- in-process (one device) ---------------------------------------------------------------------

def test_distributed_flags_and_environment():
    assert parallel.initialize_distributed(environ={}) is False  # nothing asked: single process
    assert parallel.initialize_distributed(environ={"JAX_NUM_PROCESSES": "1"}) is False
    with pytest.raises(ValueError, match="missing \\['process_id'\\]"):
        parallel.initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                                 "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' is not an integer"):
        parallel.initialize_distributed(environ={"JAX_PROCESS_ID": "x"})
    with pytest.raises(ValueError, match="0 <= process_id < num_processes"):
        parallel.initialize_distributed("127.0.0.1:1", 2, 2, environ={})
    args = parallel.add_distributed_flags(__import__("argparse").ArgumentParser()).parse_args(
        ["--coordinator-address", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == ("10.0.0.1:1234", 4, 3)


def test_one_device_mesh_and_config():
    dp = parallel.DataParallel.create()
    assert dp.num_devices == 1 and dp.is_main
    with pytest.raises(ValueError, match="num_devices must be a positive int"):
        parallel.DataParallel.create(0)
    with pytest.raises(ValueError, match="num_devices=0 is out of range"):
        classify.ClassifyConfig(num_devices=0)
    with pytest.raises(ValueError, match="num_devices=0 is out of range"):
        autoencode.AutoencodeConfig(num_devices=0)
    (x,) = dp.shard_batch(np.arange(6.0))
    np.testing.assert_array_equal(np.asarray(x), np.arange(6.0))


# --- two processes through jax.distributed on 127.0.0.1 ------------------------------------------

@pytest.mark.slow  # two jax.distributed processes, ~12 s
def test_two_processes_train_to_identical_parameters(tmp_path):
    out = tmp_path / "toy"
    _run_processes(lambda i: ["toy", "--out", f"{out}.p{i}.json"])
    info = [json.loads(Path(f"{out}.p{i}.json").read_text()) for i in range(2)]
    assert [r["processes"] for r in info] == [2, 2] and [r["devices"] for r in info] == [2, 2]
    assert [r["rows"] for r in info] == ["slice(0, 4, None)", "slice(4, 8, None)"]  # own half each
    p0, p1 = _leaves(f"{out}.p0.json.npz"), _leaves(f"{out}.p1.json.npz")
    assert all(np.array_equal(a, b) for a, b in zip(p0, p1, strict=True))  # bit-identical
    assert _rel(p0, _leaves(f"{out}.p0.json.ref.npz")) <= 1e-5  # = the single-device steps


@pytest.mark.slow
def test_classify_two_processes_resume_matches_single_process(tmp_path):
    """train.classify over 2 processes: 1 epoch, then resumed to 2 epochs; process 0 alone writes
    metrics; both end with the parameters of an uninterrupted single-process run."""
    work = tmp_path / "mp"

    def args(i, epochs):
        return ["train", "--workdir", str(work), "--out", f"{work}.e{epochs}.p{i}.json",
                "--set", f"epochs={epochs}"]

    _run_processes(lambda i: args(i, 1))
    _run_processes(lambda i: args(i, 2))
    _run(["train", "--workdir", str(tmp_path / "single"), "--out", f"{tmp_path}/single.json",
          "--set", "epochs=2", "--set", "num_devices=1"])
    first = [json.loads(Path(f"{work}.e1.p{i}.json").read_text()) for i in range(2)]
    second = [json.loads(Path(f"{work}.e2.p{i}.json").read_text()) for i in range(2)]
    assert [r["saves"] for r in first] == [[2], [2]]  # every process calls save; process 0 writes
    assert [r["saves"] for r in second] == [[4], [4]]  # resumed at step 2, not from scratch
    assert second[0]["summary"]["num_processes"] == 2
    p0, p1 = _leaves(f"{work}.e2.p0.json.npz"), _leaves(f"{work}.e2.p1.json.npz")
    assert all(np.array_equal(a, b) for a, b in zip(p0, p1, strict=True))
    assert _rel(p0, _leaves(f"{tmp_path}/single.json.npz")) <= 1e-5
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # no duplicates
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_batch_loops_under_a_mesh_equal_plain_loops():
    from ncode_jax.sharding import batch_map, batch_sum

    xs = np.arange(12.0, dtype=np.float32).reshape(6, 2)
    one = np.ones(2, np.float32)
    plain_map, plain_sum = batch_map(lambda r: r * 2, xs), batch_sum(lambda r: r**2, one, xs)
    dp = parallel.DataParallel.create()
    meshed = dp.jit(lambda x: (batch_map(lambda r: r * 2, x), batch_sum(lambda r: r**2, one, x)),
                    batch_argnums=(0,))
    m, s = meshed(*dp.shard_batch(xs))
    np.testing.assert_allclose(np.asarray(m), np.asarray(plain_map))
    np.testing.assert_allclose(np.asarray(s), np.asarray(plain_sum))
    np.testing.assert_allclose(np.asarray(s), 1 + (xs**2).sum(0))


def test_num_devices_creates_cpu_devices_in_a_fresh_process():
    """``--set num_devices=2`` on a CPU machine needs no XLA_FLAGS: the engine asks JAX for 2 CPU
    devices before its backend starts; a count set by XLA_FLAGS is left alone."""
    code = ("from train import parallel; parallel.ensure_cpu_devices({n!r}); import jax; "
            "print(jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT)}
    for n, flags, want in [(2, "", "2"), (None, "", "1"), ("abc", "", "1"),
                           (2, "--xla_force_host_platform_device_count=3", "3")]:
        out = subprocess.run([sys.executable, "-c", code.format(n=n)], cwd=ROOT, text=True,
                             capture_output=True, env={**env, "XLA_FLAGS": flags} if flags else env,
                             timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == want, (n, flags, out.stderr[-2000:])


_BACKWARD_FAILS = """
import time
import jax, jax.numpy as jnp, numpy as np
import ncode_jax as nc
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(np.asarray(jax.devices()), ("batch",))
field = nc.LinearField(2)
dyn = nc.Dynamics(field)

def loss(theta, x):
    sol = nc.solve(dyn, x, theta, solver="tsit5", dt=None, adjoint="backsolve", max_steps=64)
    nan_rows = jnp.where(jnp.arange(4) >= 2, jnp.nan, 1.0)  # only the second device's rows
    return jnp.sum(sol.x * nan_rows[:, None])

with jax.set_mesh(mesh):
    rows = NamedSharding(mesh, P("batch"))
    x = jax.device_put(jnp.ones((4, 2), jnp.float32), rows)
    theta = jax.device_put(jnp.full((4, field.num_params), 0.1, jnp.float32), rows)
    try:
        jax.block_until_ready(jax.jit(jax.grad(loss))(theta, x))
        print("no error")
    except Exception as e:
        print("raised:", str(e).strip().splitlines()[-1] if "backward solve" not in str(e) else
              next(line for line in str(e).splitlines() if "backward solve" in line))
"""


def test_failed_backward_solve_raises_on_every_device_together():
    """backsolve's backward solve running out of ``max_steps`` on one device only (a NaN
    cotangent in its rows) raises the solve's error on both devices; diffrax's own check raised on
    one device while the other waited in a collective, and XLA aborted the process after 40 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    out = subprocess.run([sys.executable, "-c", _BACKWARD_FAILS], cwd=ROOT, text=True, capture_output=True,
                         timeout=90, env={**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                                          "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert out.returncode == 0, out.stderr[-3000:]
    want = "backward solve of adjoint='backsolve' used all max_steps=64"
    assert "raised: " in out.stdout and want in out.stdout, (
        out.stdout[-2000:], out.stderr[-2000:])
