"""`make_tables`: results/ (or an MLflow server) -> paper-style tables, a steps plot and a sample figure.

For each dataset (and each metric measured on it), Table 1's layout: one row per method (and model /
configuration), one column per number of sampling steps (128, 4, 1), our numbers beside the paper's.
The header names the metric exactly as it was measured (`fd_digits` is the Frechet distance in the
digits classifier's features, not FID) and its sample count. A cell without a value shows "-", never 0.
Runs that differ only by seed are aggregated: mean +- std (sample std, n-1) over seeds.

Each table shows its own table spec's runs: the (experiment, spec hash) pairs the spec resolves to (`select`):
table1_<dataset>'s for Table 1 (records of no table spec too, as before, unless only a non-paper table spec
lists their experiment), each other table spec's (experiments/*.yaml with `experiments:`) for its own table.

Our value of a run is its evaluation at its last evaluated training step (with the parameters and guidance
scales of its spec's `eval`, recorded in each entry). A step count a spec evaluates at several guidance
scales (e.g. ImageNet's 128 steps at w = 1.5 and w = 1) fills its column with the first scale and adds
a column `N-step, w = ...` for each further one. Outputs:

    results/tables/table1_<dataset>_<metric>.{md,tex,csv}   the table (CSV in the same layout, "-" = missing)
    results/tables/table1_<dataset>_<metric>_values.csv     the numbers behind it (mean, std, n, each seed, ...)
    results/tables/table1_<dataset>_<metric>_findings.{md,csv}  the paper's pairwise findings (its CelebA-HQ
                                                            column) checked on these runs, per seed (findings.py)
    results/tables/<table>_<metric>.{md,tex,csv}            a table spec's own table (an ablation, a table beyond the
                                                            paper: ablation_shortcut_digits, table_beyond_digits):
                                                            one row per experiment in the spec's order, under its
                                                            `labels:` name, with the published numbers of other
                                                            scales beside it (results/paper/published.csv, if any)
    results/tables/<table>_<metric>_values.csv              the numbers behind it
    results/tables/<table>_<metric>_comparisons.{md,csv}    the spec's `comparisons:` checked like the findings
    results/tables/index.md                                 every Markdown table in one file
    results/figures/steps_<dataset>_<metric>.png            metric vs number of steps, one line per method
    results/figures/curves_<dataset>_<metric>.png           convergence: metric vs training compute, per method
    results/figures/{steps,curves}_<table>_<metric>.png     a table spec's table's figures
    results/figures/samples_<dataset>.png                   Figure-1 style: same starting noise, one row per
                                                            method, one column per step count (the first
                                                            sample of each run's grids, see results.py)
    results/report.html                                     all of the above on one self-contained page
                                                            (reporting/report.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd

from orchestration.reporting import findings as findings_lib
from orchestration.reporting import results as results_lib
from orchestration.reporting.figures import budget_ranking, plot_budget, plot_curves, plot_steps, sample_figure
from orchestration.reporting.report import write_report
from orchestration.execution.graph import TableSpec
from orchestration.reporting.tables import (Table, build_spec_tables, build_tables, method_name, to_csv, to_latex,
                                           to_markdown, values_frame)
from shortcut import metrics
from shortcut.spec import SpecError


def select_metric(records: list[dict], name: str) -> list[dict]:
    """The records with only the evaluation entries of metric `name`: entries of that metric, or a score
    recorded in an entry (e.g. inception_score), which becomes the entry's metric and value (same provenance)."""
    out = []
    for rec in records:
        entries = []
        for e in rec.get("evaluation") or []:
            if e.get("metric") == name:
                entries.append(e)
            elif isinstance(e.get(name), (int, float)):
                entries.append({**e, "metric": name, "value": e[name], "frechet_metric": e.get("metric")})
        out.append({**rec, "evaluation": entries})
    return out


@dataclasses.dataclass
class Selection:
    """Which records each table is built from (`select`)."""
    table1: list[dict]  # Table 1's (grouped by dataset and metric, as build_tables does)
    specs: list[tuple[TableSpec, list[dict]]]  # each non-paper table spec with its own records
    left_out: list[dict]  # runs of a non-paper table spec's experiment outside that table: in no table
    methods: dict = dataclasses.field(default_factory=dict)  # experiment -> its method (from its resolved spec)

    @property
    def used(self) -> list[dict]:
        """Every record some table shows, once."""
        seen, out = set(), []
        for r in self.table1 + [r for _, recs in self.specs for r in recs]:
            if id(r) not in seen:
                seen.add(id(r))
                out.append(r)
        return out


def _key(rec: dict) -> tuple[str, str]:
    return str(rec.get("name")), str(rec.get("spec_hash"))


def select(records: list[dict], tables: list[TableSpec] | None = None) -> Selection:
    """Each table's records, by the (experiment, spec hash) pairs its table spec resolves to (graph.runs_of:
    every listed experiment per seed, and teachers; specs only, no JAX): a Table-1 table (table1_<dataset>)
    shows its spec's runs, a non-paper table spec (an ablation, a table beyond the paper) its own listed
    experiments' runs; a record may be in several (table1_digits' shortcut runs are also the ablation's first
    row). A record no table spec resolves to (a single run, a run of an earlier spec version, a synthetic one)
    goes to Table 1 of its dataset as before, unless its experiment is one only non-paper table specs list:
    then it is in no table (`left_out`), so their experiments never reach Table 1. `tables`: every table spec
    under experiments/ by default (only those listing an experiment some record has are resolved)."""
    from orchestration.execution.graph import load_table, runs_of
    from shortcut.spec_files import list_tables

    names = {str(r.get("name")) for r in records}
    if tables is None:
        tables = [load_table(t) for t in list_tables()]
    tables = [t for t in tables if names & set(t.experiments)]
    resolved = {}
    smoke = (False, True) if any(r.get("smoke") for r in records) else (False,)  # --include-smoke: those runs too
    for t in tables:
        resolved[t.name] = {}
        for mock in smoke:
            key = (t.name, t.experiments, t.set, t.seeds, mock)
            if key not in _RESOLVED:  # once a process: specs do not change while make_tables runs
                _RESOLVED[key] = {k: spec.method.name for k, spec in runs_of(t, smoke=mock).items()}
            resolved[t.name].update(_RESOLVED[key])
    runs = {name: set(r) for name, r in resolved.items()}
    methods = {k[0]: m for r in resolved.values() for k, m in r.items()}
    paper_keys = set().union(*(runs[t.name] for t in tables if t.is_paper))
    spec_keys = set().union(*(runs[t.name] for t in tables if not t.is_paper))
    paper_names = {n for t in tables if t.is_paper for n in t.experiments}
    other_names = {n for t in tables if not t.is_paper for n in t.experiments} - paper_names
    table1, left_out = [], []
    for r in records:
        k = _key(r)
        if k in paper_keys or (k not in spec_keys and k[0] not in other_names):
            table1.append(r)
        elif k not in spec_keys:
            left_out.append(r)
    specs = [(t, [r for r in records if _key(r) in runs[t.name] and r["name"] in t.experiments])
             for t in tables if not t.is_paper]
    return Selection(table1, [(t, recs) for t, recs in specs if recs], left_out, methods)


_RESOLVED: dict[tuple, dict] = {}  # (table, experiments, set, seeds, smoke) -> {(experiment, hash): method}


def spec_rows(table: TableSpec, records: list[dict], methods: dict | None = None) -> list[tuple[str, str]]:
    """(experiment, label) per row of a table spec's table, in its order: its `labels`, else the method's
    display name (with the experiment's name where two rows would read the same). `methods`: experiment ->
    method of the rows without a record yet."""
    method = {**(methods or {}), **{r["name"]: r["method"] for r in records}}
    default = {e: method_name(method[e]) if e in method else e for e in table.experiments}
    repeated = {v for v in default.values() if list(default.values()).count(v) > 1}
    return [(e, table.labels.get(e) or (f"{default[e]} ({e})" if default[e] in repeated else default[e]))
            for e in dict.fromkeys(table.experiments)]


def make_all(records: list[dict], paper: pd.DataFrame, out_dir: Path, longer: list[dict] | None = None,
             specs: list[tuple[TableSpec, list[dict]]] = (), published: list[dict] = (),
             methods: dict | None = None) -> list[Path]:
    """Every output under out_dir: Table 1's tables (from `records`) and findings, each table spec's table
    (`specs`: (spec, its records), select) with its comparisons and the `published` numbers beside it, figures,
    a budget study's (with `longer`, its records) and the one-page report.html (report.py)."""
    written = []
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    tables_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records, paper)
    index = ["# Tables (generated by make_tables; do not edit)", ""]
    for t in tables:
        written += write_table(t, tables_dir, figures_dir, index)
        written += write_findings(t, records, paper, tables_dir, index)
    spec_tables = []
    for spec, recs in specs:
        for t in build_spec_tables(spec.name, spec_rows(spec, recs, methods), recs, spec.description):
            t.published = [p for p in published if p.get("table") == spec.name]
            spec_tables.append(t)
            written += write_table(t, tables_dir, figures_dir, index)
            written += write_comparisons(t, spec, recs, tables_dir, index)
    (tables_dir / "index.md").write_text("\n".join(index))
    written.append(tables_dir / "index.md")
    for ds in sorted({r["dataset"] for r in records}):
        fig = sample_figure(records, ds, figures_dir / f"samples_{ds}.png")
        if fig:
            written.append(fig)
    if longer is not None:
        written += write_budget(records, longer, paper, out_dir)
    used = Selection(list(records), list(specs), []).used
    written.append(write_report(tables, used, out_dir, spec_tables))
    return written


def write_table(t: Table, tables_dir: Path, figures_dir: Path, index: list[str]) -> list[Path]:
    """<stem>.{md,tex,csv}, <stem>_values.csv and the steps and curves figures of one table."""
    written = []
    md = to_markdown(t)
    index.append(md)
    for suffix, text in ((".md", md), (".tex", to_latex(t)), (".csv", to_csv(t))):
        (tables_dir / f"{t.stem}{suffix}").write_text(text)
        written.append(tables_dir / f"{t.stem}{suffix}")
    values_frame(t).to_csv(tables_dir / f"{t.stem}_values.csv", index=False)
    written.append(tables_dir / f"{t.stem}_values.csv")
    for plot in (plot_steps(t, figures_dir / f"steps_{t.figure_stem}.png"),
                 plot_curves(t, figures_dir / f"curves_{t.figure_stem}.png")):
        if plot:
            written.append(plot)
    return written


def write_budget(records: list[dict], longer: list[dict], paper: pd.DataFrame, out_dir: Path) -> list[Path]:
    """A budget study beside each table it shares a dataset and metric with (figures.plot_budget,
    figures.budget_ranking)."""
    written = []
    by_key = {(t.dataset, t.metric): t for t in build_tables(longer, paper)}
    for t in build_tables(records, paper):
        b = by_key.get((t.dataset, t.metric))
        if b is None or not any(r.per_seed for r in b.rows):
            continue
        fig = plot_budget(t, b, out_dir / "figures" / f"budget_{t.dataset}_{t.metric}.png")
        steps = sorted({int(x["train"]["steps"]) for x in longer if x["dataset"] == t.dataset})
        md = out_dir / "tables" / f"budget_{t.dataset}_{t.metric}.md"
        md.write_text(f"## {t.dataset}: the budget study ({', '.join(map(str, steps))} training steps) beside the "
                      f"table\n\n" + "".join(budget_ranking(t, b, n) + "\n" for n in (1, 4)))
        written += [p for p in (fig, md) if p]
    return written


def write_findings(t: Table, records: list[dict], paper: pd.DataFrame, tables_dir: Path,
                   index: list[str]) -> list[Path]:
    """<stem>_findings.{md,csv}: the paper's pairwise findings checked on this table's runs (findings.py)."""
    findings = findings_lib.paper_findings(paper)
    if not findings or not metrics.quantity(t.metric).findings or not any(r.per_seed for r in t.rows):
        return []
    checks = findings_lib.check(findings, t.rows, method_name)
    md = findings_lib.to_markdown(checks, t.dataset, t.ours_tag, method_name,
                                  notes=(findings_lib.budget_note(records, t.dataset),))
    index.append(md)
    (tables_dir / f"{t.stem}_findings.md").write_text(md)
    findings_lib.to_frame(checks, method_name).to_csv(tables_dir / f"{t.stem}_findings.csv", index=False)
    return [tables_dir / f"{t.stem}_findings.md", tables_dir / f"{t.stem}_findings.csv"]


def write_comparisons(t: Table, spec: TableSpec, records: list[dict], tables_dir: Path,
                      index: list[str]) -> list[Path]:
    """<stem>_comparisons.{md,csv}: the table spec's `comparisons:` checked on its rows, by the paper findings'
    code path (findings.check, same intervals, reference variance, seed pairing and verdicts)."""
    comparisons = findings_lib.table_comparisons(spec, metrics.quantity(t.metric).lower_is_better)
    if not comparisons:
        return []
    labels = {r.experiment: r.label for r in t.rows}
    checks = findings_lib.check(comparisons, t.rows, lambda e: labels.get(e, e))
    md = findings_lib.to_markdown(checks, t.dataset, t.ours_tag, lambda e: labels.get(e, e),
                                  notes=(findings_lib.budget_note(records, t.dataset),), table=spec.name)
    index.append(md)
    (tables_dir / f"{t.stem}_comparisons.md").write_text(md)
    findings_lib.to_frame(checks, lambda e: labels.get(e, e)).to_csv(tables_dir / f"{t.stem}_comparisons.csv",
                                                                      index=False)
    return [tables_dir / f"{t.stem}_comparisons.md", tables_dir / f"{t.stem}_comparisons.csv"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_tables", description="Paper-style tables, a steps plot and a sample "
                                "figure from results/ (exported runs + the paper's numbers) or an MLflow server.")
    p.add_argument("--results-dir", help="results folder (default: $SHORTCUT_RESULTS_DIR, else <repo>/results)")
    p.add_argument("--tracking-uri", help="read finished runs from this MLflow server instead of results/runs/")
    p.add_argument("--export", nargs="+", metavar="RUN_OR_WORK_DIR",
                   help="first export the finished runs at or below these directories into results/runs/")
    p.add_argument("--budget", metavar="RESULTS_DIR",
                   help="a budget study's results folder (e.g. results/budget_digits, from `run_experiment "
                        "budget_digits --results-dir ...`): its curves drawn over the table's, and the one-step "
                        "ranking at both budgets (figures/budget_<dataset>_<metric>.png, tables/budget_...md)")
    p.add_argument("--replace-record", action="store_true",
                   help="with --export: replace committed results records of the same spec hash (kept by default)")
    p.add_argument("--include-smoke", action="store_true", help="also use --smoke runs (mock data)")
    p.add_argument("--out", help="where tables/ and figures/ go (default: the results folder)")
    p.add_argument("--metric", help=f"tables of this metric only: a run's metric (fid, fd_digits) or a score "
                                    f"recorded beside it ({', '.join(metrics.score_names())})")
    args = p.parse_args(argv)
    root = Path(args.results_dir) if args.results_dir else results_lib.default_results_dir()
    for path in args.export or []:
        for f in results_lib.export_tree(path, root, include_smoke=args.include_smoke, replace=args.replace_record):
            print(f"exported {f}")
    if args.tracking_uri:
        records = results_lib.records_from_mlflow(args.tracking_uri, include_smoke=args.include_smoke)
    else:
        records = [r for r in results_lib.load_exports(root) if args.include_smoke or not r.get("smoke")]
    results_lib.fill_missing_floors(records)
    paper = results_lib.load_paper(root)
    if args.metric:
        records, paper = select_metric(records, args.metric), paper[paper["metric"] == args.metric]
        if not any(r["evaluation"] for r in records):
            print(f"error: --metric {args.metric}: no run records it (a run's metric, e.g. fid or fd_digits, or one "
                  f"of {', '.join(metrics.score_names())})", file=sys.stderr)
            return 2
    try:
        selection = select(records)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in selection.left_out:
        print(f"left out {r['name']} [{str(r['spec_hash'])[:12]}]: a run of a table spec's experiment that is not "
              "one of that table's runs (another seed or setting)", file=sys.stderr)
    written = make_all(selection.table1, paper, Path(args.out) if args.out else root,
                       results_lib.load_exports(args.budget) if args.budget else None, selection.specs,
                       results_lib.load_published(root), selection.methods)
    print(f"{len(records)} run(s) -> {len(written)} file(s):")
    for f in written:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
