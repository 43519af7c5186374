"""Runs as stage graphs, the driver's one scheduler: a table (`run_experiment table1_digits`) runs every
experiment of it; a single run (`run_experiment digits_reflow`) is the graph of that spec after any teacher
without a finished run (`of_spec`).

A table spec (experiments/table1_*.yaml) lists experiment specs and optional overrides for all of them:

    description: Table 1 on the digits
    experiments: [digits_flow, digits_shortcut, digits_reflow, ...]
    set: []            # KEY=VALUE overrides for every experiment, teachers included
    seeds: [0, 1, 2]   # optional: every experiment once per seed (default: each spec's own seed)
    labels: {digits_shortcut_wavelet: + wavelet loss}   # optional: a row's short name in make_tables' table
    comparisons:       # optional: claims make_tables checks on the table's runs (docs/comparisons.md)
      - {better: digits_shortcut_wavelet, than: digits_shortcut, steps: [1, 4]}

`labels` and `comparisons` are read by make_tables only: they never change a run or its spec hash.

Each experiment is a node keyed by its spec hash (which includes the seed, so each seed is its own
node); a student's teacher (its `teacher:` spec) is a node it depends on, added when the table does
not list it, with the student's seed: the student of seed s distils the teacher of seed s.
make_tables aggregates the seeds of one configuration into mean +- std. Nodes run as Ray tasks
(orchestration/execution/cluster.py) as soon as their teachers finished, in parallel where resources allow.
A node whose run directory already holds a finished run with the same hash is skipped; one whose run
directory another process holds (shortcut/run_lock.py: a plain run, another table) is running elsewhere,
and the graph waits for that run's record instead of starting it. A failed node
fails only itself and the students waiting for it; the summary says which failed and why, and a
rerun redoes only what is missing. A table's graph ends by running make_tables.

Nodes run on Ray, or one after another in the driver's process (`--in-process`, single runs only); what the
driver prints is a report's (orchestration/reporting/console.py), never decided here.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from pathlib import Path
from typing import Callable

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from shortcut.errors import KeyedValueError, first_error
from shortcut.spec import Spec, SpecError
from shortcut.spec_files import load_spec, read_yaml, spec_path



class Comparison(BaseModel):
    """A claim about two rows of a table: `better` has the better metric than `than` at each of `steps`
    (make_tables checks it like the paper's findings: orchestration/reporting/findings.py)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    better: str
    than: str
    steps: tuple[pydantic.PositiveInt, ...] = Field(min_length=1)


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    experiments: tuple[str, ...] = Field(min_length=1)
    set: tuple[str, ...] = Field(default=(), description="KEY=VALUE overrides for every experiment")
    seeds: tuple[pydantic.NonNegativeInt, ...] | None = Field(
        default=None, min_length=1, description="run every experiment (and its teacher) once per seed")
    labels: dict[str, str] = Field(default_factory=dict, description="experiment -> its row's short name")
    comparisons: tuple[Comparison, ...] = Field(default=(), description="claims make_tables checks")

    @pydantic.field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds):
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {list(seeds)}")
        return seeds

    @pydantic.model_validator(mode="after")
    def _known_rows(self):
        """Labels and comparisons name experiments of this table (one line naming the first that does not)."""
        listed = set(self.experiments)
        for name in self.labels:
            if name not in listed:
                raise KeyedValueError(f"labels.{name}", f"{name!r} is not an experiment of this table "
                                                        f"(experiments: {', '.join(self.experiments)})")
        for i, c in enumerate(self.comparisons):
            for key in ("better", "than"):
                name = getattr(c, key)
                if name not in listed:
                    raise KeyedValueError(f"comparisons.{i}.{key}", f"{name!r} is not an experiment of this table "
                                                                    f"(experiments: {', '.join(self.experiments)})")
            if c.better == c.than:
                raise KeyedValueError(f"comparisons.{i}", f"compares {c.better!r} with itself")
        return self

    @property
    def is_paper(self) -> bool:
        """Table 1 of the paper on one dataset (table1_<dataset>), as opposed to an ablation or a table beyond
        the paper."""
        return self.name.startswith("table1_")

    def label(self, experiment: str) -> str | None:
        return self.labels.get(experiment)


def is_table(name: str) -> bool:
    """Whether `name` (a spec name or path) is a table spec (it lists `experiments`)."""
    return find_table(name) is not None


def find_table(name: str) -> TableSpec | None:
    """The table spec `name` (a spec name or path), None when it names no table (an experiment spec, or
    nothing: loading it as a spec says what is wrong)."""
    try:
        path = spec_path(name)
        raw = read_yaml(path)
    except SpecError:
        return None
    if "experiments" not in raw:
        return None
    raw.setdefault("name", path.stem)
    try:
        return TableSpec.model_validate(raw)
    except pydantic.ValidationError as e:
        raise SpecError(str(path), *first_error(e)) from None


def load_table(name: str) -> TableSpec:
    table = find_table(name)
    if table is None:
        raise SpecError(name, "experiments", "not a table spec (it lists no experiments)")
    return table


def runs_of(table: TableSpec, *, smoke: bool = False) -> dict[tuple[str, str], Spec]:
    """The runs a table resolves to, as (experiment name, spec hash) -> spec: every listed experiment once per
    seed, and the teachers they wait for (what `run_experiment TABLE --print` lists; with `smoke`, its --smoke
    runs). No JAX: only specs."""
    return {(node.spec.name, key): node.spec for key, node in build(table, smoke=smoke).items()}


class Status(enum.StrEnum):
    """Where a node stands: waiting (for its teachers, or room), cached (its run directory held a finished run
    already), running (here), elsewhere (another process holds its run directory), and how it ended."""

    WAITING = "waiting"
    CACHED = "cached"
    RUNNING = "running"
    ELSEWHERE = "elsewhere"
    FINISHED = "finished"
    FAILED = "failed"
    SKIPPED = "skipped"


DONE = (Status.FINISHED, Status.CACHED)  # a student waiting on these may start
LOST = (Status.FAILED, Status.SKIPPED)  # a student waiting on these is skipped


@dataclasses.dataclass
class Node:
    spec: Spec  # resolved, as it runs (the --smoke version under --smoke)
    deps: list[str]
    show_seed: bool = False  # the table runs several seeds: labels say which
    rerun: bool = False  # run even if its run directory holds a finished run (the spec of a single run)
    status: Status = Status.WAITING
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
    teacher (with the same seed: the table's overrides reach the teachers too); every teacher comes before
    the experiments that wait for it, so the longest chains start first."""
    nodes: dict[str, Node] = {}
    show_seed = table.seeds is not None and len(table.seeds) > 1
    # a seed from --set comes after the table's, so it wins (and the table runs that one seed)
    for seed_override in ([f"seed={s}"] for s in table.seeds) if table.seeds else ([],):
        common = tuple(table.set) + tuple(seed_override) + tuple(overrides)
        for name in table.experiments:
            _add(nodes, load_spec(name, common, smoke=smoke, for_teachers=common), show_seed=show_seed)
    return _teachers_first(nodes)


def of_spec(spec: Spec) -> dict[str, Node]:
    """One run as a graph: the spec's node after its chain of teachers (a teacher already finished in the work
    directory is taken as it is; the spec itself runs even when finished: it resumes and evaluates again)."""
    nodes: dict[str, Node] = {}
    _add(nodes, spec)
    nodes[spec.hash()].rerun = True
    return _teachers_first(nodes)


def _add(nodes: dict[str, Node], spec: Spec, *, show_seed: bool = False) -> str:
    """Add `spec` and its chain of teachers (each a node the next depends on); returns its key."""
    deps = [_add(nodes, spec.teacher_spec(), show_seed=show_seed)] if spec.teacher is not None else []
    key = spec.hash()
    nodes.setdefault(key, Node(spec, deps, show_seed=show_seed))
    return key


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


def mark_cached(nodes: dict[str, Node], workdir: Path) -> None:
    """Nodes whose run directory holds a finished run of their spec are cached (not run again), unless `rerun`."""
    from shortcut.record import RunDir

    for node in nodes.values():
        if node.status == Status.WAITING and not node.rerun and RunDir.of(node.spec, workdir).finished(node.spec.hash()):
            node.status = Status.CACHED


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


class _RayPool:
    """Runs nodes as Ray tasks (Ray already connected), as many at once as the cluster holds. Only what fits
    now is submitted, so that the driver, not Ray's queue, picks the next run (in the order of
    _teachers_first); with nothing running a node is submitted even if it does not fit: a cluster that
    autoscales provides it later."""

    def __init__(self, launch_kwargs: dict):
        import ray

        self.launch_kwargs = launch_kwargs
        self.board = ray.remote(num_cpus=0)(_Board).remote()
        self.refs: dict = {}  # ObjectRef -> node key
        self.in_use: collections.Counter = collections.Counter()
        self.capacity: dict[str, float] = {}

    @property
    def running(self) -> list[str]:
        return list(self.refs.values())

    def refresh(self) -> None:
        import ray

        self.capacity = ray.cluster_resources()  # once a pass: an autoscaling cluster may have grown

    def fits(self, node: Node) -> bool:
        from orchestration.execution import cluster

        return not self.refs or _fits(cluster.demand(node.spec.resources), self.in_use, self.capacity)

    def submit(self, key: str, node: Node) -> None:
        from orchestration.execution import cluster

        self.in_use.update(cluster.demand(node.spec.resources))
        ref = cluster.launch(node.spec, name=node.spec.name, hooks=(ProgressReporter(self.board, key),),
                             **self.launch_kwargs)
        self.refs[ref] = key

    def wait(self, nodes: dict[str, Node]) -> list[tuple[str, dict | BaseException]]:
        """The nodes that ended (within a few seconds), each with its outcome or its error."""
        import ray

        from orchestration.execution import cluster
        from orchestration.execution.killed import killed
        from shortcut.record import RunDir

        done, _ = ray.wait(list(self.refs), num_returns=1, timeout=5.0)
        board = ray.get(self.board.snapshot.remote()) if done else {}
        out = []
        for ref in done:
            key = self.refs.pop(ref)
            node = nodes[key]
            self.in_use.subtract(cluster.demand(node.spec.resources))
            node.started = board.get(key, {}).get("started", node.started)  # run time, not queue time
            try:
                out.append((key, ray.get(ref)))
            except Exception as e:  # noqa: BLE001 - one failed experiment never stops the others
                out.append((key, killed(e, RunDir.of(node.spec, self.launch_kwargs["workdir"]).path) or cluster.cause(e)))
            finally:
                cluster.release(ref)
        return out

    def progress(self) -> dict:
        import ray

        return ray.get(self.board.snapshot.remote())

    def stop(self) -> None:
        """Cancel the running experiments (each saves a checkpoint, as on Ctrl-C) and wait a while for them."""
        from orchestration.execution import cluster

        cluster.cancel(list(self.refs))
        for ref in self.refs:
            cluster.release(ref)

    def close(self) -> None:
        import ray

        ray.kill(self.board)


class _LocalPool:
    """Runs nodes in this process, one after another (--in-process)."""

    def __init__(self, launch_kwargs: dict):
        self.launch_kwargs = launch_kwargs
        self.next: tuple[str, Node] | None = None

    @property
    def running(self) -> list[str]:
        return [self.next[0]] if self.next else []

    def refresh(self) -> None:
        pass

    def fits(self, node: Node) -> bool:
        return self.next is None

    def submit(self, key: str, node: Node) -> None:
        self.next = (key, node)

    def wait(self, nodes: dict[str, Node]) -> list[tuple[str, dict | BaseException]]:
        from orchestration.execution import worker

        (key, node), self.next = self.next, None
        try:
            return [(key, worker.execute(node.spec, **self.launch_kwargs))]
        except Exception as e:  # noqa: BLE001 - judged by the scheduler, like a Ray task's error
            return [(key, e)]

    def progress(self) -> dict:
        return {}

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


def execute(nodes: dict[str, Node], *, workdir: Path, launch_kwargs: dict, report, in_process: bool = False,
            fail_fast: bool = False) -> dict[str, Node]:
    """Run the graph: each node once its teachers have finished, on Ray (already connected; several at once
    where resources allow) or with `in_process` one after another here; returns the nodes with their final
    status. A node's error fails it and the students waiting for it, or with `fail_fast` (a single run) ends
    the graph and is raised. `report` hears what happens (orchestration/reporting/console.py). Interrupted
    (Ctrl-C or SIGTERM), it stops the running experiments, which checkpoint, and raises KeyboardInterrupt."""
    mark_cached(nodes, workdir)
    report.begin(nodes)
    pool = _LocalPool(launch_kwargs) if in_process else _RayPool(launch_kwargs)
    try:
        _schedule(nodes, pool, workdir, report, fail_fast)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cluster.connect makes it one)
        report.interrupted(nodes, pool.running)
        if pool.running:
            report.stopping([nodes[k] for k in pool.running])
            pool.stop()
        raise
    finally:
        pool.close()
    return nodes


def _schedule(nodes: dict[str, Node], pool, workdir: Path, report, fail_fast: bool) -> None:
    """Submit every node once its teachers have finished and it fits; collect outcomes until all ended."""
    watch_elsewhere = pool.launch_kwargs.get("on_locked") == "record"  # else the run itself fails or waits
    while True:
        pool.refresh()
        for key, node in nodes.items():
            if node.status == Status.ELSEWHERE:
                _check_elsewhere(node, workdir, report.say)
            if node.status != Status.WAITING:
                continue
            lost = [nodes[d].label for d in node.deps if nodes[d].status in LOST]
            if lost:
                node.status, node.error = Status.SKIPPED, f"teacher {', '.join(lost)} did not finish"
                report.say(f"{node.label}: skipped ({node.error})")
            elif all(nodes[d].status in DONE for d in node.deps):
                if watch_elsewhere and _running_elsewhere(node, workdir, report.say):
                    continue
                if not pool.fits(node):
                    continue
                node.status, node.started = Status.RUNNING, time.time()
                pool.submit(key, node)
                report.say(f"{node.label}: submitted" + (f" (after {', '.join(nodes[d].label for d in node.deps)})"
                                                         if node.deps else ""))
        if not pool.running:
            if not any(n.status == Status.ELSEWHERE for n in nodes.values()):
                break
            time.sleep(2.0)
            continue
        for key, result in pool.wait(nodes):
            node = nodes[key]
            node.ended = time.time()
            if isinstance(result, BaseException):
                if fail_fast:
                    raise result
                node.status = Status.FAILED
                node.error = f"{type(result).__name__}: {str(result).splitlines()[0][:300] if str(result) else ''}"
            else:
                node.outcome = result
                node.status = Status.FINISHED if result["status"] == "finished" else Status.FAILED
                node.error = result.get("error")
            report.ended(node)
        report.progress(nodes, pool.running, pool.progress())  # the report keeps its own cadence


def _running_elsewhere(node: Node, workdir: Path, say: Callable[[str], None]) -> bool:
    """Whether another process (a plain run, another table or sweep) holds the node's run directory; if so
    the node waits for that run's record instead of starting a second writer (shortcut/run_lock.py)."""
    from shortcut import run_lock
    from shortcut.record import RunDir

    holder = RunDir.of(node.spec, workdir).holder()
    if holder is None:
        return False
    node.status = Status.ELSEWHERE
    say(f"{node.label}: running elsewhere ({run_lock.describe(holder)}); waiting for its record")
    return True


def _check_elsewhere(node: Node, workdir: Path, say: Callable[[str], None]) -> None:
    """A node running elsewhere whose run directory is free again: finished there (cached, with that run's
    record), else waiting (started here next, resuming from that run's last checkpoint)."""
    from orchestration.execution.worker import outcome
    from orchestration.reporting.console import metrics_line
    from shortcut.record import RunDir

    rundir = RunDir.of(node.spec, workdir)
    if rundir.holder() is not None:
        return
    record = rundir.read() or {}
    if rundir.finished(node.spec.hash()):
        node.status, node.outcome = Status.CACHED, outcome(record, tracked=False)
        node.error = f"finished elsewhere (pid {record.get('pid', '?')} on {record.get('host', '?')})"
        say(f"{node.label}: {node.error}: {metrics_line(node.outcome)}")
    else:
        node.status = Status.WAITING
        say(f"{node.label}: the run elsewhere ended ({record.get('status', 'no record')}); starting it here "
            "(it resumes from the last checkpoint)")
