"""What runs on a Ray worker (or in-process with --in-process): one experiment, start to finish.

`execute` rebuilds the spec from its resolved tree, optionally joins a multi-host JAX job, runs
`shortcut.run.run` with the MLflow tracker plus any extra hooks (progress reports, a sweep's Tune
reporter), exports a finished run into results/ and returns a compact outcome for the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any


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
    jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id)


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


def execute(spec_tree: dict, *, workdir: str, eval_only: bool = False,
            tracking: Tracking = Tracking(), results_dir: str | None = None, hooks: tuple = (),
            distributed: Distributed | None = None, on_locked: str = "fail", replace_record: bool = False) -> dict:
    """Run one experiment; returns `outcome(record)`. Known errors (data not ready, a failed teacher, ...)
    propagate with their message; the run record in the run directory says how the run ended.
    `on_locked`: what to do when another process holds the run directory (shortcut.run.run).
    `replace_record`: export over a committed results record of the same spec hash (else it is kept)."""
    from orchestration.execution import cpu_slots

    cpu_slots.pin_from_env()  # before JAX starts its threads (a no-op unless the worker's options ask for it)
    try:
        return _execute(spec_tree, workdir=workdir, eval_only=eval_only, tracking=tracking,
                        results_dir=results_dir, hooks=hooks, distributed=distributed, on_locked=on_locked,
                        replace_record=replace_record)
    finally:
        cpu_slots.release()  # before Ray hears the run ended and starts the next one on this core


def _execute(spec_tree: dict, *, workdir: str, eval_only: bool, tracking: Tracking,
             results_dir: str | None, hooks: tuple, distributed: Distributed | None, on_locked: str,
             replace_record: bool) -> dict:
    if distributed is not None:
        init_distributed(distributed)
    import jax

    enable_compilation_cache(workdir)
    from orchestration.tracking.tracker import make_tracker
    from shortcut.run import run
    from shortcut.spec import validate

    spec = validate(spec_tree, {}, default_source=spec_tree.get("name", "spec"))
    lead = jax.process_index() == 0  # one process records, tracks and exports
    tracker = make_tracker(workdir=workdir, tracking_uri=tracking.uri, enabled=tracking.enabled and lead,
                           keep_server=tracking.keep_server, tags=dict(tracking.tags)) if lead else None
    listeners = Hooks(tracker, *hooks)
    try:
        record = run(spec, workdir=workdir, eval_only=eval_only, tracker=listeners, on_locked=on_locked)
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


def kept_lines(result: dict) -> list[str]:
    """What the driver says when a run kept a committed record: that it did, and the committed numbers
    beside this run's, step count by step count."""
    from orchestration.reporting.tables import last_entries

    kept = result["kept_record"]
    commit = str(kept.get("git_commit") or "unknown")[:7]

    def values(entries: list[dict]) -> dict[int, float]:  # each step count's column value
        return {int(e["num_steps"]): float(e["value"]) for e, first in last_entries({"evaluation": entries}) if first}

    ours, committed = values(result.get("evaluation") or []), values(kept["evaluation"])
    steps = [n for n in ours if n in committed]
    lines = [f"  kept the committed record of {commit}: {kept['path']}; this run's record: "
             f"{result['run_dir']}/run.json; --replace-record to replace it"]
    if steps:
        metric = next((e["metric"] for e in result.get("evaluation") or []), "metric")
        lines.append(f"  {metric} at {' / '.join(map(str, steps))} steps: this run "
                     f"{' / '.join(f'{ours[n]:.3f}' for n in steps)}; committed "
                     f"{' / '.join(f'{committed[n]:.3f}' for n in steps)} from {commit} "
                     f"(largest difference {max(abs(ours[n] - committed[n]) for n in steps):.3f}; docs/running.md, "
                     "'Determinism', says when runs agree bitwise)")
    return lines


def outcome(record: dict, *, tracked: bool = True) -> dict[str, Any]:
    """What the driver needs of a run record: identity, status, final metrics and a printable summary."""
    last_step = max((e["train_step"] for e in record.get("evaluation", [])), default=None)
    return {
        "name": record["name"], "spec_hash": record["spec_hash"], "run_dir": record["run_dir"],
        "status": record["status"], "error": record.get("error"), "stopped": record.get("stopped"),
        "smoke": record.get("smoke", False),
        "evaluation": [e for e in record.get("evaluation", []) if e["train_step"] == last_step],
        "timings": record.get("timings", {}), "summary": summary(record, tracked=tracked),
    }


def summary(record: dict, *, tracked: bool = True) -> str:
    """A few lines: where the run is, its training time and loss, each step count's metric and, when the
    run was tracked, its MLflow page."""
    lines = [f"{record['name']} {record['status']}: {record['run_dir']}"]
    final = (record.get("train") or {}).get("final")
    if final:
        lines.append(f"  train: {record['train']['steps']} steps in {record['timings']['train_s']:.0f}s, "
                     f"final loss {final['loss']:.4f}")
    last_step = max((e["train_step"] for e in record.get("evaluation", [])), default=None)
    last = [e for e in record.get("evaluation", []) if e["train_step"] == last_step]
    for n, s in (record.get("samples") or {}).items():  # keyed "<N>", or "<N>_w<w>" for one of several scales
        e = next((e for e in last if e["num_steps"] == (s["num_steps"] if "num_steps" in s else int(n))
                  and s.get("cfg_scale", e.get("cfg_scale")) == e.get("cfg_scale")), None)
        metric = f"{e['metric']} {e['value']:8.3f}" if e and e.get("value") is not None else "no metric"
        if e and "class_accuracy" in e:
            metric += f", class accuracy {e['class_accuracy']:.3f}"
        lines.append(f"  {n:>4} step(s) ({s['network_evaluations']} NFE): {metric}   grid {s['grid']}")
    return "\n".join(lines + (tracking_lines(record) if tracked else []))


def tracking_lines(record: dict) -> list[str]:
    """The run's MLflow page; for the work directory's own server, which stops when no run uses it, also
    the command that brings it back (at the same address, so the link works again)."""
    import json
    from pathlib import Path

    from orchestration.tracking.sync import RUN_ID_FILE

    rundir = Path(record["run_dir"])
    try:
        info = json.loads((rundir / RUN_ID_FILE).read_text())
        uri, url = str(info["tracking_uri"]).rstrip("/"), f"#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    except (OSError, ValueError, KeyError):
        return []
    if not uri.startswith(("http://", "https://")):
        return []
    lines = [f"  tracking: {uri}/{url}"]
    workdir = rundir.parents[1]
    if uri.startswith("http://127.0.0.1:") and (workdir / "mlflow").is_dir():
        lines.append(f"    (the local server stops when idle; `shortcut_tracking server start --workdir {workdir}` "
                     "brings it back at this address)")
    return lines
