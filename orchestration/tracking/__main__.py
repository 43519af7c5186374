"""`shortcut_tracking`: the local tracking server of a work directory (start / stop / status), and syncing
run directories into MLflow after the fact."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from orchestration.tracking.server import LocalServer, supervise
from orchestration.tracking.sync import sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shortcut_tracking", description="The framework's MLflow tracking server "
                                "and after-the-fact syncing of run records.")
    sub = p.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("server", help="start / stop / show the local tracking server of a work directory")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--workdir", default="runs", help="work directory (default: runs/)")
    syn = sub.add_parser("sync", help="log run directories' run.json into MLflow (idempotent)")
    syn.add_argument("run_dirs", nargs="+", help="run directories (or work directories: every run.json below)")
    syn.add_argument("--tracking-uri", help="server URI (default: $MLFLOW_TRACKING_URI, else the local server "
                                           "of --workdir)")
    syn.add_argument("--workdir", default="runs")
    sup = sub.add_parser("_supervise", help=argparse.SUPPRESS)
    sup.add_argument("--state-dir", required=True)
    sup.add_argument("--port", type=int, required=True)
    sup.add_argument("--idle-timeout", type=float, required=True)
    args = p.parse_args(argv)

    if args.command == "_supervise":
        return supervise(Path(args.state_dir), args.port, args.idle_timeout)
    if args.command == "server":
        server = LocalServer.for_workdir(args.workdir, log=print)
        if args.action == "start":
            uri = server.acquire(keep=True)
            server.release()
            print(f"MLflow server at {uri} (kept until `shortcut_tracking server stop --workdir {args.workdir}`)")
        elif args.action == "stop":
            print("stopped" if server.stop() else "no server was running")
        else:
            state = server.state()
            print(json.dumps(state, indent=2) if state else "no server running")
        return 0
    server = None
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        server = LocalServer.for_workdir(args.workdir, log=print)
        uri = server.acquire()
    try:
        failed = 0
        from orchestration.reporting.results import find_run_records

        for path in args.run_dirs:
            for f in find_run_records(path):
                try:
                    print(f"{f.parent}: MLflow run {sync(f.parent, uri)}")
                except Exception as e:  # noqa: BLE001
                    failed += 1
                    print(f"{f.parent}: not synced: {type(e).__name__}: {e}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        if server is not None:
            server.release()


if __name__ == "__main__":
    sys.exit(main())
