"""Parent MLflow runs: a sweep's or a table's run, whose children (tag `mlflow.parentRunId`) are its runs.

A table's parent run (`kind` table) holds, as artifacts, what make_tables made of its runs: the tables and
findings (tables/), the figures (figures/) and the one-page report (report.html); so the MLflow UI shows the
whole table. Tracking never stops a table or a sweep: a server that cannot be reached costs one warning.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable

PARENT_TAG = "mlflow.parentRunId"


def client_for(workdir: Path, tracking) -> tuple[object | None, Callable[[], None]]:
    """(MlflowClient, release) for a parent run, or (None, noop) when tracking is off or unreachable.
    `tracking` is orchestration.execution.worker.Tracking; without a URI, the work directory's local server."""
    if not tracking.enabled:
        return None, lambda: None
    from mlflow.tracking import MlflowClient

    from orchestration.tracking.server import LocalServer, healthy

    if tracking.uri:
        return (MlflowClient(tracking.uri) if healthy(tracking.uri) else None), lambda: None
    server = LocalServer.for_workdir(workdir)
    try:
        uri = server.acquire(keep=tracking.keep_server)
    except Exception as e:  # noqa: BLE001 - tracking never stops the work
        print(f"tracking: warning: no local MLflow server ({e}); going on untracked", file=sys.stderr)
        return None, lambda: None
    return MlflowClient(uri), server.release


def start_table(client, table, nodes: dict, *, smoke: bool) -> str | None:
    """The table's parent run (a new one per invocation), in the experiment of its runs' dataset; None on
    any tracking error (the table goes on)."""
    from orchestration.tracking.naming import experiment_name
    from orchestration.tracking.sync import get_or_create_experiment

    first = next(iter(nodes.values())).spec
    try:
        exp = get_or_create_experiment(client, experiment_name({"spec": first.model_dump(mode="json"), "smoke": smoke}))
        run = client.create_run(exp, run_name=f"table-{table.name}", tags={"kind": "table", "table": table.name})
        client.log_param(run.info.run_id, "experiments", json.dumps([n.label for n in nodes.values()])[:6000])
        client.log_param(run.info.run_id, "set", json.dumps(list(table.set))[:6000])
        return run.info.run_id
    except Exception as e:  # noqa: BLE001
        print(f"tracking: warning: no parent run for {table.name} ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def adopt(client, parent: str, rundirs: list[Path]) -> None:
    """Make the MLflow runs of runs that finished before this invocation (the table skipped them) children
    of `parent` too."""
    from orchestration.tracking.sync import RUN_ID_FILE

    for rundir in rundirs:
        with contextlib.suppress(Exception):
            client.set_tag(json.loads((Path(rundir) / RUN_ID_FILE).read_text())["run_id"], PARENT_TAG, parent)


def finish_table(client, parent: str, results_dir: Path, *, ok: bool) -> None:
    """Log the table's outputs (tables/, figures/, report.html under `results_dir`) and end the parent run."""
    try:
        for sub in ("tables", "figures"):
            if (results_dir / sub).is_dir():
                client.log_artifacts(parent, str(results_dir / sub), sub)
        if (results_dir / "report.html").exists():
            client.log_artifact(parent, str(results_dir / "report.html"))
        client.set_terminated(parent, "FINISHED" if ok else "FAILED")
    except Exception as e:  # noqa: BLE001
        print(f"tracking: warning: the table's outputs were not logged to MLflow ({type(e).__name__}: {e})",
              file=sys.stderr)
