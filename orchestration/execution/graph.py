"""Tables as stage graphs: `run_experiment table1_digits` runs every experiment of a table on Ray.

A table spec (experiments/table1_*.yaml) lists experiment specs and optional overrides for all of them:

    description: Table 1 on the digits
    experiments: [digits_flow, digits_shortcut, digits_reflow, ...]
    set: []            # KEY=VALUE overrides for every experiment, teachers included
    seeds: [0, 1, 2]   # optional: every experiment once per seed (default: each spec's own seed)

Each experiment is a node keyed by its spec hash (which includes the seed, so each seed is its own
node); a student's teacher (its `teacher:` spec) is a node it depends on, added when the table does
not list it, with the student's seed: the student of seed s distils the teacher of seed s.
make_tables aggregates the seeds of one configuration into mean +- std. Nodes run as Ray tasks
(orchestration/execution/cluster.py) as soon as their teachers finished, in parallel where resources allow.
A node whose run directory already holds a finished run with the same hash is skipped; one whose run
directory another process holds (shortcut/run_lock.py: a plain run, another table) is running elsewhere,
and the graph waits for that run's record instead of starting it. A failed node
fails only itself and the students waiting for it; the summary says which failed and why, and a
rerun redoes only what is missing. The graph ends by running make_tables.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Callable

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from shortcut.spec import Spec, SpecError, is_table_file, load_spec, spec_path, validate

PROGRESS_EVERY_S = 30.0


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    experiments: tuple[str, ...] = Field(min_length=1)
    set: tuple[str, ...] = Field(default=(), description="KEY=VALUE overrides for every experiment")
    seeds: tuple[pydantic.NonNegativeInt, ...] | None = Field(
        default=None, min_length=1, description="run every experiment (and its teacher) once per seed")

    @pydantic.field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds):
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {list(seeds)}")
        return seeds


def is_table(name: str) -> bool:
    """Whether `name` (a spec name or path) is a table spec (it lists `experiments`)."""
    try:
        return is_table_file(spec_path(name))
    except SpecError:
        return False


def load_table(name: str) -> TableSpec:
    path = spec_path(name)
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("name", path.stem)
    try:
        return TableSpec.model_validate(raw)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        raise SpecError(str(path), ".".join(map(str, err["loc"])), message) from None


@dataclasses.dataclass
class Node:
    spec: Spec  # as it runs (the --smoke version under --smoke)
    deps: list[str]
    show_seed: bool = False  # the table runs several seeds: labels say which
    status: str = "waiting"  # waiting | cached | running | elsewhere | finished | failed | skipped
    error: str | None = None
    outcome: dict | None = None
    started: float | None = None
    ended: float | None = None

    @property
    def label(self) -> str:
        seed = f" seed {self.spec.seed}" if self.show_seed else ""
        return f"{self.spec.name}{seed} [{self.spec.hash()[:8]}]"


def build(table: TableSpec, overrides: tuple[str, ...] = (), *, smoke: bool = False) -> dict[str, Node]:
    """The nodes of a table, keyed by spec hash: for each seed of the table, every experiment and its
    teacher (with the same seed); every teacher comes before the experiments that wait for it, so the
    longest chains start first."""
    nodes: dict[str, Node] = {}

    def add(spec: Spec, common: tuple[str, ...]) -> str:
        deps = []
        if spec.teacher is not None:
            # the table's overrides (its seed included) reach the teacher too, through teacher_overrides
            tree = spec.model_dump(mode="json")
            tree["teacher_overrides"] = list(spec.teacher_overrides) + list(common)
            spec = validate(tree, {}, default_source=spec.name)
            deps.append(add(spec.teacher_spec(), common))
        key = spec.hash()
        nodes.setdefault(key, Node(spec, deps, show_seed=table.seeds is not None and len(table.seeds) > 1))
        return key

    # a seed from --set comes after the table's, so it wins (and the table runs that one seed)
    for seed_override in ([f"seed={s}"] for s in table.seeds) if table.seeds else ([],):
        common = tuple(table.set) + tuple(seed_override) + tuple(overrides)
        for name in table.experiments:
            add(load_spec(name, common, smoke=smoke), common)
    return _teachers_first(nodes)


def _teachers_first(nodes: dict[str, Node]) -> dict[str, Node]:
    """The nodes in the order the driver starts them when several are ready: by how many generations
    wait on them (most first: teachers before students), then students before experiments without a
    teacher, then the table's order. Students go early because they tend to be the long runs (reflow
    generates its pairs first) and the ones that become ready late: started last, they would end the
    table with one run on an otherwise idle machine."""
    below: dict[str, int] = {}

    def depth(key: str) -> int:  # the longest chain of students below a node
        if key not in below:
            below[key] = max((depth(k) + 1 for k, n in nodes.items() if key in n.deps), default=0)
        return below[key]

    order = sorted(nodes, key=lambda k: (-depth(k), not nodes[k].deps))
    return {k: nodes[k] for k in order}


def _fits(need: dict[str, float], in_use: dict[str, float], cluster: dict[str, float]) -> bool:
    """Whether a run needing `need` fits next to the runs using `in_use` of the cluster's resources."""
    return all(in_use.get(k, 0) + v <= cluster.get(k, 0) + 1e-9 for k, v in need.items() if v)


def _finished(node: Node, workdir: Path) -> bool:
    from shortcut import record

    return record.finished(record.read(record.run_dir(node.spec, workdir)), node.spec.hash())


class _Board:
    """A Ray actor the workers report their progress to, and the driver reads."""

    def __init__(self):
        self.state: dict[str, dict] = {}

    def update(self, key: str, fields: dict) -> None:
        self.state.setdefault(key, {}).update(fields)

    def snapshot(self) -> dict:
        return self.state


class ProgressReporter:
    """Run hooks (see orchestration.execution.worker.Hooks) that tell the board how far a run is."""

    def __init__(self, board, key: str):
        self.board, self.key = board, key

    def start(self, record: dict) -> None:
        self.board.update.remote(self.key, {"phase": "starting", "total": record["spec"]["train"]["steps"],
                                            "started": time.time()})

    def log_metrics(self, metrics: dict) -> None:
        self.board.update.remote(self.key, {"phase": "training", "step": int(metrics["step"]),
                                            "loss": float(metrics["loss"])})

    def log_evaluation(self, entries: list[dict]) -> None:
        if entries:
            self.board.update.remote(self.key, {"phase": f"evaluated at step {entries[0]['train_step']}"})


def execute(table: TableSpec, nodes: dict[str, Node], *, workdir: Path, launch_kwargs: dict,
            log: Callable[[str], None] = print) -> dict[str, Node]:
    """Run the graph on Ray (already connected); returns the nodes with their final status. Interrupted
    (Ctrl-C or SIGTERM), it stops the running experiments, which checkpoint, and raises KeyboardInterrupt."""
    import ray

    t0 = time.time()

    def say(message: str) -> None:
        elapsed = int(time.time() - t0)
        log(f"[{table.name} {elapsed // 60:02d}:{elapsed % 60:02d}] {message}")

    for node in nodes.values():
        if _finished(node, workdir):
            node.status = "cached"
    cached = [n.label for n in nodes.values() if n.status == "cached"]
    say(f"{len(nodes)} experiments ({len(cached)} already finished: {', '.join(cached) or 'none'})")

    board = ray.remote(num_cpus=0)(_Board).remote()
    running: dict = {}  # ObjectRef -> node key
    try:
        _schedule(nodes, running, board, launch_kwargs, say)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cluster.connect makes it one)
        _stop(running, nodes, say)
        raise
    finally:
        ray.kill(board)
    return nodes


def _schedule(nodes: dict[str, Node], running: dict, board, launch_kwargs: dict, say: Callable[[str], None]) -> None:
    """Submit every node once its teachers have finished and it fits; collect outcomes until all ended.
    `running` (ObjectRef -> node key) is kept up to date for the caller."""
    import ray

    from orchestration.execution import cluster
    from orchestration.execution.killed import killed
    from shortcut.record import run_dir

    # Only what fits now is submitted, so that the driver, not Ray's queue, picks the next run (in the
    # order of _teachers_first). With nothing running a node is submitted even if it does not fit: a
    # cluster that autoscales provides it later.
    in_use: collections.Counter = collections.Counter()
    last_progress = time.time()
    workdir = Path(launch_kwargs["workdir"])
    while True:
        capacity = ray.cluster_resources()  # once a pass: an autoscaling cluster may have grown
        for key, node in nodes.items():
            if node.status == "elsewhere":
                _check_elsewhere(node, workdir, say)
            if node.status != "waiting":
                continue
            dep_status = [nodes[d].status for d in node.deps]
            if any(s in ("failed", "skipped") for s in dep_status):
                node.status = "skipped"
                node.error = "teacher " + ", ".join(nodes[d].label for d in node.deps
                                                    if nodes[d].status in ("failed", "skipped")) + " did not finish"
                say(f"{node.label}: skipped ({node.error})")
            elif all(s in ("finished", "cached") for s in dep_status):
                if _running_elsewhere(node, workdir, say):
                    continue
                need = cluster.demand(node.spec.resources)
                if running and not _fits(need, in_use, capacity):
                    continue
                in_use.update(need)
                node.status, node.started = "running", time.time()
                hooks = (ProgressReporter(board, key),)
                ref = cluster.launch(node.spec.model_dump(mode="json"), node.spec.resources, name=node.spec.name,
                                     hooks=hooks, **launch_kwargs)
                running[ref] = key
                say(f"{node.label}: submitted" + (f" (after {', '.join(nodes[d].label for d in node.deps)})"
                                                  if node.deps else ""))
        if not running:
            if not any(n.status == "elsewhere" for n in nodes.values()):
                break
            time.sleep(2.0)
            continue
        done, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
        board_now = ray.get(board.snapshot.remote()) if done else {}
        for ref in done:
            key = running.pop(ref)
            node = nodes[key]
            in_use.subtract(cluster.demand(node.spec.resources))
            node.ended = time.time()
            node.started = board_now.get(key, {}).get("started", node.started)  # run time, not queue time
            try:
                node.outcome = ray.get(ref)
                node.status = "finished" if node.outcome["status"] == "finished" else "failed"
                node.error = node.outcome.get("error")
            except Exception as e:  # noqa: BLE001 - one failed experiment never stops the others
                error = killed(e, run_dir(node.spec, workdir)) or cluster.cause(e)
                node.status, node.error = "failed", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            finally:
                cluster.release(ref)
            say(f"{node.label}: {node.status} after {_duration(node.ended - node.started)}"
                + (f": {_metrics(node.outcome)}" if node.status == "finished" else f" ({node.error})"))
        if time.time() - last_progress >= PROGRESS_EVERY_S and running:
            last_progress = time.time()
            say(_progress_line(nodes, running, ray.get(board.snapshot.remote())))


def _running_elsewhere(node: Node, workdir: Path, say: Callable[[str], None]) -> bool:
    """Whether another process (a plain run, another table or sweep) holds the node's run directory; if so
    the node waits for that run's record instead of starting a second writer (shortcut/run_lock.py)."""
    from shortcut import run_lock
    from shortcut.record import run_dir

    holder = run_lock.holder(run_dir(node.spec, workdir))
    if holder is None:
        return False
    node.status = "elsewhere"
    say(f"{node.label}: running elsewhere ({run_lock.describe(holder)}); waiting for its record")
    return True


def _check_elsewhere(node: Node, workdir: Path, say: Callable[[str], None]) -> None:
    """A node running elsewhere whose run directory is free again: finished there (cached, with that run's
    record), else waiting (started here next, resuming from that run's last checkpoint)."""
    from orchestration.execution.worker import outcome
    from shortcut import run_lock
    from shortcut.record import read as _read_record
    from shortcut.record import run_dir

    rundir = run_dir(node.spec, workdir)
    if run_lock.holder(rundir) is not None:
        return
    record = _read_record(rundir) or {}
    if record.get("status") == "finished" and record.get("spec_hash") == node.spec.hash():
        node.status, node.outcome = "cached", outcome(record, tracked=False)
        node.error = f"finished elsewhere (pid {record.get('pid', '?')} on {record.get('host', '?')})"
        say(f"{node.label}: {node.error}: {_metrics(node.outcome)}")
    else:
        node.status = "waiting"
        say(f"{node.label}: the run elsewhere ended ({record.get('status', 'no record')}); starting it here "
            "(it resumes from the last checkpoint)")


def _stop(running: dict, nodes: dict[str, Node], say: Callable[[str], None]) -> None:
    """Cancel the running experiments (each saves a checkpoint, as on Ctrl-C) and wait a while for them."""
    from orchestration.execution import cluster

    if not running:
        return
    say(f"interrupted: stopping {', '.join(nodes[k].label for k in running.values())} (each checkpoints first)")
    cluster.cancel(list(running))
    for ref in running:
        cluster.release(ref)


def _progress_line(nodes: dict[str, Node], running: dict, board: dict) -> str:
    parts = []
    for key in running.values():
        b = board.get(key, {})
        where = f"{b['step']}/{b['total']}" if "step" in b else b.get("phase", "queued")
        parts.append(f"{nodes[key].spec.name} {where}")
    counts = {s: sum(n.status == s for n in nodes.values())
              for s in ("finished", "cached", "elsewhere", "failed", "waiting")}
    return "running: " + ", ".join(parts) + " | " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)


def _metrics(outcome: dict | None) -> str:
    entries = sorted((outcome or {}).get("evaluation", []), key=lambda e: -e["num_steps"])
    values = [e for e in entries if e.get("value") is not None]
    if not values:
        return "no metric"
    return f"{values[0]['metric']} " + ", ".join(f"{e['value']:.3g} @{e['num_steps']}" for e in values)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def summary(table: TableSpec, nodes: dict[str, Node], seconds: float) -> str:
    lines = [f"{table.name}: {len(nodes)} experiments in {_duration(seconds)}"]
    for node in nodes.values():
        took = _duration(node.ended - node.started) if node.started and node.ended else "-"
        detail = _metrics(node.outcome) if node.status == "finished" else (node.error or "")
        lines.append(f"  {node.status:<8} {node.label:<48} {took:>8}  {detail}")
    failed = [n for n in nodes.values() if n.status in ("failed", "skipped")]
    if failed:
        lines.append(f"{len(failed)} did not finish; rerun the same command to redo only those")
    return "\n".join(lines)
