"""What runs on a Ray worker (or in-process with --in-process): one experiment, start to finish.

`execute` gets the resolved spec (shortcut/spec: its teacher's inside, so no file is read here), optionally
joins a multi-host JAX job, runs `shortcut.run.run` with the MLflow tracker plus any extra hooks (progress
reports, a sweep's Tune reporter), exports a finished run into results/ and returns a compact outcome for
the driver (its printable summary made by orchestration/reporting/console.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shortcut.spec import Spec


@dataclasses.dataclass(frozen=True)
class Tracking:
    """How a worker tracks its run: the CLI's tracking flags, carried to the worker."""

    enabled: bool = True
    uri: str | None = None
    keep_server: bool = False
    tags: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_flags(cls, *, no_tracking: bool, uri: str | None, keep_server: bool = False) -> "Tracking":
        """From the CLI flags and the environment ($SHORTCUT_TRACKING, $MLFLOW_TRACKING_URI)."""
        import os

        from orchestration.tracking.tracker import disabled_by_env

        return cls(enabled=not (no_tracking or disabled_by_env()), uri=uri or os.environ.get("MLFLOW_TRACKING_URI"),
                   keep_server=keep_server)


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This worker's place in a multi-host job (resources.hosts > 1)."""

    coordinator: str
    num_processes: int
    process_id: int


class Hooks:
    """Fans the run hooks (start, log_metrics, log_evaluation, end) out to several listeners. A listener
    may raise shortcut.train.StopTraining from log_evaluation to end training early; nothing else escapes."""

    def __init__(self, *listeners):
        self.listeners = [h for h in listeners if h is not None]

    def _call(self, name: str, *args) -> None:
        from shortcut.train import StopTraining

        stop = None
        for h in self.listeners:
            fn = getattr(h, name, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except StopTraining as e:
                stop = e
            except Exception as e:  # noqa: BLE001 - a listener must never break a run
                print(f"warning: {type(h).__name__}.{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        if stop is not None:
            raise stop

    def start(self, record: dict) -> None:
        self._call("start", record)

    def log_metrics(self, metrics: dict) -> None:
        self._call("log_metrics", metrics)

    def log_evaluation(self, entries: list[dict]) -> None:
        self._call("log_evaluation", entries)

    def end(self, record: dict) -> None:
        self._call("end", record)

    def close(self) -> None:
        self._call("close")


def init_distributed(d: Distributed) -> None:
    """Join the multi-host JAX job (one process per host; CPU hosts talk through gloo)."""
    import jax

    with contextlib.suppress(Exception):  # only matters on CPU; the option may be absent elsewhere
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # the coordinator listens on its node's address (127.0.0.1 on a local instance), not on every interface
    jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id,
                               coordinator_bind_address=d.coordinator)


def enable_compilation_cache(workdir: str) -> None:
    """XLA's persistent compilation cache in <workdir>/jax_cache (unless $JAX_COMPILATION_CACHE_DIR names
    one): a later run of the same programs (another seed of a spec, a rerun, the students' samplers)
    loads the executables instead of compiling them again. The executables are the same, so are the
    results; a digits run makes ~200 compilations, most of them small (hence no minimum compile time)."""
    import os
    from pathlib import Path

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path(workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def execute(spec: Spec, *, workdir: str, eval_only: bool = False,
            tracking: Tracking = Tracking(), results_dir: str | None = None, hooks: tuple = (),
            distributed: Distributed | None = None, on_locked: str = "fail", replace_record: bool = False) -> dict:
    """Run one experiment; returns `outcome(record)`. Known errors (data not ready, a failed teacher, ...)
    propagate with their message; the run record in the run directory says how the run ended.
    `on_locked`: what to do when another process holds the run directory (shortcut.run.run).
    `replace_record`: export over a committed results record of the same spec hash (else it is kept)."""
    from orchestration.execution import cpu_slots

    cpu_slots.pin_from_env()  # before JAX starts its threads (a no-op unless the worker's options ask for it)
    try:
        return _execute(spec, workdir=workdir, eval_only=eval_only, tracking=tracking,
                        results_dir=results_dir, hooks=hooks, distributed=distributed, on_locked=on_locked,
                        replace_record=replace_record)
    finally:
        cpu_slots.release()  # before Ray hears the run ended and starts the next one on this core


def _execute(spec: Spec, *, workdir: str, eval_only: bool, tracking: Tracking,
             results_dir: str | None, hooks: tuple, distributed: Distributed | None, on_locked: str,
             replace_record: bool) -> dict:
    if distributed is not None:
        init_distributed(distributed)
    import jax

    enable_compilation_cache(workdir)
    from orchestration.tracking.tracker import make_tracker
    from shortcut import disk
    from shortcut.record import run_dir
    from shortcut.run import run

    lead = jax.process_index() == 0  # one process records, tracks and exports
    tracker = make_tracker(workdir=workdir, tracking_uri=tracking.uri, enabled=tracking.enabled and lead,
                           keep_server=tracking.keep_server, tags=dict(tracking.tags)) if lead else None
    listeners = Hooks(tracker, *hooks)
    disk.quiet_full_disk_reports()
    try:
        record = run(spec, workdir=workdir, eval_only=eval_only, tracker=listeners, on_locked=on_locked)
    except BaseException as e:  # a full disk, wherever it struck, is one line (shortcut/disk.py)
        if (no_space := disk.full(e, run_dir(spec, workdir))) is not None:
            raise no_space from None
        raise
    finally:
        listeners.close()
    result = outcome(record, tracked=tracker is not None and tracking.enabled)
    if lead and record["status"] == "finished":
        result.update(export(record, results_dir, replace=replace_record))
    return result


def export(record: dict, results_dir: str | None, replace: bool = False) -> dict:
    """Export a finished run's results record for make_tables: {"exported": path}, or {"kept_record": ...}
    when a committed record of the same spec hash stays (see kept_lines); a failure never fails the run."""
    from orchestration.reporting.results import KeptRecord, export_run

    try:
        path = export_run(record, results_dir, replace=replace)
    except KeptRecord as kept:
        return {"kept_record": {"path": str(kept.path), "git_commit": kept.committed.get("git_commit"),
                                "evaluation": kept.committed.get("evaluation") or []}}
    except Exception as e:  # noqa: BLE001
        print(f"warning: results record not exported ({type(e).__name__}: {e}); "
              f"later: make_tables --export {record['run_dir']}", file=sys.stderr)
        return {}
    return {"exported": str(path)} if path else {}


def outcome(record: dict, *, tracked: bool = True) -> dict[str, Any]:
    """What the driver needs of a run record: identity, status, final metrics and a printable summary."""
    from orchestration.reporting.console import summary
    from shortcut.record import last_evaluation

    return {
        "name": record["name"], "spec_hash": record["spec_hash"], "run_dir": record["run_dir"],
        "status": record["status"], "error": record.get("error"), "stopped": record.get("stopped"),
        "smoke": record.get("smoke", False), "evaluation": last_evaluation(record),
        "timings": record.get("timings", {}), "summary": summary(record, tracked=tracked),
    }
