"""The planning table of docs/planning.md: paper-scale specs on TPU slices, dp and fsdp, compiled without the hardware.

    python benchmarks/plan_table.py                       # the default cells (needs the [plan] extra: libtpu)
    python benchmarks/plan_table.py --specs celeba_ditb_shortcut --topologies tpu:v3-8 --shardings dp

Each cell is `run_experiment SPEC --plan TOPOLOGY --no-bisect [--set resources.sharding=fsdp]` without the
sampling part (orchestration/plan.py `plan`), its JSON written to results/plans/. The state columns come from
the shared estimator (shortcut/memory.py) and cost no compile; the compiled columns need one compile per cell,
minutes each on a small CPU, so cells past `--budget-s` keep their estimator figures and say "not compiled".
Days are projections: FLOPs per step / (devices x peak x MFU) x the spec's train.steps; a cell whose own
compile was skipped or ran out of memory takes the FLOPs per step of the same spec's compiled cell (marked *).
The table replaces the block between the plan-table markers in docs/planning.md (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPECS = ["celeba_ditb_shortcut", "celeba_ditb_flow", "celeba_ditb_progressive_distillation", "celeba_ditb_meanflow",
         "celeba_ditb_live_reflow", "imagenet_ditb_shortcut", "imagenet_ditb_flow",
         "imagenet_ditb_progressive_distillation", "imagenet_ditb_meanflow", "imagenet_ditb_live_reflow",
         "imagenet_ditxl_shortcut",
         # the shortcut model with the later recipe (iSM's components; docs/methods.md)
         "celeba_ditb_shortcut_improved", "imagenet_ditxl_shortcut_improved",
         # the continuous-time methods (forward-mode derivatives: more activation memory, not more state)
         *(f"{data}_ditb_{method}" for data in ("celeba", "imagenet") for method in (
             "improved_meanflow", "consistency_training_continuous", "consistency_distillation_continuous"))]
TOPOLOGIES = ["tpu:v3-8", "tpu:v4-8", "tpu:v5e-4"]
SHARDINGS = ["dp", "fsdp"]
START, END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--specs", nargs="+", default=SPECS)
    p.add_argument("--topologies", nargs="+", default=TOPOLOGIES)
    p.add_argument("--shardings", nargs="+", default=SHARDINGS)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--budget-s", type=float, default=1200, help="stop compiling after this many seconds")
    p.add_argument("--reuse", action="store_true", help="take a cell's compiled figures from an existing "
                   "results/plans/ JSON of the same spec hash, made from committed code (reusable), instead of "
                   "compiling it again")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "planning.md")
    args = p.parse_args(argv)

    from orchestration import plan
    from orchestration.planning import report as plan_report
    from shortcut import memory
    from shortcut.spec_files import load_spec

    topologies = [plan.parse_topology(t) for t in args.topologies]
    assert plan.prepare_jax(topologies[0])
    t_start = time.perf_counter()
    rows = []
    for name in args.specs:
        for topo in topologies:
            for strategy in args.shardings:
                spec = load_spec(name, [f"resources.sharding={strategy}"])
                cell = {"spec": name, "topology": topo.name, "sharding": strategy, "steps": spec.train.steps,
                        "batch": spec.train.batch_size, "num_devices": topo.num_devices, "report": None}
                cell["state"] = memory.state_bytes(spec, topo.num_devices, strategy)
                out = REPO / "results" / "plans" / f"{name}_{topo.slug}_{strategy}.json"
                if args.reuse and reusable(out, spec.hash()):
                    cell["report"] = json.loads(out.read_text())
                elif time.perf_counter() - t_start < args.budget_s:
                    t0 = time.perf_counter()
                    report = plan.plan(spec, topo, strategy=strategy, mfu=args.mfu, bisect=False, sampling=False,
                                       alternative=False, log=lambda m: None)
                    plan_report.write(report, out)
                    cell["report"] = report
                    print(f"{name} {topo.name} {strategy}: {time.perf_counter() - t0:.0f} s", flush=True)
                rows.append(cell)
    table = render(rows, args.mfu, {t.name: t for t in topologies})
    print(table)
    write_table(args.out, table)
    return 0


def reusable(path: Path, spec_hash: str) -> bool:
    """Whether a committed report can stand for its cell: same spec hash, made from a commit whose code was
    unchanged (a report may list changes to the planner's own outputs, shortcut/record.py OUTPUT_FOLDERS)."""
    from shortcut.record import code_changes

    if not path.exists():
        return False
    report = json.loads(path.read_text())
    return (report.get("spec_hash") == spec_hash and report.get("git_commit") not in (None, "unknown")
            and not code_changes(report.get("git_changes") or []))


def render(rows: list[dict], mfu: float, topologies: dict) -> str:
    from orchestration.planning.devices import DEVICES
    from shortcut.memory import gib

    flops_of = {}  # spec -> FLOPs per step of any compiled cell (the program's total does not depend on the slice)
    for c in rows:
        t = (c["report"] or {}).get("train", {})
        if t.get("flops_per_step"):
            flops_of.setdefault(c["spec"], t["flops_per_step"])
    lines = ["| spec | slice | sharding | params | state / device | compiled peak / device | fits | "
             "TFLOP / step | days to paper steps (40 % MFU) |", "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for c in rows:
        topo = topologies[c["topology"]]
        dev = DEVICES[topo.kind]
        r = c["report"]
        t = (r or {}).get("train", {})
        own = t.get("flops_per_step")
        flops = own or flops_of.get(c["spec"])
        days = None if not flops or not dev.peak_flops else \
            flops / (c["num_devices"] * dev.peak_flops * mfu) * c["steps"] / 86400
        if r is None:
            peak, fits = "not compiled", ("no (state alone)" if dev.memory_bytes and c["state"]["total"] >
                                          dev.memory_bytes else "?")
        else:
            peak = ("?" if t.get("peak") is None else gib(t["peak"])) + (" (libtpu: out of memory)" if t.get("oom") else "")
            fits = "yes" if t["fits"] else "**no**"
        mark = "" if own else "*"
        lines.append(f"| {c['spec']} | {c['topology']} | {c['sharding']} | {c['state']['num_params'] / 1e6:.0f} M | "
                     f"{gib(c['state']['state'])} | {peak} | {fits} | "
                     f"{'-' if not flops else f'{flops / 1e12:.1f}{mark}'} | "
                     f"{'-' if days is None else f'{days:.2g}{mark}' if days < 10 else f'{days:.0f}{mark}'} |")
    commits = sorted({c["report"]["git_commit"][:7] for c in rows if c["report"] and c["report"].get("git_commit")})
    lines.append("")
    lines.append(f"Compiled cells: {sum(c['report'] is not None for c in rows)} of {len(rows)}, made from the "
                 f"committed code of {', '.join(commits) or '-'} (each report's `git_commit`; `git_changes` lists "
                 "only the planner's own outputs, results/plans/ and this table, where a report names any).")
    return "\n".join(lines)


def write_table(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
