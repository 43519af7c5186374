"""Tracking servers stop on time under load: with two CPU burners running, the local MLflow server a run
started through Ray is gone within its idle timeout plus 10 s of the run's end, and its supervisor logged
the stop (orchestration/tracking/server.py, stops.jsonl: last lease ended, stop started, server exited).

The default test takes the leases the way a run's tracker does, from Ray workers, without training; the
slow one runs ten `run_experiment --smoke` through Ray. Each prints the measured delays."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestration.tracking.server import STOPS_FILE, LocalServer, _group_members

REPO = Path(__file__).resolve().parents[1]
IDLE_S = 5.0
SLACK_S = 10.0

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("processes")]  # xdist group: see conftest.py


@contextlib.contextmanager
def cpu_burners(n: int = 2):
    """`n` busy processes, for as long as the block lasts."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _store_processes(state_dir: Path) -> list[int]:
    return [pid for g in LocalServer(state_dir, log=lambda s: None)._stray_groups() for pid in _group_members(g)]


def _gone_after(state_dir: Path, since: float) -> float:
    """Seconds from `since` (wall clock) until no process of the store's server is left; fails after
    IDLE_S + SLACK_S."""
    deadline = since + IDLE_S + SLACK_S
    while _store_processes(state_dir):
        assert time.time() < deadline, (f"the tracking server of {state_dir} outlived its idle timeout + "
                                        f"{SLACK_S:.0f}s: {_store_processes(state_dir)}; stops: {_stops(state_dir)}")
        time.sleep(0.1)
    return time.time() - since


def _stops(state_dir: Path) -> list[dict]:
    path = state_dir / STOPS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check_logged_stop(state_dir: Path) -> float:
    """The supervisor logged an idle stop whose server exited (no SIGKILL needed); returns the seconds from
    the last lease's end to the server's exit."""
    [stop] = _stops(state_dir)
    assert stop["reason"] == "idle" and "server_exited" in stop, stop
    delay = stop["server_exited"] - stop["last_lease_ended"]
    assert delay <= IDLE_S + SLACK_S, stop
    return delay


def test_servers_started_from_ray_workers_stop_on_time_under_load(tmp_path):
    """Two Ray workers each start and lease the server of their own work directory, as a run's tracker
    does, and end; with two CPU burners on, each server is gone within the idle timeout + 10 s."""
    workdirs = [tmp_path / f"work{i}" for i in range(2)]
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from orchestration.execution import cluster
        cluster.connect(num_cpus=2)
        import ray

        @ray.remote(num_cpus=1, max_calls=1)
        def lease(workdir):
            from orchestration.tracking.server import LocalServer
            server = LocalServer.for_workdir(workdir, idle_timeout={IDLE_S}, log=lambda s: None)
            server.acquire()
            server.release()
            return time.time()

        print(json.dumps(ray.get([lease.remote(w) for w in {[str(w) for w in workdirs]!r}])), flush=True)
    """)
    with cpu_burners():
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        released = json.loads(done.stdout.strip().splitlines()[-1])
        gone = [_gone_after(w / "mlflow", t) for w, t in zip(workdirs, released)]
    logged = [_check_logged_stop(w / "mlflow") for w in workdirs]
    print(f"under 2 CPU burners: server gone {', '.join(f'{g:.1f}' for g in gone)} s after the lease ended "
          f"(idle timeout {IDLE_S:.0f} s); supervisor's log: {', '.join(f'{d:.1f}' for d in logged)} s")


@pytest.mark.slow
def test_ten_smoke_runs_through_ray_leave_no_server_behind_under_load(tmp_path):
    """Ten `run_experiment digits_flow --smoke` through Ray, each in its own work directory, with two CPU
    burners on: after each, its server is gone within the idle timeout + 10 s of the driver's exit."""
    env = dict(os.environ, SHORTCUT_TRACKING="on", SHORTCUT_TRACKING_IDLE_S=str(IDLE_S))
    gone, logged = [], []
    with cpu_burners():
        for i in range(10):
            workdir = tmp_path / f"work{i}"
            done = subprocess.run([sys.executable, "-m", "orchestration.run_experiment", "digits_flow", "--smoke",
                                   "--workdir", str(workdir), "--cpus", "2", "--set", "eval.steps=[1]"], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            gone.append(_gone_after(workdir / "mlflow", time.time()))
            logged.append(_check_logged_stop(workdir / "mlflow"))
            print(f"smoke run {i + 1}: server gone {gone[-1]:.1f} s after the driver exited, "
                  f"{logged[-1]:.1f} s after its last lease ended (supervisor's log)", flush=True)
    print(f"under 2 CPU burners, 10 smoke runs: server gone {', '.join(f'{g:.1f}' for g in gone)} s after the "
          f"driver exited; supervisor's log (last lease -> exit): {', '.join(f'{d:.1f}' for d in logged)} s")
