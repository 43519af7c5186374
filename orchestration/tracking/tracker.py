"""The tracker a run reports to: its MLflow run, live while it trains, synced in full when it ends."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import requests

from orchestration.tracking.naming import evaluation_points, experiment_name, train_points
from orchestration.tracking.server import LocalServer, healthy, stderr_line
from orchestration.tracking.sync import ensure_run, log_points, sync_record


class Tracker:
    """Logs one experiment run into MLflow; every method is safe to call and never raises.

    ``start(record)`` at the start (creates or resumes the MLflow run, logs params, tags, spec),
    ``log_metrics(metrics)`` for each training log line (the dict ``train(on_log=...)`` passes),
    ``log_evaluation(entries)`` for evaluation entries, ``end(record)`` with the final record (syncs
    everything in it, uploads artifacts, sets the run status), ``close()`` drops the server lease.
    """

    def __init__(self, tracking_uri: str | None = None, *, server: LocalServer | None = None,
                 keep_server: bool = False, tags: dict[str, str] | None = None,
                 log: Callable[[str], None] = stderr_line):
        if (tracking_uri is None) == (server is None):
            raise ValueError("give exactly one of tracking_uri and server")
        self.uri, self.server, self.keep_server, self._say = tracking_uri, server, keep_server, log
        self.tags = dict(tags or {})  # extra run tags, e.g. mlflow.parentRunId for a sweep's trial
        self.run_id: str | None = None
        self.offline = False
        self._warned = False
        self._client = None

    @classmethod
    def for_workdir(cls, workdir: str | Path, **kwargs) -> "Tracker":
        """A tracker that uses (starting if needed) the local server of `workdir`."""
        return cls(server=LocalServer.for_workdir(workdir), **kwargs)

    # -- hooks called by shortcut.run.run

    def fork(self) -> "Tracker":
        """A new tracker with the same destination, for another run (e.g. a teacher stage trained inside
        a run): one Tracker follows one run at a time."""
        if self.server is not None:
            return Tracker(server=LocalServer(self.server.dir, idle_timeout=self.server.idle_timeout,
                                              log=self.server.log), keep_server=self.keep_server, log=self._say)
        return Tracker(self.uri, log=self._say)

    def start(self, record: dict) -> None:
        self.run_id, self.offline, self._warned = None, False, False  # a tracker may follow runs one after another
        # a finished record handed over by the run that held its run directory (shortcut.run._replay): its
        # points are in MLflow already, end() syncs what is missing; no live logging (no duplicate points)
        self._replayed = record.get("status") != "running"
        try:
            if self.server is not None:  # start or reuse the local server, and hold a lease while the run lasts
                self.uri, self._client = self.server.acquire(keep=self.keep_server), None
            if not healthy(self.uri):
                raise ConnectionError("no answer from /health")
            self.run_id = ensure_run(self.client, record, self.tags)
            self._say(f"tracking: MLflow run {self.run_id} in experiment {experiment_name(record)} at {self.uri}")
        except Exception as e:  # noqa: BLE001 - tracking must never stop a run
            self._go_offline(e)

    def log_metrics(self, metrics: dict) -> None:
        """The `on_log` hook: one training log line."""
        self._live(train_points(metrics))

    def log_evaluation(self, entries: list[dict]) -> None:
        self._live(evaluation_points(entries))

    def end(self, record: dict) -> None:
        try:
            self._end(record)
        except Exception as e:  # noqa: BLE001
            self._say(f"tracking: warning: could not sync the run record to MLflow ({type(e).__name__}: {e}); "
                     f"run.json is complete; sync later with `shortcut_tracking sync {record.get('run_dir')}`")
        finally:
            self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.release()

    # -- internals

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def _go_offline(self, error: BaseException) -> None:
        self.offline = True
        if not self._warned:
            self._warned = True
            self._say(f"tracking: warning: MLflow at {self.uri or '(local server)'} unavailable "
                     f"({type(error).__name__}: {str(error)[:200]}); the run continues, run.json is the record, "
                     "and the tracker syncs it at the end if the server is back")

    def _live(self, points: list[tuple[str, float, int]]) -> None:
        if self.offline or self.run_id is None or not points or getattr(self, "_replayed", False):
            return
        try:
            if self.uri.startswith(("http://", "https://")):
                # plain REST with a short timeout and no retries: a dead server costs one failed request
                now = int(time.time() * 1000)
                body = {"run_id": self.run_id,
                        "metrics": [{"key": k, "value": v, "step": s, "timestamp": now} for k, v, s in points]}
                r = requests.post(f"{self.uri.rstrip('/')}/api/2.0/mlflow/runs/log-batch", json=body, timeout=10)
                r.raise_for_status()
            else:
                log_points(self.client, self.run_id, points)
        except Exception as e:  # noqa: BLE001
            self._go_offline(e)

    def _end(self, record: dict) -> None:
        if self.server is not None and (self.uri is None or not healthy(self.uri)):
            self.server.release()  # our own server died or never started: start (or find) it again
            self.uri, self._client = self.server.acquire(keep=self.keep_server), None
        if not healthy(self.uri):
            self._say(f"tracking: warning: MLflow at {self.uri} still unavailable; not synced. run.json is complete; "
                     f"sync later with `shortcut_tracking sync {record['run_dir']}`")
            return
        self.run_id = sync_record(self.client, record, self.tags)
        if self.offline:
            self._say(f"tracking: the server is back; synced the whole run record into MLflow run {self.run_id}")


def disabled_by_env() -> bool:
    """$SHORTCUT_TRACKING=off (or 0, false, no) turns tracking off, like --no-tracking."""
    return os.environ.get("SHORTCUT_TRACKING", "").lower() in ("0", "off", "false", "no")


def make_tracker(*, workdir: str | Path, tracking_uri: str | None = None, enabled: bool = True,
                 keep_server: bool = False, tags: dict[str, str] | None = None,
                 log: Callable[[str], None] = stderr_line) -> Tracker | None:
    """The CLI's tracker: `tracking_uri`, else $MLFLOW_TRACKING_URI, else the local server of `workdir`.
    None when disabled (`--no-tracking`, or $SHORTCUT_TRACKING=off)."""
    if not enabled or disabled_by_env():
        return None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Tracker(uri, tags=tags, log=log)
    return Tracker(server=LocalServer.for_workdir(workdir, log=log), keep_server=keep_server, tags=tags, log=log)
