"""What the driver prints while runs go on and when they end: a run's summary, a kept record's lines, and a
graph's report (a table's progress with the time since it began, or a single run's own lines).

The scheduler (orchestration/execution/graph.py) tells a report what happens; nothing here decides anything.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from orchestration.reporting import table_progress
from shortcut.record import last_evaluation


# ------------------------------------------------------------------------------------------- one run


def summary(record: dict, *, tracked: bool = True) -> str:
    """A few lines: where the run is, its training time and loss, each step count's metric and, when the
    run was tracked, its MLflow page."""
    lines = [f"{record['name']} {record['status']}: {record['run_dir']}"]
    final = (record.get("train") or {}).get("final")
    if final:
        lines.append(f"  train: {record['train']['steps']} steps in {record['timings']['train_s']:.0f}s, "
                     f"final loss {final['loss']:.4f}")
    last = last_evaluation(record)
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



# ------------------------------------------------------------------------------------------- a graph


def metrics_line(outcome: dict | None) -> str:
    """`fd_digits 1.2 @128, 3.4 @1` of a run's outcome, or `no metric`."""
    entries = sorted((outcome or {}).get("evaluation", []), key=lambda e: -e["num_steps"])
    values = [e for e in entries if e.get("value") is not None]
    if not values:
        return "no metric"
    return f"{values[0]['metric']} " + ", ".join(f"{e['value']:.3g} @{e['num_steps']}" for e in values)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class TableReport:
    """A table's report: every event as one line with the time since the table began."""

    def __init__(self, title: str, log: Callable[[str], None] | None = None):
        self.title, self.log, self.t0 = title, log, time.time()
        self.view = table_progress.TableProgress(title, self.say)

    def say(self, message: str) -> None:
        elapsed = int(time.time() - self.t0)
        # print looked up now: with bars on, Ray's bar manager has replaced it with one that keeps the bars whole
        (self.log or print)(f"[{self.title} {elapsed // 60:02d}:{elapsed % 60:02d}] {message}")

    def begin(self, nodes: dict) -> None:
        cached = [n.label for n in nodes.values() if n.status == "cached"]
        self.say(f"{len(nodes)} experiments ({len(cached)} already finished: {', '.join(cached) or 'none'})")

    def ended(self, node) -> None:
        self.say(f"{node.label}: {node.status} after {duration(node.ended - node.started)}"
                 + (f": {metrics_line(node.outcome)}" if node.status == "finished" else f" ({node.error})"))

    def stopping(self, nodes: list) -> None:
        self.say(f"interrupted: stopping {', '.join(n.label for n in nodes)} (each checkpoints first)")

    def interrupted(self, nodes: dict, running: list[str]) -> None:
        """Ctrl-C: what is kept and how to resume (table_progress.interrupted)."""
        self.view.close()
        self.say(table_progress.interrupted(nodes, running))

    def progress(self, nodes: dict, running: list[str], board: dict) -> None:
        """Called on every pass of the scheduler: a bar on a terminal, a line every 30 s elsewhere."""
        self.view.update(nodes, running, board)

    def summary(self, nodes: dict, seconds: float) -> str:
        self.view.close()
        lines = [f"{self.title}: {len(nodes)} experiments in {duration(seconds)}"]
        for node in nodes.values():
            took = duration(node.ended - node.started) if node.started and node.ended else "-"
            detail = metrics_line(node.outcome) if node.status == "finished" else (node.error or "")
            lines.append(f"  {node.status:<8} {node.label:<48} {took:>8}  {detail}")
        failed = [n for n in nodes.values() if n.status in ("failed", "skipped")]
        if failed:
            lines.append(f"{len(failed)} did not finish; rerun the same command to redo only those")
        return "\n".join(lines)


class RunReport(TableReport):
    """A single run's report (its graph: the run after any teacher without a finished run): no progress lines;
    a teacher that runs first is announced, and each run's summary printed as it ends."""

    def __init__(self, spec, workdir: str):
        super().__init__(spec.name)
        self.spec, self.workdir = spec, workdir

    def say(self, message: str) -> None:
        pass

    def begin(self, nodes: dict) -> None:
        for node in nodes.values():
            if node.status == "waiting" and node.spec.hash() != self.spec.hash():
                print(f"{self.spec.name}: its teacher {node.spec.name} has no finished run in {self.workdir}; "
                      "running it first", file=sys.stderr)

    def ended(self, node) -> None:
        result = node.outcome or {}
        if "summary" in result:
            print(result["summary"])
        if result.get("exported"):
            print(f"  results record: {result['exported']}")
        if result.get("kept_record"):
            print("\n".join(kept_lines(result)))

    def stopping(self, nodes: list) -> None:
        print("interrupted: stopping the run (it checkpoints first) ...", file=sys.stderr)

    def interrupted(self, nodes: dict, running: list[str]) -> None:
        pass

    def progress(self, nodes: dict, running: list[str], board: dict) -> None:
        pass
