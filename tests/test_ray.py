"""Ray end to end, with a real local Ray instance of 2 CPUs (each run single-threaded): a table's stage
graph (teacher, then student; a failing experiment; a rerun that skips what finished) and a sweep
(ASHA, MLflow parent and children, a trial whose worker is SIGKILLed resumes from its checkpoint)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestration.execution.cluster import ResourcesError, check_feasible, worker_options
from orchestration.execution.graph import _fits, build, is_table, load_table
from shortcut.spec import ResourcesSpec, SpecError
from shortcut.spec_files import load_spec
from tests.process_groups import group_ended

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
# Tiny real digits runs: a few dozen steps, evaluation at 1 step on 64 samples.
TINY = ["train.steps=30", "train.log_every=10", "train.checkpoint_every=10", "eval.steps=[1]",
        "eval.num_samples=64", "eval.batch_size=64", "eval.grid_size=16", "resources.cpus=1"]

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("processes")]  # xdist group: see conftest.py


def _cli(module: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"orchestration.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def _record(workdir: Path, name: str) -> dict:
    [path] = list((workdir / name).glob("*/run.json"))
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------ no Ray needed


def test_table_specs_list_their_experiments_and_teachers():
    assert is_table("table1_digits") and not is_table("digits_flow")
    table = load_table("table1_digits")
    assert table.seeds == (0, 1, 2)
    nodes = build(table)
    assert len(nodes) == 27  # 9 experiments x 3 seeds, each seed its own hash
    for seed in (0, 1, 2):
        of_seed = {k: n for k, n in nodes.items() if n.spec.seed == seed}
        names = [n.spec.name for n in of_seed.values()]
        assert len(names) == len(set(names)) == 9  # digits_flow is listed once although three students need it
        flow_key = next(k for k, n in of_seed.items() if n.spec.name == "digits_flow")
        students = {n.spec.name for n in of_seed.values() if n.deps}
        assert students == {"digits_progressive_distillation", "digits_consistency_distillation", "digits_reflow"}
        # the student of seed s distils the teacher of seed s
        assert all(n.deps == [flow_key] and n.spec.teacher_spec().seed == seed for n in of_seed.values() if n.deps)
        assert f"seed {seed}" in of_seed[flow_key].label
        # a table node is the spec run one by one with the table's overrides (resources are not hashed)
        assert flow_key == load_spec("digits_flow", ["train.steps=4000", f"seed={seed}"]).hash()
        assert flow_key == load_spec("digits_flow", [*table.set, f"seed={seed}"]).hash()
    order = list(nodes)
    assert max(order.index(k) for k, n in nodes.items() if n.spec.name == "digits_flow") < min(
        order.index(k) for k, n in nodes.items() if n.deps)  # every teacher is submitted before any student
    assert max(order.index(k) for k, n in nodes.items() if n.deps) < min(
        order.index(k) for k, n in nodes.items() if not n.deps and n.spec.name != "digits_flow")  # then students
    # the driver submits only what fits beside the running runs (Ray's queue would be first come, first served)
    assert _fits({"CPU": 1, "GPU": 0}, {"CPU": 1}, {"CPU": 2.0}) and not _fits({"CPU": 1}, {"CPU": 2}, {"CPU": 2.0})
    assert not _fits({"CPU": 1, "GPU": 1}, {}, {"CPU": 2.0})
    for ds in ("celeba", "imagenet"):
        assert len(build(load_table(f"table1_{ds}"))) == 9


def test_table_seeds_are_validated(tmp_path):
    for seeds, message in (("[0, 0]", "distinct"), ("[]", "at least 1"), ("[-1]", "greater than or equal to 0")):
        path = tmp_path / "t.yaml"
        path.write_text(f"experiments: [digits_flow]\nseeds: {seeds}\n")
        with pytest.raises(SpecError, match=message):
            load_table(str(path))
    path.write_text("experiments: [digits_flow]\n")  # no seeds: each spec's own seed, as before
    assert [n.spec.seed for n in build(load_table(str(path))).values()] == [0]


def test_table_overrides_reach_the_teacher():
    nodes = build(load_table("table1_digits"), ("train.steps=7",))
    assert {n.spec.train.steps for n in nodes.values()} == {7}
    student = next(n for n in nodes.values() if n.spec.name == "digits_reflow")
    assert student.spec.teacher_spec().train.steps == 7


def test_workers_share_a_compilation_cache_in_the_work_directory(tmp_path):
    code = ("import jax, jax.numpy as jnp, sys; from orchestration.execution.worker import enable_compilation_cache; "
            "hits = []; jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) "
            "if e == '/jax/compilation_cache/cache_hits' else None); enable_compilation_cache(sys.argv[1]); "
            "y = float(jax.jit(lambda x: jnp.sin(x) * 2)(1.0)); print(y, len(hits) > 0)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    first, second = (subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True,
                                    text=True, timeout=120, env=dict(env, JAX_PLATFORMS="cpu")) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    (y1, hit1), (y2, hit2) = first.stdout.split(), second.stdout.split()
    assert y1 == y2 and (hit1, hit2) == ("False", "True")  # the second process loaded what the first compiled
    assert any("jit__lambda" in p.name for p in (tmp_path / "jax_cache").iterdir())


def test_resources_map_to_ray_options():
    cpu = worker_options(ResourcesSpec(cpus=1))
    assert cpu["num_cpus"] == 1 and cpu["num_gpus"] == 0
    assert cpu["runtime_env"]["env_vars"]["JAX_PLATFORMS"] == "cpu"
    assert "xla_cpu_multi_thread_eigen=false" in cpu["runtime_env"]["env_vars"]["XLA_FLAGS"]
    assert cpu["runtime_env"]["env_vars"]["SHORTCUT_PIN_CPUS"] == "1"
    assert "glibc.malloc.mmap_threshold" in cpu["runtime_env"]["env_vars"]["GLIBC_TUNABLES"]
    assert "SHORTCUT_PIN_CPUS" not in worker_options(ResourcesSpec(cpus=0.5))["runtime_env"]["env_vars"]
    shared = worker_options(ResourcesSpec(cpus=4, gpus=0.5))
    assert shared["runtime_env"]["env_vars"] == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    whole = worker_options(ResourcesSpec(cpus=8, gpus=8))
    assert whole["num_gpus"] == 8 and whole["runtime_env"]["env_vars"] == {}
    tpu = worker_options(ResourcesSpec(cpus=8, tpus=4, hosts=4))
    assert tpu["resources"] == {"TPU": 4}
    with pytest.raises(ResourcesError, match="GPU 8"):
        check_feasible(ResourcesSpec(gpus=8), {"CPU": 2.0}, "celeba_ditb_shortcut", local=True)
    assert "waits" in check_feasible(ResourcesSpec(gpus=8), {"CPU": 2.0}, "x", local=False)
    assert check_feasible(ResourcesSpec(cpus=2), {"CPU": 2.0}, "x", local=True) is None
    with pytest.raises(SpecError, match="fraction must be < 1"):
        load_spec("digits_flow", ["resources.gpus=1.5"])


def test_sweep_space_is_validated():
    with pytest.raises(SpecError, match="only keys under"):
        load_spec("sweep_digits_shortcut", ["sweep.space={eval.cfg_scale: {choice: [1, 2]}}"])
    with pytest.raises(SpecError, match="low < high"):
        load_spec("sweep_digits_shortcut", ["sweep.space={optimizer.lr: {loguniform: [0.1, 0.01]}}"])
    with pytest.raises(SpecError, match="expected one of"):
        load_spec("sweep_digits_shortcut", ["sweep.space={optimizer.lr: {normal: [0, 1]}}"])
    from orchestration.sweep import check_space

    with pytest.raises(SpecError, match="invalid spec"):  # a value the spec itself refuses, before any trial
        check_space(load_spec("sweep_digits_shortcut", ["sweep.space={model.num_heads: {choice: [4, 5]}}"]))


def test_infeasible_resources_fail_fast_with_a_message(tmp_path):
    done = _cli("run_experiment", "digits_flow", "--set", "resources.gpus=8", "--no-tracking",
                "--workdir", str(tmp_path), "--cpus", "1", timeout=180)
    assert done.returncode == 1
    assert "error: digits_flow asks for" in done.stderr and "GPU 8" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------- real Ray


def test_table_graph_runs_teacher_then_student_and_reruns_only_what_is_missing(tmp_path):
    broken = tmp_path / "mnist_flow.yaml"  # a valid spec that fails at run time: its dataset is not prepared
    broken.write_text(yaml.safe_dump({"base": str(EXPERIMENTS / "digits_flow.yaml"),
                                      "data": {"dataset": "mnist", "data_dir": str(tmp_path / "no_data")}}))
    table = tmp_path / "tiny_table.yaml"
    table.write_text(yaml.safe_dump({"description": "teacher, student and a failing run",
                                     "experiments": ["digits_progressive_distillation", str(broken)],
                                     "set": TINY + ["method.denoise_timesteps=4"]}))
    from mlflow.tracking import MlflowClient

    from orchestration.tracking.server import LocalServer

    workdir, results = tmp_path / "runs", tmp_path / "results"
    server = LocalServer.for_workdir(tmp_path / "mlflow-work", idle_timeout=60, log=lambda s: None)
    uri = server.acquire(keep=True)
    server.release()
    args = [str(table), "--workdir", str(workdir), "--cpus", "2", "--results-dir", str(results)]
    try:
        done = _cli("run_experiment", *args, "--tracking-uri", uri, env={"SHORTCUT_TRACKING": "on"})
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        artifacts = {a.path for r in runs if r.data.tags.get("kind") == "table"
                     for path in (None, "tables") for a in client.list_artifacts(r.info.run_id, path)}
    finally:
        server.stop()
    out = done.stdout + done.stderr
    # the table is a parent MLflow run: its runs are children, its tables and figures its artifacts
    [parent] = [r for r in runs if r.data.tags.get("kind") == "table"]
    children = {r.data.tags["spec_name"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {"digits_flow", "digits_progressive_distillation", "mnist_flow"}, out[-3000:]
    assert parent.info.status == "FAILED" and parent.data.tags["table"] == "tiny_table"
    assert artifacts >= {"tables", "figures", "report.html", "tables/table1_digits_fd_digits.md"}, artifacts
    assert done.returncode == 1, out[-3000:]  # one experiment failed ...
    teacher, student = _record(workdir, "digits_flow"), _record(workdir, "digits_progressive_distillation")
    assert teacher["status"] == student["status"] == "finished"  # ... the others did not suffer
    assert teacher["finished"] <= student["started"]  # the student started after its teacher finished
    assert student["teacher"]["spec_hash"] == teacher["spec_hash"]
    assert _record(workdir, "mnist_flow")["status"] == "failed"
    assert "failed" in out and "DatasetNotReadyError" in out  # the summary says which failed and why
    assert "1 did not finish" in out
    table_md = (results / "tables" / "table1_digits_fd_digits.md").read_text()
    assert "Progressive Distillation" in table_md and "Flow Matching" in table_md

    again = _cli("run_experiment", *args, "--no-tracking")  # only the failed experiment runs again
    out = again.stdout + again.stderr
    assert again.returncode == 1
    assert "2 already finished" in out
    assert "mnist_flow" in out and "digits_progressive_distillation [" in out
    assert out.count(": submitted") == 1, out[-3000:]


def test_sweep_with_asha_mlflow_children_and_a_killed_trial(tmp_path):
    """4 trials, 2 at a time; one trial's worker is SIGKILLed after a checkpoint; Tune retries it and it
    resumes from that checkpoint; the sweep completes with a parent MLflow run and four children."""
    from mlflow.tracking import MlflowClient

    from orchestration.tracking.server import LocalServer

    workdir, results = tmp_path / "runs", tmp_path / "results"
    server = LocalServer.for_workdir(tmp_path / "mlflow-work", idle_timeout=60, log=lambda s: None)
    uri = server.acquire(keep=True)
    server.release()
    try:
        args = ["sweep_digits_shortcut", "--workdir", str(workdir), "--num-samples", "4", "--max-concurrent", "2",
                "--cpus", "2", "--tracking-uri", uri, "--results-dir", str(results)]
        for o in TINY[:-1] + ["train.steps=60", "eval.every=15", "train.checkpoint_every=15"]:
            args += ["--set", o]
        proc = subprocess.Popen([sys.executable, "-m", "orchestration.sweep", *args], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dict(os.environ, SHORTCUT_TRACKING="on"))
        killed = _kill_a_trial_after_its_first_checkpoint(workdir / "sweep_digits_shortcut", proc)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        record = json.loads((killed / "run.json").read_text())
        assert record["status"] in ("finished", "stopped")  # stopped: ASHA ended it after it resumed
        assert record["resumed_from"] is not None and record["resumed_from"] >= 15, record.get("resumed_from")

        best = results / "sweeps" / "sweep_digits_shortcut_best.yaml"
        assert "best fd_digits/1_steps" in out and best.exists()
        spec = load_spec(str(best))  # ready to run: the swept spec with the --set overrides and the best values
        assert spec.train.steps == 60 and spec.method.bootstrap_fraction in (0.125, 0.25, 0.5)

        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        [parent] = [r for r in runs if r.data.tags.get("kind") == "sweep"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 4 and len({c.data.tags["spec_hash"] for c in children}) == 4
        assert parent.info.status == "FINISHED" and "best/fd_digits/1_steps" in parent.data.metrics
        assert all("fd_digits/1_steps" in c.data.metrics for c in children)
    finally:
        server.stop()


def test_sigterm_stops_a_table_like_ctrl_c(tmp_path):
    """SIGTERM to a table's driver: the running experiment checkpoints and records that it was interrupted,
    the driver exits 130 with its one-line message (no Ray stack dump), and nothing it started lives on."""
    table = tmp_path / "one_long_run.yaml"
    table.write_text(yaml.safe_dump({"description": "one long run", "experiments": ["digits_flow"],
                                     "set": TINY + ["train.steps=100000"]}))
    workdir = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.run_experiment", str(table), "--workdir",
                             str(workdir), "--no-tracking", "--cpus", "2", "--results-dir", str(tmp_path / "results")],
                            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        checkpoints = _wait_for_a_checkpoint(workdir / "digits_flow", proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 130, out[-3000:]
        assert "interrupted: stopping digits_flow" in out and "a rerun resumes" in out
        assert "SIGTERM received" not in out, out[-3000:]
        record = _record(workdir, "digits_flow")
        assert record["status"] == "interrupted"
        assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) >= 10
        assert group_ended(proc.pid), "processes the driver started are still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_a_checkpoint(runs: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        for ckpts in runs.glob("*/checkpoints"):
            if any(p.name.isdigit() for p in ckpts.iterdir()):
                return ckpts
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint appeared (driver exit code {proc.poll()})")


def _kill_a_trial_after_its_first_checkpoint(sweep_runs: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        for record_path in sweep_runs.glob("*/run.json"):
            try:
                record = json.loads(record_path.read_text())
            except ValueError:
                continue
            ckpts = record_path.parent / "checkpoints"
            if record["status"] == "running" and ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
                os.kill(record["pid"], signal.SIGKILL)
                return record_path.parent
        time.sleep(0.1)
    raise AssertionError("no trial was caught between its first checkpoint and its end")


@pytest.mark.slow
def test_a_two_host_run_joins_jax_distributed(tmp_path):
    """resources.hosts=2: two Ray actors, one JAX process each (CPU, gloo), train and evaluate together."""
    done = _cli("run_experiment", "digits_flow", "--cpus", "2", "--no-tracking", "--workdir", str(tmp_path),
                "--results-dir", str(tmp_path / "results"), *[a for o in TINY[:-1] + ["train.steps=20"]
                                                                for a in ("--set", o)],
                "--set", "resources.hosts=2", "--set", "resources.cpus=1")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    record = _record(tmp_path, "digits_flow")
    assert record["status"] == "finished" and record["processes"] == 2
    assert (done.stdout + done.stderr).count("Rank ") >= 2  # both processes joined the gloo group


@pytest.mark.slow
def test_an_interrupted_sweep_resumes(tmp_path):
    """The sweep's driver is killed mid-way; `sweep NAME --resume` finishes it from Tune's saved state."""
    workdir, results = tmp_path / "runs", tmp_path / "results"
    args = ["sweep_digits_shortcut", "--workdir", str(workdir), "--num-samples", "3", "--max-concurrent", "1",
            "--cpus", "2", "--no-tracking", "--results-dir", str(results), "--set", "sweep.scheduler=fifo"]
    for o in TINY[:-1] + ["train.steps=40", "eval.every=20", "train.checkpoint_every=20"]:
        args += ["--set", o]
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.sweep", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len([p for p in workdir.glob("sweep_digits_shortcut/*/run.json")
                                          if json.loads(p.read_text())["status"] == "finished"]) < 1:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert len(list(workdir.glob("sweep_digits_shortcut/*/run.json"))) < 3, "the sweep ended before the kill"

    refused = _cli("sweep", *args)  # a second start over an existing sweep is refused, not merged
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = _cli("sweep", *args, "--resume", timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    records = [json.loads(p.read_text()) for p in workdir.glob("sweep_digits_shortcut/*/run.json")]
    assert len(records) == 3 and all(r["status"] == "finished" for r in records)
    assert (results / "sweeps" / "sweep_digits_shortcut_best.yaml").exists()
