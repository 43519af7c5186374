"""A run whose Ray worker dies without raising (SIGKILL, the out-of-memory killer): the driver says so in
one line with the likely cause, and the run's record says "killed" instead of "running" forever."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.exceptions

from orchestration.execution.killed import WorkerKilled, killed
from shortcut import record

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("processes")  # xdist group: see conftest.py


def _dead_run(rundir: Path, pid: int) -> None:
    """A run directory as a SIGKILLed worker leaves it: record "running", its name in the lock file."""
    rundir.mkdir(parents=True)
    record.write(rundir, {"name": "digits_flow", "status": "running", "pid": pid})
    (rundir / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "-"}) + "\n")


def test_the_kernel_logs_out_of_memory_kill_is_named_and_recorded(tmp_path):
    rundir = tmp_path / "digits_flow" / "abc"
    _dead_run(rundir, 4242)
    log = ("[  445.9] Out of memory: Killed process 4242 (python) total-vm:23446428kB, anon-rss:21707880kB\n"
           "[  446.0] Out of memory: Killed process 42 (python)\n")
    error = killed(ray.exceptions.WorkerCrashedError(), rundir, kernel_log=log)
    assert isinstance(error, WorkerKilled) and error.exit_code == 1
    assert "pid 4242" in str(error) and "out-of-memory killer sent it SIGKILL" in str(error)
    assert "Killed process 4242" in str(error) and "\n" not in str(error)
    rec = record.read(rundir)
    assert rec["status"] == record.KILLED and "out-of-memory" in rec["error"] and rec["finished"]


def test_a_kill_without_a_kernel_trace_says_what_is_not_known(tmp_path):
    rundir = tmp_path / "digits_flow" / "abc"
    _dead_run(rundir, 4242)
    error = killed(ray.exceptions.WorkerCrashedError(), rundir, kernel_log="Killed process 42424\n")
    assert "killed by a signal or crashed in native code" in str(error) and "no out-of-memory kill" in str(error)
    assert record.read(rundir)["status"] == record.KILLED


def test_other_errors_are_not_deaths_and_a_finished_or_held_record_is_left_alone(tmp_path):
    assert killed(ValueError("x"), tmp_path) is None
    assert killed(ray.exceptions.RayTaskError("f", "tb", ValueError("x")), tmp_path) is None
    rundir = tmp_path / "r"
    _dead_run(rundir, 4242)
    record.write(rundir, {"status": "finished"})
    killed(ray.exceptions.WorkerCrashedError(), rundir, kernel_log="")
    assert record.read(rundir)["status"] == "finished"


@pytest.mark.timeout(300)
def test_a_sigkilled_worker_is_reported_by_the_driver_and_recorded(tmp_path):
    """Through a real local Ray instance, no retries: the worker is SIGKILLed mid-training."""
    overrides = ["train.steps=5000", "train.log_every=100", "train.checkpoint_every=1000", "eval.steps=[1]",
                 "eval.num_samples=64", "eval.batch_size=64", "eval.grid_size=16", "eval.curve_every=null",
                 "resources.cpus=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestration.run_experiment", "digits_flow", "--cpus", "1", "--no-tracking",
         "--workdir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
         *[a for o in overrides for a in ("--set", o)]],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, SHORTCUT_RAY_MAX_RETRIES="0"))
    deadline, pid = time.time() + 240, None
    while pid is None and time.time() < deadline and proc.poll() is None:
        for path in (tmp_path / "runs").glob("digits_flow/*/run.json"):
            rec = record.read(path)
            if rec and rec.get("status") == "running" and rec.get("pid"):
                pid = rec["pid"]
        time.sleep(0.2)
    assert pid is not None, "the run never started"
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out + err)[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"pid {pid}" in lines[0] and "died without an error" in lines[0], err[-3000:]
    assert "Traceback" not in err
    [path] = (tmp_path / "runs").glob("digits_flow/*/run.json")
    assert record.read(path)["status"] == record.KILLED
