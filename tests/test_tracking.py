"""MLflow tracking against real `mlflow server` processes on 127.0.0.1 (started by the framework)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestration import make_tables  # noqa: E402
from orchestration.tracking.server import LocalServer, _pid_alive, free_port, healthy  # noqa: E402
from orchestration.tracking.sync import RUN_ID_FILE, sync  # noqa: E402
from orchestration.tracking.tracker import Tracker, make_tracker  # noqa: E402
from tracking_fixtures import make_record, make_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("processes")  # xdist group: see conftest.py
TRAIN_KEYS = ("loss", "loss_flow", "loss_bootstrap", "grad_norm", "lr", "steps_per_sec")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One framework-managed server (kept) for the module. At the end its supervisor is SIGKILLed (no
    clean-up of its own): the server and its uvicorn worker must end with it (PR_SET_PDEATHSIG)."""
    workdir = tmp_path_factory.mktemp("work")
    srv = LocalServer.for_workdir(workdir, idle_timeout=60, log=lambda s: None)
    uri = srv.acquire(keep=True)
    srv.release()
    assert len(_store_processes(srv.dir)) >= 3  # supervisor, mlflow CLI, uvicorn
    yield workdir, uri
    os.kill(json.loads(srv.state_file.read_text())["pid"], signal.SIGKILL)
    assert _wait_until(lambda: not _store_processes(srv.dir), 30), _store_processes(srv.dir)
    assert not healthy(uri)


def _run_record_lifecycle(tracker: Tracker, record: dict, history: list[dict], status: str = "finished") -> None:
    """What shortcut.run.run does with a tracker."""
    record = dict(record, status="running")
    tracker.start(record)
    for m in history:
        tracker.log_metrics(m)
    tracker.log_evaluation(record["evaluation"])
    tracker.end(dict(record, status=status))


def test_run_is_logged_and_queried_back(server, tmp_path):
    workdir, uri = server
    spec = make_spec("digits_shortcut", "shortcut", "digits", seed=3)
    record = make_record(tmp_path / "runs", spec, {128: 1.5, 4: 2.5, 1: 3.5})
    messages = []
    tracker = Tracker.for_workdir(workdir, log=messages.append)  # reuses the running server
    _run_record_lifecycle(tracker, record, record["train"]["history"])
    assert tracker.uri == uri and not tracker.offline, messages

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "shortcut-digits"
    assert run.info.status == "FINISHED"
    assert run.data.params["model.depth"] == "3" and run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["eval.steps"] == "[128, 4, 1]" and run.data.params["seed"] == "3"
    tags = run.data.tags
    assert tags["spec_name"] == "digits_shortcut" and tags["spec_hash"] == record["spec_hash"]
    assert tags["method"] == "shortcut" and tags["dataset"] == "digits"
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == "0123456789abcdef-dirty"
    for key in TRAIN_KEYS:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        # the live points, not duplicated by the sync at the end
        assert [(m.step, m.value) for m in history] == [(h["step"], h[key]) for h in record["train"]["history"]]
    for n, v in ((128, 1.5), (4, 2.5), (1, 3.5)):
        (m,) = client.get_metric_history(run.info.run_id, f"fd_digits/{n}_steps")
        assert (m.step, m.value) == (100, v)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "run.json", "evaluation.json", "samples", "export"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == \
        {"samples/steps_128.png", "samples/steps_4.png", "samples/steps_1.png"}
    evaluation = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation.json",
                                                           str(tmp_path))).read_text())
    assert evaluation[0]["feature_net_sha256"] == "ab" * 32
    assert json.loads((Path(record["run_dir"]) / RUN_ID_FILE).read_text())["run_id"] == run.info.run_id

    # make_tables reads the same run back from the server
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper", results / "paper")
    assert make_tables.main(["--tracking-uri", uri, "--results-dir", str(results)]) == 0
    values = pd.read_csv(results / "tables" / "table1_digits_fd_digits_values.csv")
    mine = values[(values["ours_mean"] == 1.5) & (values["num_steps"] == 128)]
    assert len(mine) == 1 and mine.iloc[0]["method"] == "shortcut"


def test_resumed_run_continues_the_same_mlflow_run(server, tmp_path):
    workdir, uri = server
    spec = make_spec("digits_flow", "flow_matching", "digits", seed=4)
    record = make_record(tmp_path / "runs", spec, {128: 2.0}, history_steps=(50, 100))
    first = Tracker(uri, log=lambda s: None)
    _run_record_lifecycle(first, dict(record, evaluation=[]), record["train"]["history"], status="interrupted")
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    resumed_history = [dict(record["train"]["history"][-1], step=s, loss=1.0 / s) for s in (150, 200)]
    second = Tracker(uri, log=lambda s: None)
    second.start(dict(record, status="running", resumed_from=100))
    assert second.run_id == first.run_id
    assert client.get_run(second.run_id).info.status == "RUNNING"
    for m in resumed_history:
        second.log_metrics(m)
    # the resumed process's run.json holds only its own history; the MLflow run has all of it
    second.end(dict(record, status="finished", resumed_from=100, train=dict(record["train"], history=resumed_history)))
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == "100"
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)] == \
        [50, 100, 150, 200]
    experiment = client.get_experiment_by_name("shortcut-digits")
    same = client.search_runs([experiment.experiment_id], f"tags.spec_hash = '{record['spec_hash']}'")
    assert len(same) == 1


def test_four_processes_log_at_once_without_loss(server, tmp_path):
    workdir, uri = server
    steps = 120
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        from pathlib import Path
        from orchestration.tracking.tracker import Tracker
        from tracking_fixtures import make_record, make_spec
        seed = int(sys.argv[1])
        spec = make_spec("digits_parallel", "shortcut", "digits", seed=seed, lr=2e-3)
        record = make_record(Path({str(tmp_path)!r}) / "runs", spec, {{128: seed, 4: seed + 0.5, 1: seed + 0.25}},
                             history_steps=range(1, {steps} + 1))
        tracker = Tracker.for_workdir({str(workdir)!r})
        record["status"] = "running"
        tracker.start(record)
        for m in record["train"]["history"]:
            tracker.log_metrics(m)
        tracker.log_evaluation(record["evaluation"])
        record["status"] = "finished"
        tracker.end(record)
        assert not tracker.offline
        print(tracker.run_id)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(seed)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "warning" not in err and "locked" not in err.lower(), err[-3000:]
    run_ids = {out.split()[-1] for out, _ in outs}
    assert len(run_ids) == 4
    client = MlflowClient(uri)
    for run_id in run_ids:
        run = client.get_run(run_id)
        seed = int(run.data.params["seed"])
        assert run.info.status == "FINISHED"
        for key in TRAIN_KEYS:
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, steps + 1)), key
        assert run.data.metrics["fd_digits/4_steps"] == seed + 0.5
    log = (workdir / "mlflow" / "server.log").read_text().lower()
    assert "database is locked" not in log and "traceback" not in log


def test_server_down_is_one_warning_and_synced_later(tmp_path):
    """Down at start: one warning, no stall, synced at the end once a server is up. Down at the end:
    the tracker says it could not sync; `sync` logs the finished run.json later into the same run.
    Lifecycle: the server stops by itself once no live process holds a lease."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = make_spec("digits_down", "shortcut", "digits", seed=5)
    record = make_record(tmp_path / "runs", spec, {128: 1.0, 4: 2.0, 1: 3.0}, history_steps=range(10, 110, 10))
    messages = []
    tracker = Tracker(uri, log=messages.append)
    t0 = time.monotonic()
    tracker.start(dict(record, status="running"))
    for m in record["train"]["history"]:
        tracker.log_metrics(m)
    assert time.monotonic() - t0 < 10, "an unreachable server must not stall training"
    assert tracker.offline and len(messages) == 1 and "warning" in messages[0] and uri in messages[0]

    local = LocalServer(tmp_path / "mlflow", idle_timeout=2, log=lambda s: None)
    assert local.acquire(port=port) == uri  # the server comes (back) up before the run ends
    tracker.end(dict(record, status="finished"))
    assert len(messages) == 2 and "synced" in messages[1]
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "loss")) == 10
    assert run.data.metrics["fd_digits/1_steps"] == 3.0

    # a second run loses the server mid-run and at its end
    spec2 = make_spec("digits_down", "shortcut", "digits", seed=6)
    record2 = make_record(tmp_path / "runs", spec2, {128: 4.0}, history_steps=(50, 100))
    messages.clear()
    tracker2 = Tracker(uri, log=messages.append)
    tracker2.start(dict(record2, status="running"))
    tracker2.log_metrics(record2["train"]["history"][0])
    state = json.loads(local.state_file.read_text())
    assert local.stop() and not healthy(uri)
    tracker2.log_metrics(record2["train"]["history"][1])
    tracker2.end(dict(record2, status="finished"))
    assert len(messages) == 3 and "unavailable" in messages[1] and "shortcut_tracking sync" in messages[2]
    assert not _pid_alive(state["pid"])

    # later: the server is back and the finished run.json is synced into the same MLflow run
    uri2 = local.acquire()
    assert sync(record2["run_dir"], uri2) == tracker2.run_id
    client2 = MlflowClient(uri2)
    assert sorted(m.step for m in client2.get_metric_history(tracker2.run_id, "loss")) == [50, 100]
    assert client2.get_run(tracker2.run_id).info.status == "FINISHED"

    # lifecycle: the supervisor stops the server once no live process holds a lease (idle_timeout=2 s)
    pid = json.loads(local.state_file.read_text())["pid"]
    other = LocalServer(tmp_path / "mlflow", idle_timeout=2, log=lambda s: None)
    assert other.acquire() == uri2  # reused, not a second server
    local.release()
    time.sleep(4)
    assert healthy(uri2), "another lease is still held"
    other.release()
    deadline = time.monotonic() + 30
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _pid_alive(pid) and not local.state_file.exists() and not healthy(uri2)


def test_make_tracker_honours_flags_and_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SHORTCUT_TRACKING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert make_tracker(workdir=tmp_path, enabled=False) is None
    local = make_tracker(workdir=tmp_path)
    assert local.server is not None and local.server.dir == (tmp_path / "mlflow").resolve() and local.uri is None
    assert make_tracker(workdir=tmp_path, tracking_uri="http://127.0.0.1:1").uri == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    assert make_tracker(workdir=tmp_path).uri == "http://127.0.0.1:2"
    monkeypatch.setenv("SHORTCUT_TRACKING", "off")
    assert make_tracker(workdir=tmp_path) is None

    from orchestration.run_experiment import main, parser

    args = parser().parse_args(["digits_shortcut", "--tracking-uri", "http://x", "--no-tracking",
                                "--keep-tracking-server", "--results-dir", "r"])
    assert args.tracking_uri == "http://x" and args.no_tracking and args.keep_tracking_server
    assert main(["--stop-tracking-server", "--workdir", str(tmp_path)]) == 0  # nothing running: says so


@pytest.mark.slow
def test_run_experiment_logs_a_real_run(server, tmp_path):
    """End to end: run_experiment trains digits briefly, evaluates fd_digits, logs into MLflow, exports."""
    workdir, uri = server
    env = dict(os.environ, SHORTCUT_TRACKING="on")
    cmd = [sys.executable, "-m", "orchestration.run_experiment", "digits_shortcut", "--workdir", str(tmp_path / "runs"),
           "--tracking-uri", uri, "--results-dir", str(tmp_path / "results"),
           "--set", "train.steps=20", "--set", "train.log_every=10", "--set", "eval.num_samples=200",
           "--set", "eval.batch_size=200", "--set", "eval.steps=[4,1]"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(next((tmp_path / "runs").rglob("run.json")).read_text())
    run_id = json.loads((Path(record["run_dir"]) / RUN_ID_FILE).read_text())["run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [10, 20]
    assert "fd_digits/1_steps" in run.data.metrics and "loss_bootstrap" in run.data.metrics
    assert list((tmp_path / "results" / "runs" / "digits_shortcut").glob("*.json"))


# ------------------------------------------------------------------- the server never outlives its use

def _store_processes(state_dir: Path) -> list[int]:
    """Every live process of a store's supervisor and server (their process groups)."""
    from orchestration.tracking.server import _group_members

    return [pid for g in LocalServer(state_dir, log=lambda s: None)._stray_groups() for pid in _group_members(g)]


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def test_server_survives_a_sigkilled_starter_is_reused_and_stops_when_idle(tmp_path):
    """The starting process is SIGKILLed: the server stays up for others, a second user reuses it (same
    supervisor, same URI: one store, one server), and once nobody holds a lease it stops (idle 2 s)."""
    state_dir = tmp_path / "mlflow"
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
              "from orchestration.tracking.server import LocalServer\n"
              f"print(LocalServer({str(state_dir)!r}, idle_timeout=2, log=lambda s: None).acquire(), flush=True)\n"
              "time.sleep(600)\n")
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    uri = starter.stdout.readline().strip()
    supervisor = json.loads((state_dir / "server.json").read_text())["pid"]
    starter.kill()
    starter.wait()
    assert healthy(uri) and _pid_alive(supervisor)
    second = LocalServer(state_dir, idle_timeout=2, log=lambda s: None)
    assert second.acquire() == uri
    assert json.loads((state_dir / "server.json").read_text())["pid"] == supervisor
    time.sleep(4)  # longer than the idle timeout: the live lease keeps it up
    assert healthy(uri)
    second.release()
    assert _wait_until(lambda: not _store_processes(state_dir), 40), _store_processes(state_dir)
    assert not healthy(uri) and not (state_dir / "server.json").exists()


def test_server_started_in_a_ray_worker_outlives_the_worker_and_stops_with_its_store(tmp_path):
    """Ray kills a worker's children when the worker exits: the supervisor must not be one of them (it
    was, and the orphaned server ran forever). The worker starts the server and exits without releasing
    its lease; the server stays up (the lease was the worker's, idle 30 s); deleting the work directory
    stops everything."""
    workdir = tmp_path / "work"
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        import ray
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)

        @ray.remote(max_calls=1)
        def start():
            from orchestration.tracking.server import LocalServer
            uri = LocalServer.for_workdir({str(workdir)!r}, idle_timeout=30, log=lambda s: None).acquire()
            return uri, os.getpid()

        uri, worker = ray.get(start.remote())
        print(json.dumps({{"uri": uri, "worker": worker}}), flush=True)
        import time
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{{worker}}") and time.monotonic() < deadline:
            time.sleep(0.2)
        ray.shutdown()
        print("worker gone", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker gone" in done.stdout, done.stdout
    started = json.loads(done.stdout.splitlines()[0])
    state = json.loads((workdir / "mlflow" / "server.json").read_text())
    assert not _pid_alive(started["worker"])
    assert _pid_alive(state["pid"]) and healthy(started["uri"]), "the supervisor died with the Ray worker"
    assert int(Path(f"/proc/{state['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1]) != started["worker"]
    shutil.rmtree(workdir)
    assert _wait_until(lambda: not _store_processes(workdir / "mlflow"), 30), _store_processes(workdir / "mlflow")
    assert not healthy(started["uri"])

