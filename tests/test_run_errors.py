"""The run engine's error paths: a failed training step is one ``error:`` line with the step and
the likely cause (learning rate, step budget), also with several devices; a resume is compared
with the experiment that wrote the checkpoint. Tiny toy runs (16 points, rk4 dt 0.5)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train import engine, toy

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False
REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--problem", "reflection", "--model", "open", "--n-train", "16", "--n-test", "16", "--hidden", "4",
         "--control-hidden", "4", "--no-progress", "--figures", "false", "--checkpoint-every", "1"]
RK4 = ["--solver", "rk4", "--dt", "0.5"]
# adaptive steps: parameters blown up by a huge learning rate make the field stiff
BLOWN = ["--solver", "tsit5", "--set", "dt=none", "--max-steps", "64"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flags, want", [
    pytest.param([*BLOWN, "--lr", "1e4"],
                 r"^error: training step (\d+) failed: ncode_jax\.solve: .*likely cause: the parameters "
                 r"blew up .*the learning rate lr=10000\.0 is likely too large", marks=pytest.mark.slow),
    ([*RK4, "--max-steps", "1"], r"^error: training step 1 failed: ncode_jax\.solve: the rk4 solver used all "
                           r"max_steps=1 steps .*likely cause: the solver's step budget: raise the config "
                           r"value max_steps \(now 1; --set max_steps=N\).*nothing was saved"),
])
def test_a_failed_training_step_is_one_error_line(flags, want, tmp_path, capsys):
    assert toy.main(["--workdir", str(tmp_path), *FLAGS, "--steps", "8", *flags]) == 2
    err = _one_error_line(capsys)
    found = re.search(want, err)
    assert found, err
    run = tmp_path / "reflection_open"
    if found.groups() and int(found.group(1)) > 1:  # the steps before it were saved, and stay intact
        kept = int(found.group(1)) - 1
        assert f"the checkpoint of step {kept} in {run} is intact" in err
        loaded = engine.load_run(run)
        assert loaded.step == kept
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(loaded.params))


@pytest.mark.slow  # a fresh 2-device process (~15 s); without agreement XLA aborted it after ~40 s
def test_a_failed_step_on_two_devices_is_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    proc = subprocess.run([sys.executable, "-m", "train.toy", "--workdir", str(tmp_path), *FLAGS,
                           "--steps", "8", *BLOWN, "--lr", "1e5", "--num-devices", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err[-3000:]
    assert re.search(r"^error: training step \d+ failed: .*learning rate lr=100000\.0", err), err


def test_a_step_larger_than_the_interval_is_refused_in_configs():
    """``--set dt=2`` on [0, 1] ran one step of 1 while config.json recorded dt 2.0."""
    from ncode_jax import SolveConfig
    from train import autoencode, classify
    from train.config import UserError, build

    for cls, layer in [(toy.ToyConfig, {"solver": "rk4", "dt": "2"}), (classify.ClassifyConfig, {"dt": 1.5}),
                       (autoencode.AutoencodeConfig, {"dt": 10.5})]:  # autoencode: t1 = 10
        with pytest.raises(UserError, match=r"config: dt=\S+ is larger than the interval \[t0, t1\]"):
            build(cls, layer)
    with pytest.raises(ValueError, match=r"dt=0.75 is larger than the interval \[t0, t1\] = \[1.0, 0.5\]"):
        SolveConfig(solver="rk4", dt=0.75, t0=1.0, t1=0.5)
    assert SolveConfig(solver="rk4", dt=0.5, t0=1.0, t1=0.5).dt == 0.5  # the whole interval: one step
    assert build(toy.ToyConfig, {"solver": "rk4", "dt": "2", "t1": "3"}).solve.dt == 2.0  # checked together
    # the same kind: more training examples than the split has trained on fewer than recorded
    with pytest.raises(UserError, match=r"train_examples=5000 is more than the 1438 examples of 'digits'"):
        engine.make_task(classify.Task, build(classify.ClassifyConfig, {"dataset": "digits",
                                                                         "train_examples": 5000}))


@pytest.mark.slow  # a training step's compilation (~4 s)
def test_a_failed_first_save_leaves_no_record(tmp_path, monkeypatch, capsys):
    """A first checkpoint save that failed left config.json behind, so the corrected command was
    refused as another experiment."""
    from train.checkpoint import Checkpointer, CheckpointError
    from train.config import build

    def full(self, step, state):
        raise CheckpointError(f"cannot write the checkpoint of step {step} to {self.directory}: disk full")

    monkeypatch.setattr(Checkpointer, "save", full)
    assert toy.main(["--workdir", str(tmp_path), *FLAGS, *RK4, "--steps", "2"]) == 2
    assert _one_error_line(capsys).startswith("error: cannot write the checkpoint of step 1")
    run = tmp_path / "reflection_open"
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()
    corrected = toy.Task(build(toy.ToyConfig, {"n_train": 16, "n_test": 16, "lr": 0.5}))
    engine.check_recorded_config(run, corrected)  # not refused


def test_evaluation_of_an_unwritable_workdir_is_one_error_line(tmp_path, capsys):
    from train import autoencode_eval

    (tmp_path / "ae").mkdir()
    (tmp_path / "ae" / "config.json").write_text('{"task": "autoencode", "config": {"model": "ae"}}')
    (tmp_path / "eval").write_text("")  # where the evaluation's directory must go
    assert autoencode_eval.main(["--workdir", str(tmp_path), "--components", "2"]) == 2
    assert _one_error_line(capsys).startswith(f"error: cannot write the evaluation to {tmp_path / 'eval'}")


def test_an_unreachable_coordinator_is_one_line_within_its_timeout(tmp_path, capsys):
    """It printed nothing for 5 minutes, then XLA aborted the process (rc 134) blaming "another task"."""
    import socket
    import time

    from train import parallel

    t0 = time.perf_counter()
    assert toy.main(["--workdir", str(tmp_path), *FLAGS, "--coordinator-address", "127.0.0.1:1",
                     "--num-processes", "2", "--process-id", "1", "--coordinator-timeout", "1"]) == 2
    assert _one_error_line(capsys).startswith(
        "error: cannot reach the coordinator at 127.0.0.1:1 (process 0) within 1 s")
    assert time.perf_counter() - t0 < 30
    with socket.socket() as taken:  # process 0 cannot listen where another program does
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        want = f"process 0 cannot serve as the coordinator at localhost:{port}"
        with pytest.raises(ValueError, match=want):
            parallel.initialize_distributed(f"localhost:{port}", 2, 0, environ={}, timeout=1)
    with pytest.raises(ValueError, match="must look like HOST:PORT"):
        parallel.initialize_distributed("localhost", 2, 1, environ={}, timeout=1)


def test_configuration_values_at_the_edges_of_their_types(capsys):
    from train.config import UserError, build

    for layer, message in [({"seed": 2**32}, "seed=4294967296 is out of range: must be below 2**32"),
                           ({"steps": 2**63}, "steps=9223372036854775808 is out of range"),
                           ({"lr": 1e308}, "lr=1e+308 is out of range: float32, in which training runs, "
                                           "makes it inf"),
                           ({"lr": 1e-50}, "makes it 0"), ({"t1": 1e39}, "solve.t1=1e+39 is out of range")]:
        with pytest.raises(UserError, match=re.escape(message)):
            build(toy.ToyConfig, layer)
    assert build(toy.ToyConfig, {"seed": 2**32 - 1, "lr": 3e38}).seed == 2**32 - 1
    assert toy.main(["--workdir", "unused", "--model", "open,closed,open", "--no-progress"]) == 2
    assert _one_error_line(capsys) == ("error: --set model=open,closed,open: names 'open' more than once "
                                       "(each value is one run, in its own directory)")


def test_edited_manifests_and_partial_saves(tmp_path, capsys):
    """A checkpoint whose manifest was edited is damaged (the older one is used, with a message);
    the directory a killed save leaves behind is removed by the next save."""
    import json

    from train.checkpoint import Checkpointer

    tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "step": np.asarray(0)}
    edits = {"identity": lambda m: {**m, "identity": {"task": "toy", "config": {"lr": 0.5}}},
             "step": lambda m: {**m, "step": 7}, "shape": lambda m: {**m, "leaves": [
                 [n, [3, 2] if n == "['w']" else s, d] for n, s, d in m["leaves"]]},
             "not an object": lambda m: [m]}
    for what, edit in edits.items():
        ckpt = Checkpointer(tmp_path / what, identity={"task": "toy", "config": {}})
        ckpt.save(1, tree)
        ckpt.save(2, {**tree, "step": np.asarray(2)})
        path = tmp_path / what / "step_00000002" / "manifest.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        assert int(ckpt.restore(tree)["step"]) == 0, what  # step 1's state
        assert "from step 1 instead of damaged step(s) [2]" in capsys.readouterr().err, what
    stale = tmp_path / "step" / ".tmp_step_00000003_1"
    stale.mkdir()
    (stale / "arrays.npz").write_bytes(b"partial")
    Checkpointer(tmp_path / "step").save(3, tree)
    assert not stale.exists()


def test_run_time_messages_found_in_jax_errors():
    text = "INTERNAL: CpuCallback error\n_EquinoxRuntimeError: {}\n--------\nAn error occurred"
    assert engine.library_message(RuntimeError(text.format("ncode_jax.solve: x0 contains NaN or inf"))) == (
        "ncode_jax.solve: x0 contains NaN or inf")
    diffrax = "The maximum number of solver steps was reached. Try increasing `max_steps`."
    assert engine.library_message(ValueError(text.format(diffrax))) == "diffrax: " + diffrax
    assert engine.library_message(RuntimeError("a bug")) is None


@pytest.mark.slow  # two jax.distributed processes (~15 s); before, process 1 waited for process 0 forever
def test_a_save_that_fails_on_process_0_ends_every_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "reflection_open").mkdir()
    (tmp_path / "reflection_open" / "checkpoints").write_text("")  # process 0 cannot save here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    procs = [subprocess.Popen([sys.executable, "-m", "train.toy", "--workdir", str(tmp_path), *FLAGS, *RK4,
                               "--steps", "3", "--coordinator-address", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
             for i in range(2)]
    try:
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [err.strip().splitlines()[-1] if err.strip() else "" for _, err in results]
    assert [p.returncode for p in procs] == [2, 2], results
    assert errors[0].startswith("error: cannot write the checkpoint of step 1"), errors
    assert errors[1].startswith("error: process 0 could not save step 1"), errors
