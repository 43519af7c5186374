"""Writing a run record into MLflow: the experiment, the run (continued across resumes), its points,
artifacts and final status; idempotent."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import yaml

from orchestration.tracking.naming import evaluation_points, experiment_name, run_params, run_tags, train_points
from shortcut import record as record_lib

RUN_ID_FILE = "mlflow_run.json"
_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "killed": "KILLED"}


def get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={"created_by": "shortcut-models orchestration.tracking"})
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ensure_run(client, record: dict, extra_tags: dict[str, str] | None = None) -> str:
    """The MLflow run of this run directory: the one recorded in mlflow_run.json if the server knows it,
    else one found by its tags (spec hash + run dir), else a new one. Logs params and tags, marks it
    RUNNING, uploads the resolved spec, and records its id in the run directory."""
    from mlflow.entities import Param, RunTag

    rundir = Path(record["run_dir"])
    exp_id = get_or_create_experiment(client, experiment_name(record))
    _forget_artifact_repos()
    tags = {**run_tags(record), **(extra_tags or {})}
    run = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads((rundir / RUN_ID_FILE).read_text())["run_id"]
        with contextlib.suppress(Exception):
            run = client.get_run(known)
            if run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active":
                run = None
    if run is None:  # e.g. a run directory copied from elsewhere, or mlflow_run.json lost
        found = []
        with contextlib.suppress(Exception):
            found = client.search_runs([exp_id], filter_string=f"tags.spec_hash = '{record['spec_hash']}' and "
                                       f"tags.run_dir = '{tags['run_dir']}'", max_results=1)
        run = found[0] if found else client.create_run(exp_id, run_name=tags["mlflow.runName"])
    run_id = run.info.run_id
    if run.info.status != "RUNNING" and record.get("status") == "running":
        client.update_run(run_id, status="RUNNING")
    existing = dict(run.data.params)
    params = run_params(record)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])
    tags.update({f"param_changed.{k}": v[:5000] for k, v in changed.items()})  # params are immutable in MLflow
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(record["spec"], sort_keys=False))
        client.log_artifact(run_id, str(spec_file))
    record_lib.write_json(rundir / RUN_ID_FILE, {"run_id": run_id, "experiment_id": exp_id,
                                       "experiment": experiment_name(record), "tracking_uri": client.tracking_uri})
    return run_id


def _forget_artifact_repos() -> None:
    """MLflow caches artifact repositories per run id for the whole process, with the server address
    they were first resolved against; a server that came back on another address would then be
    missed. Drop the cache (best effort: it is MLflow-internal)."""
    with contextlib.suppress(Exception):
        from mlflow.tracking._tracking_service import utils as _utils

        _utils._artifact_repos_cache.clear()


def log_points(client, run_id: str, points: list[tuple[str, float, int]], skip_existing: bool = False) -> int:
    from mlflow.entities import Metric

    if skip_existing:
        existing = {k: {(m.step, m.value) for m in client.get_metric_history(run_id, k)}
                    for k in {k for k, _, _ in points}}
        points = [(k, v, s) for k, v, s in points if not any(step == s and math.isclose(val, v, rel_tol=1e-9,
                                                                                        abs_tol=1e-12)
                                                             for step, val in existing[k])]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, s) for k, v, s in points]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    return len(metrics)


def record_points(record: dict) -> list[tuple[str, float, int]]:
    points = []
    for m in ((record.get("train") or {}).get("history") or []):
        points += train_points(m)
    points += evaluation_points(record.get("evaluation") or [])
    if record.get("num_params"):
        points.append(("num_params", float(record["num_params"]), 0))
    return points


def sync_record(client, record: dict, extra_tags: dict[str, str] | None = None) -> str:
    """Log a run record (run.json) into MLflow: create or continue its run, add the metric points not
    yet there, upload artifacts, set the final status. Idempotent."""
    run_id = ensure_run(client, record, extra_tags)
    log_points(client, run_id, record_points(record), skip_existing=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str))
        client.log_artifact(run_id, str(tmp / "run.json"))
        if record.get("evaluation"):
            (tmp / "evaluation.json").write_text(json.dumps(record["evaluation"], indent=2, default=str))
            client.log_artifact(run_id, str(tmp / "evaluation.json"))
        for info in (record.get("samples") or {}).values():
            grid = Path(info.get("grid", ""))
            if grid.is_file():
                client.log_artifact(run_id, str(grid), "samples")
        if record.get("status") == "finished":
            from orchestration.reporting.results import export_record, write_export

            export_dir = tmp / "export"
            write_export(export_record(record), export_dir, flat=True)
            client.log_artifacts(run_id, str(export_dir), "export")
    status = _STATUS.get(record.get("status", ""))
    if status:
        client.set_terminated(run_id, status)
    return run_id


def sync(run_dir: str | Path, tracking_uri: str) -> str:
    """Log a finished (or failed) run directory's run.json into the MLflow server at `tracking_uri`."""
    from mlflow.tracking import MlflowClient

    record = json.loads((Path(run_dir) / "run.json").read_text())
    return sync_record(MlflowClient(tracking_uri), record)
