"""Training that survives its failures: preemption signals, non-finite states, damaged checkpoints, a second run in
the same workdir, and metrics after kills and resumes."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from eomt_jax import config_lib, train, train_step
from eomt_jax.checkpoints import DAMAGED, Checkpointer, IncompatibleCheckpoint
from eomt_jax.mesh import make_mesh
from eomt_jax.metric_writer import MetricWriter
from eomt_jax.preemption import StopSignals
from eomt_jax.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock
from tests.tiny import REPO, runlocal_config


# Every run in this file trains the same program: the same schedule (TOTAL_STEPS; runs end early by
# max_steps_per_run, a signal or an error) and the on-device matcher. JAX's compilation cache then compiles the
# train step once for the whole file; the default (scipy) matcher's host callback would make every run compile
# anew. What these tests check (signals, saves, restores, locks) does not depend on the matcher; training with
# the default matcher, resumed and across processes: tests/test_resume.py, tests/test_multiprocess.py.
TOTAL_STEPS = 200
MATCHER = "optax"


def _config(data: Path, checkpoint_every: int = 100, max_steps: int = 0):
    config = runlocal_config("coco_panoptic_large")
    config.total_steps = TOTAL_STEPS
    config.max_steps_per_run = max_steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = checkpoint_every
    config.eval_every_steps = 100
    config.loss.matcher = MATCHER
    config.data.root = str(data)
    return config


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _wait_for(predicate, timeout: float = 240.0, what: str = "") -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError(what)
        time.sleep(0.2)


# -- preemption ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_resume_continues_from_it(tmp_path, caplog):
    """`python -m eomt_jax.main` stopped by SIGTERM finishes its step, saves it, exits 143; the same run again
    resumes from that step and logs each step once. (That a resumed run's losses equal an uninterrupted run's:
    tests/test_resume.py.)"""
    data = tmp_path / "data"
    config = _config(data, checkpoint_every=2)
    workdir = tmp_path / "preempted"
    command = [sys.executable, "-m", "eomt_jax.main", "--config=configs/coco_panoptic_large.py:runlocal",
               f"--workdir={workdir}", f"--config.total_steps={TOTAL_STEPS}", "--config.log_every_steps=1",
               "--config.checkpoint_every_steps=2", "--config.eval_every_steps=100", f"--config.data.root={data}",
               f"--config.loss.matcher={MATCHER}"]
    # This process's devices, precision and compilation cache: the program is the one the other tests compile.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(jax.config.jax_persistent_cache_min_compile_time_secs))
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (workdir / "checkpoints" / "2").exists() or proc.poll() is not None, what="first checkpoint")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]
    before = _metrics(workdir)
    reached = before[-1]["step"]
    assert [m["step"] for m in before] == list(range(1, reached + 1))
    assert reached < TOTAL_STEPS, "the run ended before the signal: nothing tested"
    assert Checkpointer(workdir / "checkpoints").latest_step() == reached
    assert f"stopped by SIGTERM after step {reached}" in out
    assert not (workdir / LOCK_FILE).exists()

    config.max_steps_per_run = 2
    with caplog.at_level(logging.INFO, logger="eomt_jax"):
        assert train.run(config, workdir, "train")["step"] == reached + 2  # the same run again: resumes
    assert f"resuming from {workdir / 'checkpoints'} step {reached}" in caplog.text
    resumed = _metrics(workdir)
    assert [m["step"] for m in resumed] == list(range(1, reached + 3))
    assert resumed[:reached] == before  # the steps before the signal, as logged then
    assert all(np.isfinite(m["train/loss"]) for m in resumed)


def test_sigint_finishes_the_step_saves_it_and_exits_130(tmp_path):
    config = _config(tmp_path / "data")
    workdir = tmp_path / "w"

    def interrupt():
        _wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(_metrics(workdir)) >= 2, what="two steps")
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, which runs the loop

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(train.TrainingInterrupted, match="stopped by SIGINT") as stopped:
        train.run(config, workdir, "train")
    assert stopped.value.exit_code == 130
    reached = _metrics(workdir)[-1]["step"]
    assert 2 <= reached < TOTAL_STEPS
    assert Checkpointer(workdir / "checkpoints").all_steps() == [reached]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.should_stop(5) and exits == []
        signal.raise_signal(signal.SIGTERM)
        assert exits == [143]
        signal.raise_signal(signal.SIGINT)
        assert exits == [143, 130]


# -- non-finite states -----------------------------------------------------------------------------------------------


def test_a_non_finite_state_is_never_saved_and_the_last_finite_checkpoint_is_named(tmp_path, monkeypatch):
    # Parameters turn NaN in the 5th update; losses are only looked at every 20 steps, checkpoints every step.
    jit_step = train_step.TrainSetup.jit_step

    def poisoned(self):
        step = jit_step(self)
        calls = []

        def run(state, batch):
            state, metrics = step(state, batch)
            calls.append(1)
            if len(calls) == 5:
                state = dict(state, params=jax.tree.map(lambda p: p * np.nan, state["params"]))
            return state, metrics

        return run

    monkeypatch.setattr(train_step.TrainSetup, "jit_step", poisoned)
    monkeypatch.setattr(train, "compile_and_report", lambda fn, *a, **k: fn)
    config = _config(tmp_path / "data", checkpoint_every=1)
    config.log_every_steps = 20
    workdir = tmp_path / "w"
    with pytest.raises(train.NonFiniteLoss, match=f"at step 5 .*last finite checkpoint: {workdir}/checkpoints/4"):
        train.run(config, workdir, "train")
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.all_steps() == [2, 3, 4]  # rotation (keep 3) kept finite ones only
    setup = train_step.setup(config, config_lib.model_config(config), make_mesh(config.mesh))
    for step in ckpt.all_steps():
        assert np.isfinite(float(optax.tree.norm(ckpt.restore(step, setup.abstract_state)["params"])))


# -- damaged checkpoints ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with checkpoints 2, 4 and 6 of a run stopped after 6 steps, and its config."""
    tmp = tmp_path_factory.mktemp("trained")
    config = _config(tmp / "data", checkpoint_every=2, max_steps=6)
    train.run(config, tmp / "w", "train")
    return config, tmp / "w"


def _truncate_largest_array(state: Path) -> None:
    largest = max((state / "d").iterdir(), key=lambda f: f.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(100)


DAMAGE = {
    "manifest deleted": lambda state: (state / "manifest.ocdbt").unlink(),
    "metadata deleted": lambda state: (state / "_METADATA").unlink(),
    "array file truncated": _truncate_largest_array,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(trained, tmp_path, damage, caplog):
    config, source = trained
    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "6" / "state")
    setup = train_step.setup(config, config_lib.model_config(config), make_mesh(config.mesh))
    ckpt = Checkpointer(workdir / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="eomt_jax"):
        step, state = train._restore_latest(ckpt, setup)
    ckpt.close()
    assert step == 4 and np.isfinite(float(optax.tree.norm(state["params"])))
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"{workdir}/checkpoints/6 cannot be restored" in message and "resuming from step 4" in message
    assert len(message) < 2000 and "Event loop is closed" not in message
    assert (workdir / DAMAGED / "6").is_dir()
    if damage == "manifest deleted":  # and the run goes on past the set-aside step
        config = config.copy_and_resolve_references()
        config.max_steps_per_run = 4  # steps 5 to 8
        train.run(config, workdir, "train")
        assert Checkpointer(workdir / "checkpoints").all_steps() == [4, 6, 8]
        assert [m["step"] for m in _metrics(workdir)] == list(range(1, 9))


def test_no_restorable_checkpoint_is_one_error(trained, tmp_path):
    config, source = trained
    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    for step in (2, 4, 6):
        (workdir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    setup = train_step.setup(config, config_lib.model_config(config), make_mesh(config.mesh))
    with pytest.raises(train.TrainingError, match="no checkpoint .* can be restored .*step 6: .*step 2: "):
        train._restore_latest(Checkpointer(workdir / "checkpoints"), setup)


def test_a_changed_architecture_names_the_first_differing_parameter(trained, tmp_path):
    config, source = trained
    config = config.copy_and_resolve_references()
    config.model.num_queries = 12
    setup = train_step.setup(config, config_lib.model_config(config), make_mesh(config.mesh))
    with pytest.raises(IncompatibleCheckpoint, match=r"params/q/embedding has shape \(8, 64\) in the checkpoint but "
                                                     r"\(12, 64\) in the config"):
        train._restore_latest(Checkpointer(source / "checkpoints"), setup)


# -- one run per workdir ---------------------------------------------------------------------------------------------


def test_a_second_run_in_a_busy_workdir_is_refused(trained, tmp_path):
    config, _ = trained
    workdir = tmp_path / "w"
    with WorkdirLock(workdir):  # a live run of this process holds it
        with pytest.raises(WorkdirBusy, match=f"in use by another run \\(pid {os.getpid()}"):
            train.run(config, workdir, "train")
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "started": "then"}))
    with WorkdirLock(tmp_path) as held:  # same host, process gone
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy):
            WorkdirLock(tmp_path).acquire()
        held.heartbeat()
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(WorkdirBusy, match="host elsewhere"):
        WorkdirLock(tmp_path).acquire()  # another host, recently refreshed: may be alive
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with WorkdirLock(tmp_path, stale_after=600):  # not refreshed for an hour: dead
        pass


# -- metrics ---------------------------------------------------------------------------------------------------------


def test_metrics_hold_each_step_once_after_a_kill_and_resume(tmp_path):
    config = runlocal_config()
    rows = [{"step": s, "train/loss": float(s)} for s in range(1, 8)]
    # A run killed (SIGKILL) after step 7 with its last checkpoint at 5, the final row cut short.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "tr')
    writer = MetricWriter(tmp_path, config, resume_step=5)
    for s in (6, 7):
        writer.write(s, {"train/loss": 10.0 * s})
    writer.close()
    assert [(m["step"], m["train/loss"]) for m in _metrics(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0), (7, 70.0)]


def test_a_failing_save_is_one_error_naming_the_cause(tmp_path, monkeypatch):
    def full_disk(self, step, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self.directory / str(step) / "state"))

    monkeypatch.setattr(Checkpointer, "save", full_disk)
    config = _config(tmp_path / "data", checkpoint_every=2)
    with pytest.raises(train.TrainingError, match=r"saving checkpoint .*/checkpoints/2 failed: OSError: \[Errno 28\] "
                                                  r"No space left on device"):
        train.run(config, tmp_path / "w", "train")
    assert not (tmp_path / "w" / LOCK_FILE).exists()
