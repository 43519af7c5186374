"""Ray Jobs submission (orchestration/execution/jobs.py) against a real local Ray head node on 127.0.0.1.

The head node runs from this virtualenv (its bin/ first on PATH, so the job's `python` is the venv's)
with every port of its own, a short temp dir of its own and token authentication with a token of its
own, so that it can share the machine with other Ray instances and does not depend on ~/.ray/auth_token;
it gets none of the test's SHORTCUT_*/MLFLOW_* variables: a job's come from the submission (`env_vars`,
and the SHORTCUT_* variables that jobs.submit forwards).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission")
import psutil  # noqa: E402  (a dependency of ray[default])
import requests  # noqa: E402

from orchestration.execution import jobs  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("processes")]  # xdist group: see conftest.py
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    """This head node's processes: those whose command line names its temp dir (Ray's own, its workers)
    or that run in it (a job's entrypoint runs in the working_dir copy under it)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if any(temp_dir in arg for arg in p.info["cmdline"] or ()) or (p.info["cwd"] or "").startswith(temp_dir):
            found.append(p)
    return found


def _logs(temp_dir: str) -> str:
    """The tails of `ray start`'s output and of the dashboard's log, for a head node that did not come up."""
    files = [Path(temp_dir) / "ray_start.log", *Path(temp_dir).glob("session_*/logs/dashboard.*")]
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-2000:]}" for f in files if f.is_file())


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own process group; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = \
        _free_ports(9)
    worker_min = random.randrange(20000, 30000, 200)  # below the ephemeral ports above, above Ray's defaults
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHORTCUT_", "MLFLOW_", "RAY_")) and k != "PYTHONPATH"}
    token = uuid.uuid4().hex  # token authentication, as a local cluster gets once ~/.ray/auth_token exists
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--include-dashboard", "true", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
           "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
           "--min-worker-port", str(worker_min), "--max-worker-port", str(worker_min + 199),
           "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(200 * 1024**2),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=temp_dir)
    address = f"http://127.0.0.1:{dashboard}"
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_TOKEN", token)  # where the client finds it, as Ray's own tools do
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{_logs(temp_dir)}"
            try:
                if requests.get(f"{address}/api/jobs/", timeout=2,
                                headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"Ray dashboard did not answer within 90 s:\n{_logs(temp_dir)}"
            time.sleep(0.5)
        yield address
    finally:
        patch.undo()
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):  # gcs_server may sit out SIGTERM 20+ s
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 10  # any process outside the group (a worker, a job) leaves with the raylet
        while (stray := _processes_of(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in stray:  # still there: ours by their temp dir
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        assert not stray, f"stray Ray processes of {temp_dir}: {[p.pid for p in stray]}"
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_smoke_run_as_a_ray_job(ray_head, tmp_path):
    out = io.StringIO()
    env_vars = {"SHORTCUT_TRACKING": "off", "SHORTCUT_RESULTS_DIR": str(tmp_path / "results")}
    started = time.monotonic()
    code = jobs.submit_and_follow(["digits_shortcut", "--smoke", "--no-tracking", "--workdir", str(tmp_path)],
                                  ray_head, env_vars=env_vars, out=out)
    logs = out.getvalue()
    print(f"\n--- job output ({time.monotonic() - started:.0f}s) ---\n{logs}")
    assert code == 0, logs
    assert "submitted Ray job shortcut-digits_shortcut-" in logs
    [run_json] = tmp_path.glob("digits_shortcut/*/run.json")
    assert f"digits_shortcut finished: {run_json.parent}" in logs
    record = json.loads(run_json.read_text())
    assert record["status"] == "finished" and record["smoke"] is True
    assert not (tmp_path / "results").exists()  # a smoke run exports no results record


def test_failing_job_exits_1_with_its_error_in_the_logs(ray_head):
    out = io.StringIO()
    code = jobs.submit_and_follow(["no_such_spec"], ray_head, env_vars={"SHORTCUT_TRACKING": "off"}, out=out,
                                  submission_id=f"shortcut-test-failing-{os.getpid()}-{time.time_ns()}")
    logs = out.getvalue()
    assert code == 1, logs
    assert "error:" in logs and "no_such_spec" in logs, logs
    assert "failed (driver exit code" in logs, logs


def test_nothing_listening_is_a_clear_quick_error():
    [port] = _free_ports(1)
    started = time.monotonic()
    with pytest.raises(jobs.JobSubmissionError) as e:
        jobs.submit(["digits_shortcut", "--smoke"], f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    message = str(e.value)
    assert message.startswith(f"no Ray dashboard answers at http://127.0.0.1:{port}: ")
    assert "Connection refused" in message and "ray start --head" in message and "\n" not in message


def test_missing_or_wrong_token_is_a_clear_error(ray_head, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(jobs.JobSubmissionError, match=r"refused the authentication token \(HTTP 403\)"):
        jobs.connect(ray_head)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(jobs.JobSubmissionError, match="requires an authentication token: set RAY_AUTH_TOKEN"):
        jobs.connect(ray_head)


def test_job_addresses():
    assert jobs.is_job_address("http://127.0.0.1:8265") and jobs.is_job_address("https://ray.example:443/")
    assert not any(map(jobs.is_job_address, [None, "", "auto", "127.0.0.1:6379", "ray://host:10001"]))


class _InterruptedClient:
    """Just enough of JobSubmissionClient: the log stream is cut by Ctrl-C; stop_job stops the job."""

    def __init__(self):
        self.stopped = []

    def get_address(self):
        return "http://127.0.0.1:8265"

    async def tail_job_logs(self, job_id):
        yield "step 2/4 ...\n"
        raise KeyboardInterrupt

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        return True

    def get_job_info(self, job_id):
        from ray.job_submission import JobStatus

        return type("Info", (), {"status": JobStatus.STOPPED if self.stopped else JobStatus.RUNNING})()


@pytest.mark.parametrize("answer, stopped, code", [(True, True, 130), (False, False, 0), (None, False, 130)])
def test_ctrl_c_asks_whether_to_stop_the_job(answer, stopped, code):
    client, out, questions = _InterruptedClient(), io.StringIO(), []
    result = jobs.follow(client, "job-1", out=out, stop_prompt=lambda q: questions.append(q) or answer)
    assert result == code
    assert questions == ["stop Ray job job-1? [y/N] "]
    assert client.stopped == (["job-1"] if stopped else [])
    logs = out.getvalue()
    assert logs.startswith("step 2/4 ...\n")
    if stopped:
        assert "Ray job job-1: STOPPED" in logs
    else:
        assert "ray job logs --address http://127.0.0.1:8265 --follow job-1" in logs
        assert "ray job stop --address http://127.0.0.1:8265 job-1" in logs
