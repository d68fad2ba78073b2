"""The run engine's workdir, one test per failure it must not have: lock, hang-free failed saves, verified
checkpoints with fallback, append-only metrics, config recorded only after validation, unfinished
runs, one ``error:`` line with exit code 2. Tiny toy runs (16 points, rk4 dt 0.5)."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train import autoencode, autoencode_eval, engine, toy
from train.checkpoint import CheckpointError
from train.config import UserError, build

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
X64 = False
REPO = Path(__file__).resolve().parents[1]
TINY = dict(problem="reflection", model="open", n_train=16, n_test=16, hidden=4, control_hidden=4,
            solver="rk4", dt=0.5, log_every=1, checkpoint_every=2, figures=False)
FLAGS = ["--problem", "reflection", "--model", "open", "--n-train", "16", "--n-test", "16", "--hidden", "4",
         "--control-hidden", "4", "--no-progress", "--figures", "false"]


def cfg(**kw):
    return build(toy.ToyConfig, {**TINY, **kw})


def train_one(config, workdir):  # the one run of train.toy's layout: workdir/<problem>_<model>
    return engine.train(toy.Task, config, workdir / "reflection_open", progress=False)


def params(workdir):
    return jax.tree.leaves(engine.load_run(workdir / "reflection_open").params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run and a run stopped after 4 steps (checkpoints 2 and 4 kept)."""
    root = tmp_path_factory.mktemp("runs")
    train_one(cfg(steps=6), root / "straight")
    train_one(cfg(steps=4), root / "partial")
    return root


def _copy(runs, tmp_path):
    shutil.copytree(runs / "partial", tmp_path / "w")
    return tmp_path / "w", tmp_path / "w" / "reflection_open" / "checkpoints" / "step_00000004"


def test_corrupt_checkpoint_falls_back_and_metrics_survive_a_torn_write(runs, tmp_path, monkeypatch, capsys):
    work, latest = _copy(runs, tmp_path)
    data = bytearray((latest / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (latest / "arrays.npz").write_bytes(bytes(data))
    metrics = work / "reflection_open" / "metrics.jsonl"
    size = metrics.stat().st_size

    real = engine.append_rows

    def torn(path, rows):  # a kill in the middle of the metrics write
        text = "".join(json.dumps(r) + "\n" for r in rows)
        with open(path, "a") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt("killed during the metrics write")

    monkeypatch.setattr(engine, "append_rows", torn)
    with pytest.raises(KeyboardInterrupt):
        train_one(cfg(steps=6), work)
    err = capsys.readouterr().err
    assert "step_00000004 is damaged" in err and "from step 2 instead of damaged step(s) [4]" in err
    monkeypatch.setattr(engine, "append_rows", real)
    train_one(cfg(steps=6), work)
    for a, b in zip(params(work), params(runs / "straight"), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical to the uninterrupted run
    assert metrics.stat().st_size > size  # appended, never rewritten
    rows = engine.read_metrics(metrics)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_truncated_checkpoint_falls_back(runs, tmp_path, capsys):
    work, latest = _copy(runs, tmp_path)
    data = (latest / "arrays.npz").read_bytes()
    (latest / "arrays.npz").write_bytes(data[: len(data) // 3])
    assert engine.load_run(work / "reflection_open").step == 2
    assert "step_00000004 is damaged" in capsys.readouterr().err
    train_one(cfg(steps=6), work)
    for a, b in zip(params(work), params(runs / "straight"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_model_is_refused(runs, tmp_path):
    work, _ = _copy(runs, tmp_path)
    (work / "reflection_open" / "config.json").unlink()  # nothing left to compare but the arrays
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train_one(cfg(steps=6, hidden=5), work)
    assert not (work / "reflection_open" / "config.json").exists()


def test_second_run_on_a_workdir_is_refused(tmp_path):
    target = str(tmp_path / "reflection_open")
    code = ("import time; from train.checkpoint import WorkdirLock; "
            f"WorkdirLock({target!r}); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on "):
            train_one(cfg(steps=2), tmp_path)
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            engine.WorkdirLock(tmp_path / "reflection_open")
    finally:
        holder.kill()
        holder.wait()
    engine.WorkdirLock(tmp_path / "reflection_open").release()  # the kernel dropped the dead holder's lock


def test_unwritable_checkpoint_dir_ends_the_process_at_once(tmp_path):
    ckpt = tmp_path / "reflection_open" / "checkpoints"
    ckpt.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(ckpt)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "train.toy", "--workdir", str(tmp_path), *FLAGS,
                               "--steps", "2", "--solver", "rk4", "--dt", "0.5"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        elapsed = time.perf_counter() - t0
    finally:
        subprocess.run(["chattr", "-i", str(ckpt)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot write the checkpoint of step 2")
    assert "Traceback" not in proc.stderr and elapsed < 300


def test_refused_run_can_be_corrected_in_place(tmp_path, capsys):
    assert toy.main(["--workdir", str(tmp_path), *FLAGS, "--set", "solver=rk4", "--set", "dt=none"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert toy.main(["--workdir", str(tmp_path), *FLAGS, "--rtol", "-1"]) == 2
    assert not list(tmp_path.glob("*/config.json"))
    fixed = ["--steps", "1", "--solver", "rk4", "--dt", "0.5"]
    assert toy.main(["--workdir", str(tmp_path), *FLAGS, *fixed]) == 0
    # keys that do not change the experiment may change on resume; the others may not
    task = toy.Task(cfg(steps=9, checkpoint_every=7, solver="rk4", dt=0.5))
    engine.check_recorded_config(tmp_path / "reflection_open", task)
    with pytest.raises(UserError, match="different configuration .*lr: 0.01 -> 0.5"):
        engine.check_recorded_config(tmp_path / "reflection_open", toy.Task(cfg(lr=0.5)))


def test_data_errors_are_refused_before_the_workdir_is_used(tmp_path, capsys):
    base = ["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir", str(tmp_path / "w")]
    for sets, message in [(["train_split=nope"], "nope"),
                          (["dataset=mnist", f"data_dir={tmp_path}"], "'mnist' is not prepared"),
                          (["num_devices=1", "epochs=0"], "epochs=0 is out of range")]:
        rc = autoencode.main([*base, *sum((["--set", s] for s in sets), []), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w").exists()
    # data_dir does not change an embedded set's experiment: a resume may change it, not the lr
    from train import classify

    tiny = dict(dataset="digits", hidden=2, augment=1, solver="euler", dt=0.5)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(
        {"task": "classify", "config": engine.to_dict(build(classify.ClassifyConfig, tiny))}))
    engine.check_recorded_config(tmp_path / "c", classify.Task(build(classify.ClassifyConfig, tiny,
                                                                     {"data_dir": str(tmp_path)})))
    with pytest.raises(UserError, match="different configuration .*lr"):
        engine.check_recorded_config(tmp_path / "c", classify.Task(build(classify.ClassifyConfig, tiny,
                                                                         {"lr": 0.5})))


@pytest.mark.parametrize("argv, message", [
    (["--set", "train_examples=abc"], "train_examples='abc': expected int or none"),
    (["--set", "widths=abc"], "widths='abc'"),
    (["--set", "seed=-1"], "seed=-1 is out of range"),
    (["--set", "lr=inf"], "lr=inf is out of range: must be finite"),
    (["--set", "nokey=1"], "unknown config key 'nokey'"),
    (["--config", "train/configs"], "--config train/configs: is a directory"),
])
def test_user_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = ["--config", "train/configs/autoencode_mnist5k_cpu.py", "--workdir", str(tmp_path), *argv]
    assert autoencode.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_unwritable_workdir_and_bad_weights_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert toy.main(["--workdir", str(tmp_path / "file" / "w"), *FLAGS, "--steps", "1"]) == 2
    assert "cannot use the workdir" in capsys.readouterr().err
    (tmp_path / "w.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="--inception-weights .*w.npz: cannot read it"):
        autoencode_eval.Features(tmp_path, "mnist5k", None, str(tmp_path / "w.npz"))


def test_unfinished_run_is_refused_by_its_readers(tmp_path, monkeypatch, capsys):
    from train.checkpoint import Checkpointer

    real = Checkpointer.save

    def die_after_first(self, step, state):
        real(self, step, state)
        raise KeyboardInterrupt("simulated kill")

    ae = build(autoencode.AutoencodeConfig, dict(dataset="digits", model="ae", widths=(8,), latent_dim=2,
                                                 epochs=1, batch_size=32, train_examples=96,
                                                 checkpoint_every=1))
    monkeypatch.setattr(Checkpointer, "save", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        autoencode.train_and_evaluate(ae, tmp_path / "ae", progress=False)
    monkeypatch.setattr(Checkpointer, "save", real)
    run = engine.load_run(tmp_path / "ae")
    assert (run.step, run.finished) == (1, False)
    assert autoencode_eval.main(["--workdir", str(tmp_path), "--components", "2"]) == 2
    assert "unfinished runs: ae (step 1 of 3)" in capsys.readouterr().err


def test_config_values_of_the_wrong_type_are_refused():
    for layer, message in [({"epochs": True}, "epochs=True: expected int"),
                           ({"lr": False}, "lr=False: expected float"),
                           ({"widths": "4,x"}, "widths='4,x': expected a comma list of ints"),
                           ({"solve": {"dt": "abc"}}, "solve.dt='abc': expected float or none"),
                           ({"solve": {"dt": "1/0"}}, "solve.dt='1/0': expected float or none"),
                           ({"lr": "1" * 400 + "/1"}, "expected float"),  # overflows a float
                           ({"epochs": "4/2"}, "epochs='4/2': expected int")]:
        with pytest.raises(UserError, match=re.escape(message)):
            build(autoencode.AutoencodeConfig, layer)


def test_a_float_can_be_written_as_a_fraction():
    # `--set dt=1/3`: the step size that makes 3 rk4 steps on [0, 1] (was refused as not a float)
    for text in ("1/3", " 1 / 3 "):
        assert build(autoencode.AutoencodeConfig, {"solve": {"dt": text}}).solve.dt == 1 / 3
    assert build(autoencode.AutoencodeConfig, {"lr": "3/1000"}).lr == 0.003



def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) during training: one ``error:`` line, exit code 130, no
    traceback (resuming after a kill: the tests above and in test_classify/test_autoencode_train)."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run_configs", interrupted)
    assert toy.main(["--workdir", str(tmp_path), *FLAGS, "--steps", "4"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    want = "error: interrupted: the same command resumes from the last saved checkpoint"
    assert err.strip().splitlines() == [want]


def test_a_resume_is_compared_with_what_wrote_the_checkpoint(runs, tmp_path):
    """Without ``config.json`` (deleted) a resume with another learning rate trained on under it and
    recorded it as the whole run's: the checkpoint now carries the run's identity."""
    work, _ = _copy(runs, tmp_path)
    record = work / "reflection_open" / "config.json"
    saved = json.loads(record.read_text())
    record.unlink()
    with pytest.raises(CheckpointError,
                       match=r"step_00000004 was written by another experiment \(lr: 0.01 -> 0.03\)"):
        train_one(cfg(steps=6, lr=0.03), work)
    assert not record.exists()
    run = engine.load_run(work / "reflection_open")  # rebuilt from the checkpoint's identity
    assert (run.step, run.finished, run.config) == (4, True, cfg(steps=4))
    record.write_text(json.dumps({**saved, "config": {**saved["config"], "lr": 0.03}}))  # an edited record
    with pytest.raises(CheckpointError, match=r"another experiment \(lr: 0.01 -> 0.03\)"):
        engine.load_run(work / "reflection_open")
    with pytest.raises(UserError, match="different configuration"):
        train_one(cfg(steps=6, hidden=5), work)  # the record, where there is one, is checked first


def test_a_checkpoint_of_the_previous_format_is_refused_in_one_line(runs, tmp_path, capsys):
    """A checkpoint written before the whole train state was saved (format 1: no ``format`` in its
    manifest) is refused, naming the format, not read as damaged or of another model."""
    from train import checkpoint

    work, latest = _copy(runs, tmp_path)
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["format"] == checkpoint.FORMAT == 2
    del manifest["format"], manifest["check"]
    manifest["check"] = checkpoint._manifest_check(manifest)  # intact, as the old version wrote it
    (latest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"step_00000004 is in checkpoint format 1, which this version "
                                              r"does not read \(it reads format 2\)"):
        engine.load_run(work / "reflection_open")
    argv = ["--workdir", str(work), *FLAGS, "--steps", "6", "--solver", "rk4", "--dt", "0.5"]
    assert toy.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: the checkpoint ") and (
        "checkpoint format 1" in err and "delete that directory to start over" in err), err


def test_the_train_state_is_one_pytree_checkpointed_whole_and_donated_to_the_step(runs):
    from train import parallel

    task = toy.Task(cfg(steps=4))
    optimizer = task.optimizer(task.total_steps)
    state = engine.init_state(task, optimizer)
    shapes = jax.eval_shape(lambda: engine.init_state(task, optimizer))
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    # the checkpoint holds the whole state (and the data position and wall time), nothing else
    manifest = json.loads((runs / "partial" / "reflection_open" / "checkpoints" / "step_00000004" /
                           "manifest.json").read_text())
    saved = {name for name, *_ in manifest["leaves"]}
    want = {"['state']" + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert saved == want | {"['data']['epoch']", "['data']['index']", "['wall_time']"}
    assert {".step", ".rng"} <= {n[len("['state']"):] for n in want}
    dp = parallel.DataParallel.create(1)
    step = engine.compile_step(task, optimizer, dp)
    placed = dp.replicate(state)
    batch = dp.shard_batch(*task.prepare(next(task.batches()), 0))
    new, metrics, largest = step(placed, batch)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"])) and "mse" in metrics
    assert float(largest) == max(float(np.max(np.abs(x))) for x in jax.tree.leaves(new.params))
    assert all(x.is_deleted() for x in jax.tree.leaves(placed))  # donated: its buffers were reused
