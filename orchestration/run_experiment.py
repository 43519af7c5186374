"""`run_experiment NAME [--set key=value ...] [--workdir DIR] [--smoke] [--eval-only] [--print] [--list]`
[--tracking-uri URI | --no-tracking] [--keep-tracking-server] [--results-dir DIR];
`run_experiment --stop-tracking-server`.

Tracking (orchestration/tracking.py): MLflow through --tracking-uri, else $MLFLOW_TRACKING_URI, else the
framework's local server for the work directory (started on 127.0.0.1 when needed, stopped when no run
has used it for a minute, unless --keep-tracking-server). A finished run (not --smoke) is exported into
results/runs/ (orchestration/results.py) for make_tables.
"""

from __future__ import annotations

import argparse
import sys

from shortcut.spec import SpecError, list_specs, load_spec, to_yaml


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_experiment",
        description="Train one experiment spec from experiments/, sample at its step counts, write a run record.")
    p.add_argument("name", nargs="?", help="spec name (experiments/NAME.yaml) or a path to a spec file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, type-checked (repeatable), e.g. --set model.depth=4")
    p.add_argument("--workdir", help="where run directories go (default: the spec's output.workdir, runs/)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on mock data for a few steps: checks any spec end to end on a CPU")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the latest checkpoint of this spec's run directory instead of training")
    p.add_argument("--print", dest="print_spec", action="store_true", help="print the resolved spec and its hash")
    p.add_argument("--list", action="store_true", help="list the available specs")
    t = p.add_argument_group("tracking and results")
    t.add_argument("--tracking-uri", help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, else a local "
                   "server started on 127.0.0.1 with its store in WORKDIR/mlflow/)")
    t.add_argument("--no-tracking", action="store_true", help="no MLflow tracking (also: SHORTCUT_TRACKING=off)")
    t.add_argument("--keep-tracking-server", action="store_true",
                   help="keep the local tracking server running after the run (stop it with --stop-tracking-server)")
    t.add_argument("--stop-tracking-server", action="store_true",
                   help="stop the local tracking server of --workdir (default runs/) and exit")
    t.add_argument("--results-dir", help="where a finished run exports its results record (default: "
                   "$SHORTCUT_RESULTS_DIR, else results/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print("\n".join(list_specs()))
        return 0
    if args.stop_tracking_server:
        from orchestration.tracking import LocalServer

        stopped = LocalServer.for_workdir(args.workdir or "runs").stop()
        print("tracking server stopped" if stopped else "no tracking server was running")
        return 0
    if not args.name:
        parser().error("a spec name is required (see --list)")
    try:
        spec = load_spec(args.name, args.overrides)
        if args.print_spec:
            print(f"# {spec.name}  hash {spec.hash()}")
            print(to_yaml(spec), end="")
            return 0
        from shortcut.data import DatasetNotReadyError
        from shortcut.evaluate import EvaluationSetupError
        from shortcut.evaluation import InceptionWeightsError
        from orchestration.tracking import make_tracker
        from shortcut.run import UnsupportedError, run
        from shortcut.stages import TeacherError
        from shortcut.train import NonFiniteLossError

        tracker = make_tracker(workdir=args.workdir or spec.output.workdir, tracking_uri=args.tracking_uri,
                               enabled=not args.no_tracking, keep_server=args.keep_tracking_server)
        try:
            record = run(spec, workdir=args.workdir, smoke=args.smoke, eval_only=args.eval_only, tracker=tracker)
        except (DatasetNotReadyError, UnsupportedError, NonFiniteLossError, EvaluationSetupError,
                InceptionWeightsError, TeacherError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            if tracker is not None:
                tracker.close()
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept and a rerun resumes from it", file=sys.stderr)
        return 130
    print(summary(record))
    _export(record, args.results_dir)
    return 0


def _export(record: dict, results_dir: str | None) -> None:
    """Export a finished run's results record for make_tables; a failure here never fails the run."""
    from orchestration.results import export_run

    try:
        path = export_run(record, results_dir)
    except Exception as e:  # noqa: BLE001
        print(f"warning: results record not exported ({type(e).__name__}: {e}); "
              f"later: make_tables --export {record['run_dir']}", file=sys.stderr)
        return
    if path:
        print(f"  results record: {path}")


def summary(record: dict) -> str:
    lines = [f"{record['name']} finished: {record['run_dir']}"]
    final = (record.get("train") or {}).get("final")
    if final:
        lines.append(f"  train: {record['train']['steps']} steps in {record['timings']['train_s']:.0f}s, "
                     f"final loss {final['loss']:.4f}")
    last_step = max((e["train_step"] for e in record["evaluation"]), default=None)
    values = {e["num_steps"]: e for e in record["evaluation"] if e["train_step"] == last_step}
    for n, s in record["samples"].items():
        e = values.get(int(n))
        metric = f"{e['metric']} {e['value']:8.3f}" if e else "no metric"
        if e and "class_accuracy" in e:
            metric += f", class accuracy {e['class_accuracy']:.3f}"
        lines.append(f"  {n:>4} step(s) ({s['network_evaluations']} NFE): {metric}   grid {s['grid']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
