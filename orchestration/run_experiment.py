"""`run_experiment NAME [--set key=value ...] [--workdir DIR] [--smoke] [--eval-only] [--wait] [--print] [--list]`
[--address ADDR | --in-process] [--cpus N] [--tracking-uri URI | --no-tracking] [--keep-tracking-server]
[--results-dir DIR] [--plan TOPOLOGY [--mfu F] [--no-bisect] [--plan-out FILE]];
`run_experiment --stop-tracking-server`.

--plan compiles the spec's train step for a TPU slice or N fake CPU devices without running it and reports
memory per device, FLOPs and projected times (orchestration/plan.py, docs/planning.md).

NAME is an experiment spec or a table spec (experiments/table1_*.yaml, orchestration/execution/graph.py).
Execution (orchestration/execution/cluster.py): by default on a local Ray instance sized to this machine; with
--address (or $RAY_ADDRESS) a dashboard URL `http://host:8265` submits a Ray job to that cluster
(orchestration/execution/jobs.py), a GCS address `host:6379` joins it as a driver; --in-process runs in this
process without Ray (for debugging).

Tracking (orchestration/tracking/): MLflow through --tracking-uri, else $MLFLOW_TRACKING_URI, else the
framework's local server for the work directory (started on 127.0.0.1 when needed, stopped when no run
has used it for a minute, unless --keep-tracking-server). A finished run (not --smoke) is exported into
results/runs/ (orchestration/reporting/results.py) for make_tables.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shortcut.errors import ShortcutError
from shortcut.spec_files import list_specs, list_tables, load_spec, to_yaml


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit 2), like every other rejected input."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_experiment",
        description="Train one experiment spec (or every experiment of a table spec) on Ray, sample at its step "
                    "counts, write run records; a table ends with make_tables.")
    p.add_argument("name", nargs="?", help="spec name (experiments/NAME.yaml) or a path to a spec file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, type-checked (repeatable), e.g. --set model.depth=4; for a table, "
                        "every experiment's")
    p.add_argument("--workdir", help="where run directories go (default: the spec's output.workdir, runs/)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on mock data for a few steps: checks any spec end to end on a CPU")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the latest checkpoint of this spec's run directory instead of training")
    p.add_argument("--wait", action="store_true",
                   help="if another run holds this spec's run directory (same spec, same work directory), wait "
                        "for it to end, then run (default: exit 1 at once, saying who holds it)")
    p.add_argument("--print", dest="print_spec", action="store_true", help="print the resolved spec and its hash")
    p.add_argument("--list", action="store_true", help="list the available specs")
    pl = p.add_argument_group("planning (orchestration/plan.py, docs/planning.md)")
    pl.add_argument("--plan", metavar="TOPOLOGY", help="compile the spec's train step for TOPOLOGY without running it "
                    "(tpu:v3-8, tpu:v4-8, tpu:v5e-4, ... with the [plan] extra; cpu:N for N fake host devices) and "
                    "report memory per device, FLOPs and projected times; writes results/plans/")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the plan's times assume (0.4)")
    pl.add_argument("--no-bisect", action="store_true", help="plan without searching the largest batch that fits")
    pl.add_argument("--plan-out", metavar="FILE", help="where the plan's JSON goes (default results/plans/...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars: plain log lines, as in a log file or CI "
                   "(also: SHORTCUT_PROGRESS=plain)")
    p.add_argument("--verbose", action="store_true", help="also show TensorFlow's, absl's and Ray's start-up "
                   "messages (hidden by default; also: SHORTCUT_VERBOSE=1)")
    r = p.add_argument_group("execution")
    r.add_argument("--address", help="Ray cluster: a dashboard URL (http://HOST:8265) submits a Ray job, a GCS "
                   "address (HOST:6379, auto) joins as a driver (default: $RAY_ADDRESS, else a local instance)")
    r.add_argument("--in-process", action="store_true", help="run here without Ray (debugging, profiling)")
    r.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all of this machine's)")
    t = p.add_argument_group("tracking and results")
    t.add_argument("--tracking-uri", help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, else a local "
                   "server started on 127.0.0.1 with its store in WORKDIR/mlflow/)")
    t.add_argument("--no-tracking", action="store_true", help="no MLflow tracking (also: SHORTCUT_TRACKING=off)")
    t.add_argument("--keep-tracking-server", action="store_true",
                   help="keep the local tracking server running after the run (stop it with --stop-tracking-server)")
    t.add_argument("--stop-tracking-server", action="store_true",
                   help="stop the local tracking server of --workdir (default runs/) and exit")
    t.add_argument("--replace-record", action="store_true",
                   help="export over a committed results record of the same spec hash (by default it is kept, and "
                        "this run's record stays in its run directory; a table rerun from a clean commit replaces "
                        "its own records)")
    t.add_argument("--results-dir", help="where a finished run exports its results record (default: "
                   "$SHORTCUT_RESULTS_DIR, else results/)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.verbose:  # before Ray starts: its workers inherit it
        os.environ["SHORTCUT_VERBOSE"] = "1"
    if args.quiet:
        from shortcut import progress

        progress.set_quiet()
    if args.list:
        print("\n".join(list_specs() + [f"{n}  (table)" for n in list_tables()]))
        return 0
    if args.stop_tracking_server:
        from orchestration.tracking.server import LocalServer

        stopped = LocalServer.for_workdir(args.workdir or "runs").stop()
        print("tracking server stopped" if stopped else "no tracking server was running")
        return 0
    if not args.name:
        parser().error("a spec name is required (see --list)")
    address = args.address or os.environ.get("RAY_ADDRESS")
    try:
        from orchestration.execution import jobs
        from orchestration.execution.graph import find_table

        table = find_table(args.name)
        spec = None if table else load_spec(args.name, args.overrides, smoke=args.smoke)
        if args.print_spec:
            return _print(args, table, spec)
        if args.plan:
            if spec is None:
                parser().error("--plan takes an experiment spec, not a table")
            from orchestration import plan

            return plan.cli(spec, args.plan, argv, mfu=args.mfu, bisect=not args.no_bisect, out=args.plan_out)
        if not args.in_process and jobs.is_job_address(address):
            return jobs.submit_and_follow(_job_argv(argv, args), address, name=args.name)
        if table:
            return _run_table(args, table, address)
        return _run_one(args, spec, address)
    except ShortcutError as e:  # one line; exit 2 when the input was rejected before anything was written
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        from orchestration.execution.cluster import end_quietly_on_another_interrupt

        end_quietly_on_another_interrupt()  # e.g. while Ray shuts down at exit
        print("interrupted; the last checkpoint is kept and a rerun resumes from it", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`--print | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _print(args, table, spec) -> int:
    if spec is None:
        from orchestration.execution.graph import build

        nodes = build(table, tuple(args.overrides), smoke=args.smoke)
        seeds = sorted({n.spec.seed for n in nodes.values()})
        print(f"# {table.name}: {len(nodes)} experiments, seed{'s' if len(seeds) > 1 else ''} "
              f"{', '.join(map(str, seeds))} (teachers first)")
        for node in nodes.values():
            after = f"  after {', '.join(nodes[d].label for d in node.deps)}" if node.deps else ""
            print(f"{node.spec.name}  seed {node.spec.seed}  {node.spec.hash()}{after}")
        return 0
    print(f"# {spec.name}  hash {spec.hash()}")
    print(to_yaml(spec), end="")
    return 0


JOB_WORKDIR, JOB_RESULTS = "~/shortcut-models/runs", "~/shortcut-models/results"


def _job_argv(argv: list[str], args) -> list[str]:
    """The job's own command line: this one minus --address (inside the job, Ray sets RAY_ADDRESS), with
    a work and a results directory on the cluster that outlive the job's temporary working directory."""
    out = _without_address(argv)
    if not args.workdir:
        out += ["--workdir", JOB_WORKDIR]
    if not args.results_dir and not os.environ.get("SHORTCUT_RESULTS_DIR"):
        out += ["--results-dir", JOB_RESULTS]
    print(f"on the cluster: runs in {args.workdir or JOB_WORKDIR}, results in "
          f"{args.results_dir or os.environ.get('SHORTCUT_RESULTS_DIR') or JOB_RESULTS} (head node's filesystem "
          "unless shared; give --workdir/--results-dir on shared storage)", file=sys.stderr)
    return out


def _without_address(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--address":
            skip = True
        elif not a.startswith("--address="):
            out.append(a)
    return out


def _launch_kwargs(args, workdir: str) -> dict:
    from orchestration.reporting.results import default_results_dir

    results = Path(args.results_dir) if args.results_dir else default_results_dir()
    from orchestration.execution.worker import Tracking

    tracking = Tracking.from_flags(no_tracking=args.no_tracking, uri=args.tracking_uri,
                                   keep_server=args.keep_tracking_server)
    return {"workdir": workdir, "eval_only": args.eval_only, "tracking": tracking,
            "results_dir": str(results.expanduser().resolve()), "on_locked": "wait" if args.wait else "fail",
            "replace_record": args.replace_record}


def _run_one(args, spec, address: str | None) -> int:
    """One experiment: the graph of the spec after any teacher of it that has no finished run in the work
    directory (the library never trains a teacher: the graph runs it first, as a run of its own)."""
    from orchestration.execution import graph
    from orchestration.reporting.console import RunReport

    workdir = str(Path(args.workdir or spec.output.workdir).expanduser().resolve())
    kwargs = _launch_kwargs(args, workdir)
    nodes = graph.of_spec(spec)
    if not args.in_process:  # before starting Ray: a run directory in use is one line, at once
        _fail_if_locked(args, spec, workdir)
        from orchestration.execution import cluster

        resources_now = cluster.connect(address, num_cpus=args.cpus)
        graph.mark_cached(nodes, Path(workdir))
        for node in (n for n in nodes.values() if n.status != graph.Status.CACHED):
            warning = cluster.check_feasible(node.spec.resources, resources_now, node.spec.name, local=not address)
            if warning:
                print(warning, file=sys.stderr)
    nodes = graph.execute(nodes, workdir=Path(workdir), launch_kwargs=kwargs, report=RunReport(spec, workdir),
                          in_process=args.in_process, fail_fast=True)
    return 0 if all(n.status in graph.DONE for n in nodes.values()) else 1


def _fail_if_locked(args, spec, workdir: str) -> None:
    """RunLocked (one line, exit 1) if another process holds this spec's run directory, unless --wait."""
    from shortcut.record import RunDir
    from shortcut.run_lock import RunLocked

    rundir = RunDir.of(spec, workdir)
    holder = None if args.wait else rundir.holder()
    if holder is not None:
        raise RunLocked(rundir.path, holder)


def _run_table(args, table, address: str | None) -> int:
    import contextlib
    import dataclasses
    import time

    from orchestration import make_tables
    from orchestration.execution import cluster, graph
    from orchestration.reporting.console import TableReport
    from orchestration.tracking import parent
    from shortcut.record import run_dir

    nodes = graph.build(table, tuple(args.overrides), smoke=args.smoke)
    workdir = Path(args.workdir or "runs").expanduser().resolve()
    kwargs = _launch_kwargs(args, str(workdir))
    if args.smoke:  # mock-data runs are never exported into results/: their tables go under the work directory
        kwargs["results_dir"] = str(workdir / "results")
    kwargs["on_locked"] = "record"  # a run directory in use elsewhere: wait for that run's record (graph.py)
    if not args.replace_record:  # a table rerun from a clean commit replaces its own committed records
        from shortcut.record import git_provenance

        prov = git_provenance()
        kwargs["replace_record"] = not prov["git_changes"] and prov["git_commit"] != "unknown"
    if args.in_process:
        print("error: a table runs on Ray; --in-process is for single experiments", file=sys.stderr)
        return 2
    resources_now = cluster.connect(address, num_cpus=args.cpus)
    for node in nodes.values():
        warning = cluster.check_feasible(node.spec.resources, resources_now, node.spec.name, local=not address)
        if warning:
            print(warning, file=sys.stderr)
    client, release = parent.client_for(workdir, kwargs["tracking"])  # the table as a parent MLflow run
    parent_id = parent.start_table(client, table, nodes, smoke=args.smoke) if client is not None else None
    if parent_id:
        tracking = kwargs["tracking"]
        kwargs["tracking"] = dataclasses.replace(tracking, tags=tracking.tags + ((parent.PARENT_TAG, parent_id),))
    try:
        t0, report = time.time(), TableReport(table.name)
        nodes = graph.execute(nodes, workdir=workdir, launch_kwargs=kwargs, report=report)
        print(report.summary(nodes, time.time() - t0))
        cached = [str(run_dir(n.spec, workdir)) for n in nodes.values() if n.status == "cached"]
        tables_args = ["--results-dir", kwargs["results_dir"]] + (["--replace-record"] if kwargs["replace_record"]
                                                                   else [])
        if args.smoke:
            tables_args += ["--include-smoke", "--export", str(workdir)]
        elif cached:  # also finished runs of an earlier invocation whose export went elsewhere
            tables_args += ["--export", *cached]
        make_tables.main(tables_args)
        ok = all(n.status in graph.DONE for n in nodes.values())
        if parent_id:
            parent.adopt(client, parent_id, cached)
            parent.finish_table(client, parent_id, Path(kwargs["results_dir"]), ok=ok)
        return 0 if ok else 1
    except KeyboardInterrupt:
        if parent_id:
            with contextlib.suppress(Exception):
                client.set_terminated(parent_id, "KILLED")
        raise
    finally:
        release()


if __name__ == "__main__":
    sys.exit(main())
