"""The wall time of a finished table, from its work directory's run records.

    python benchmarks/table_wall.py /tmp/t1work                 # every run.json under the directory
    python benchmarks/table_wall.py /tmp/t1work --slots 2       # and the bound for two runs at a time
    python benchmarks/table_wall.py /tmp/t1work --table ablation_shortcut_digits   # only that table's runs

Per spec and seed: the run's own time (its record's started -> finished, inside the worker), split
into setup (data, model, metric; for reflow also its pair generation), training and evaluation. Then
the span from the first start to the last finish, the sum of the runs' times and that sum divided by
the slots (the wall time with no idle slot and no start-up). The command's own wall time (Ray and
MLflow start-up, make_tables) is what `/usr/bin/time run_experiment ...` says, not measured here.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import sys
from pathlib import Path


def records(workdir: Path) -> list[dict]:
    """The finished runs' records under `workdir` (one run.json per run directory)."""
    found = []
    for path in sorted(workdir.glob("*/*/run.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "finished":
            found.append(record)
    return found


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp)


def parts(record: dict) -> dict[str, float]:
    """A run's total, setup, train and evaluation seconds."""
    timings = record.get("timings", {})
    evaluate = sum(v for k, v in timings.items() if k.startswith("evaluate"))
    total = (_time(record["finished"]) - _time(record["started"])).total_seconds()
    return {"total": total, "setup": timings.get("setup_s", 0.0), "train": timings.get("train_s", 0.0),
            "evaluate": evaluate}


def report(found: list[dict], slots: int) -> str:
    every = [parts(r) for r in found]
    by_spec: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for r, p in zip(found, every):
        by_spec[r["name"]][r["spec"]["seed"]] = p
    seeds = sorted({s for runs in by_spec.values() for s in runs})
    lines = ["| spec | " + " | ".join(f"seed {s}: total (setup / train / eval)" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for name, runs in by_spec.items():
        cells = [f"{runs[s]['total']:.0f} ({runs[s]['setup']:.0f} / {runs[s]['train']:.0f} / {runs[s]['evaluate']:.0f})"
                 if s in runs else "" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    total = sum(p["total"] for p in every)
    span = (max(_time(r["finished"]) for r in found) - min(_time(r["started"]) for r in found)).total_seconds()
    sums = {k: sum(p[k] for p in every) for k in ("setup", "train", "evaluate")}
    lines += ["", f"runs: {len(found)}; first start to last finish: {span:.0f} s ({span / 60:.1f} min)",
              f"sum of the runs' times: {total:.0f} s (setup {sums['setup']:.0f}, train {sums['train']:.0f}, "
              f"evaluation {sums['evaluate']:.0f}, the rest {total - sum(sums.values()):.0f}); "
              f"/ {slots} slots = {total / slots:.0f} s ({total / slots / 60:.1f} min)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--slots", type=int, default=2, help="runs at a time (the bound divides by this)")
    p.add_argument("--table", help="only the runs of this table spec (by spec hash, as `run_experiment TABLE "
                   "--print` lists them), when the work directory holds others too")
    args = p.parse_args(argv)
    found = records(args.workdir)
    if args.table:
        from orchestration.execution.graph import load_table, runs_of

        hashes = {key for _, key in runs_of(load_table(args.table))}
        found = [r for r in found if r["spec_hash"] in hashes]
    if not found:
        print(f"error: no finished run records under {args.workdir}", file=sys.stderr)
        return 1
    print(report(found, args.slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
