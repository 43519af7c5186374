"""Paper-style tables from results records: Table 1's layout (one row per method, one column per number of
sampling steps, ours beside the paper's), the cells' marks (noise floor, convergence) and their renderings
(Markdown, LaTeX, CSV). The command line that writes them is orchestration/make_tables.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from orchestration.reporting import findings as findings_lib
from orchestration.reporting import reference_variance
from shortcut import methods, metrics

MISSING = "-"
PAPER_COLUMNS = ["dataset", "method", "arch", "metric", "num_samples", "num_steps", "value", "unsupported", "secondary",
                 "source", "note"]


def method_name(method: str) -> str:
    """A method's row name: its objective's display name (shortcut/methods.py)."""
    return methods.display_name(method)


def samples_tag(counts) -> str:
    def k(n: int) -> str:
        return f"{n / 1000:g}k" if n >= 1000 else str(n)

    return "/".join(k(int(n)) for n in sorted({int(c) for c in counts}))


def metric_tag(metric: str, counts) -> str:
    """`FID-50k`, `fd_digits-2k`: the metric's name and its sample count(s)."""
    name = metrics.quantity(metric).display
    return f"{name}-{samples_tag(counts)}" if len(counts) else name


# ------------------------------------------------------------------------------------------- data


def last_entries(rec: dict) -> list[tuple[dict, bool]]:
    """A record's evaluation entries at its last evaluated training step, each with whether it is the first
    guidance scale of its (metric, step count): the one that fills that step count's column."""
    evals = [e for e in rec.get("evaluation") or [] if isinstance(e.get("value"), (int, float))]
    if not evals:
        return []
    last = max(int(e["train_step"]) for e in evals)
    out, seen = [], set()
    for e in evals:
        if int(e["train_step"]) == last:
            out.append((e, (e["metric"], int(e["num_steps"])) not in seen))
            seen.add((e["metric"], int(e["num_steps"])))
    return out


def table_entries(rec: dict, metric: str) -> list[dict]:
    """The entries of a record that fill its row's step-count columns for `metric`."""
    return [e for e, first in last_entries(rec) if first and e["metric"] == metric]


def our_values(records: list[dict]) -> pd.DataFrame:
    """One line per (run, metric, steps, scale column): the evaluation at the run's last evaluated training
    step. `scale_column` is "" for the first guidance scale of a step count (its N-step column) and
    "w = <w>" for each further scale the spec evaluates that step count at (an extra column)."""
    rows = []
    for rec in records:
        for e, first in last_entries(rec):
            last = int(e["train_step"])
            rows.append({"scale_column": "" if first else f"w = {float(e['cfg_scale']):g}",
                         "dataset": rec["dataset"], "metric": e["metric"], "method": rec["method"],
                         "arch": rec["arch"], "config": rec["config_hash"], "name": rec["name"],
                         "seed": int(rec["seed"]), "spec_hash": rec["spec_hash"], "num_steps": int(e["num_steps"]),
                         "value": float(e["value"]), "num_samples": int(e["num_samples"]), "train_step": last,
                         "cfg_scale": e.get("cfg_scale"), "finished": rec.get("finished") or "",
                         "bootstrap_std": e.get("bootstrap_std"),
                         "noise_floor": (e.get("noise_floor") or {}).get("value"),
                         "noise_floor_std": (e.get("noise_floor") or {}).get("std"),
                         "memorisation": e.get("memorisation"),
                         "total_flops": (rec.get("compute") or {}).get("total_flops")})
    columns = ["dataset", "metric", "method", "arch", "config", "name", "seed", "spec_hash", "num_steps", "value",
               "num_samples", "train_step", "cfg_scale", "finished", "scale_column", "bootstrap_std", "noise_floor",
               "noise_floor_std", "memorisation", "total_flops"]
    df = pd.DataFrame(rows, columns=columns)
    # the same run twice (e.g. two MLflow runs of one spec): keep the latest
    df = df.sort_values("finished").drop_duplicates(["config", "seed", "metric", "num_steps", "scale_column"],
                                                    keep="last")
    return df.reset_index(drop=True)


def aggregate(values: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (n-1; NaN for one seed), n and seeds per (dataset, metric, method, arch, config, steps)."""
    keys = ["dataset", "metric", "method", "arch", "config", "num_steps", "scale_column"]
    if values.empty:
        return pd.DataFrame(columns=keys + ["name", "mean", "std", "n", "seeds", "num_samples"])
    g = values.groupby(keys, sort=False)
    out = g.agg(name=("name", "first"), mean=("value", "mean"), std=("value", "std"), n=("value", "size"),
                seeds=("seed", lambda s: ",".join(str(x) for x in sorted(s))),
                num_samples=("num_samples", lambda s: samples_tag(s)))
    return out.reset_index()


@dataclasses.dataclass
class Row:
    method: str
    arch: str
    label: str
    ours: dict  # steps -> (mean, std, n) or None
    paper: dict  # steps -> float or None
    paper_unsupported: frozenset = frozenset()  # steps the paper prints in parentheses
    paper_secondary: frozenset = frozenset()  # steps whose paper value comes from a secondary source
    per_seed: dict = dataclasses.field(default_factory=dict)  # steps -> {seed: value}
    extra: dict = dataclasses.field(default_factory=dict)  # (steps, scale column) -> (mean, std, n): further w
    spreads: dict = dataclasses.field(default_factory=dict)  # steps -> {seed: bootstrap std of the value}
    floors: dict = dataclasses.field(default_factory=dict)  # steps -> the metric's noise floor
    floor_stds: dict = dataclasses.field(default_factory=dict)  # steps -> the floor's std over its draws
    ref_draws: dict = dataclasses.field(default_factory=dict)  # steps -> {seed: value at each reference draw}
    ref_count: int | None = None  # images in the reference
    compute: dict = dataclasses.field(default_factory=dict)  # seed -> total training FLOPs
    curves: dict = dataclasses.field(default_factory=dict)  # steps -> {seed: [(FLOPs, value, bootstrap std)]}
    memorisation: dict = dataclasses.field(default_factory=dict)  # steps -> mean memorisation score
    experiment: str = ""  # a table spec's row: the experiment it shows (a Table-1 row shows a method)

    def side(self, num_steps: int) -> findings_lib.Side:
        """This row at one step count, per seed, as a finding reads it."""
        return findings_lib.Side(self.per_seed.get(num_steps, {}), self.spreads.get(num_steps, {}), self.compute,
                                 self.curves.get(num_steps, {}), self.floors.get(num_steps),
                                 self.floor_stds.get(num_steps), self.ref_draws.get(num_steps, {}), self.ref_count)

    def converged(self, num_steps: int) -> bool | None:
        """Whether doubling the training compute moved the seed-mean curve by less than the noise floor: its
        last point against the point nearest half the last point's compute (None: no such pair, no floor).
        Comparing two adjacent points instead would depend on how densely the curve is sampled."""
        curve = mean_curve(self.curves.get(num_steps, {}))
        floor = self.floors.get(num_steps)
        if len(curve) < 2 or floor is None:
            return None
        (c_last, v_last), earlier = curve[-1], curve[:-1]
        c_half, v_half = min(earlier, key=lambda p: abs(np.log(p[0]) - np.log(c_last / 2)))
        if not 0.35 < c_half / c_last < 0.7:  # no point near half the compute
            return None
        return abs(v_last - v_half) < floor

    @property
    def mean_compute(self) -> float | None:
        values = [c for c in self.compute.values() if c]
        return float(np.mean(values)) if values and len(values) == len(self.compute) else None


@dataclasses.dataclass
class Table:
    dataset: str
    metric: str
    steps: list[int]
    ours_tag: str
    paper_tag: str | None  # None: the paper has nothing for this dataset
    rows: list[Row]
    notes: list[str]
    paper_metrics: frozenset = frozenset()
    extra_columns: list = dataclasses.field(default_factory=list)  # (steps, "w = 1.5"): a step count's further scales
    name: str = ""  # a table spec's table (ablation, beyond the paper): its spec's name; "" for Table 1
    title: str = ""  # its heading after "<dataset>: " (a table spec's table)
    published: list = dataclasses.field(default_factory=list)  # published numbers beside it (published_block)

    @property
    def compute_row(self) -> Row | None:
        """The compute column's unit: the Flow Matching row; in a table spec's table without one, its first row."""
        flow = next((r for r in self.rows if r.method == "flow_matching" and r.mean_compute), None)
        if flow is None and self.name:
            flow = next((r for r in self.rows[:1] if r.mean_compute), None)
        return flow

    @property
    def reference_compute(self) -> float | None:
        """The compute row's mean training compute: the compute column's unit."""
        row = self.compute_row
        return row.mean_compute if row else None

    @property
    def compute_unit(self) -> str:
        """The compute column's unit as its header says it: flow, or (a table spec's first row) its label."""
        row = self.compute_row
        return "flow" if row is None or row.method == "flow_matching" else row.label

    @property
    def has_memorisation(self) -> bool:
        return any(r.memorisation for r in self.rows)

    @property
    def stem(self) -> str:
        return f"{self.name}_{self.metric}" if self.name else f"table1_{self.dataset}_{self.metric}"

    @property
    def figure_stem(self) -> str:
        """Its figures' names after `steps_` / `curves_`: <dataset>_<metric> for Table 1, else its stem."""
        return self.stem if self.name else f"{self.dataset}_{self.metric}"

    def ours_columns(self) -> list[tuple[int, str]]:
        """Our columns: (steps, "") per step count, followed by (steps, "w = ...") for its further scales."""
        return [c for n in self.steps for c in [(n, "")] + [e for e in self.extra_columns if e[0] == n]]

    def header(self) -> list[str]:
        cols = ["Method", "Model"] + ([f"Compute (x {self.compute_unit})"] if self.reference_compute else [])
        cols += [f"{self.ours_tag} {n}-step{', ' + w if w else ''} (ours)" for n, w in self.ours_columns()]
        if self.has_memorisation:
            cols.append(f"Memorisation {'/'.join(map(str, self.steps))}-step")
        if self.paper_tag:
            cols += [f"{self.paper_tag} {n}-step (paper)" for n in self.steps]
        return cols

    def cells(self, pm: str = "±") -> list[list[str]]:
        out = []
        for r in self.rows:
            max_n = max((c[2] for c in r.ours.values() if c), default=1)
            line = [r.label + (f" ({max_n} seeds)" if max_n > 1 else ""), r.arch]
            if self.reference_compute:
                line.append(MISSING if not r.mean_compute else f"{r.mean_compute / self.reference_compute:.2f}")
            for n, w in self.ours_columns():
                cell = r.extra.get((n, w)) if w else r.ours.get(n)
                text = format_ours(cell, max_n, pm)
                if not w and text != MISSING:
                    text += cell_marks(r, n, cell[0])
                line.append(text)
            if self.has_memorisation:
                line.append("/".join(f"{r.memorisation[n]:.2f}" if n in r.memorisation else MISSING
                                     for n in self.steps))
            if self.paper_tag:
                line += [format_paper(r.paper.get(n), n in r.paper_unsupported, n in r.paper_secondary)
                         for n in self.steps]
            out.append(line)
        return out


def format_ours(cell, row_n: int, pm: str = "±") -> str:
    if cell is None or cell[0] is None or not np.isfinite(cell[0]):
        return MISSING
    mean, std, n = cell
    text = f"{mean:.2f}" if n == 1 or not np.isfinite(std) else f"{mean:.2f} {pm} {std:.2f}"
    return text + (f" (n={n})" if n != row_n else "")


MARK_FLOOR, MARK_CONVERGED, MARK_MOVING = "≈", "✓", "↘"


def cell_marks(r: Row, num_steps: int, mean: float) -> str:
    """' ≈' when the cell is at the metric's noise floor (findings.at_floor: within twice the floor's std of
    it); ' ✓' when its curve has converged (last two points closer than the floor), ' ↘' when it is still
    moving; nothing where there is no curve."""
    marks = MARK_FLOOR if findings_lib.at_floor(mean, r.floors.get(num_steps), r.floor_stds.get(num_steps)) else ""
    converged = r.converged(num_steps)
    marks += "" if converged is None else (MARK_CONVERGED if converged else MARK_MOVING)
    return f" {marks}" if marks else ""


def floor_note(records: list[dict], ds: str, metric: str) -> str | None:
    """The line under a table: the metric's noise floor at each sample count its runs used."""
    floors: dict[int, dict] = {}
    for r in records:
        if r["dataset"] != ds:
            continue
        for e in r.get("evaluation") or []:
            if e.get("metric") == metric and e.get("noise_floor"):
                floors.setdefault(int(e["num_samples"]), e["noise_floor"])
    if not floors:
        return None
    parts = [f"{f['value']:.2f} ± {f['std']:.2f} at {n:,} samples ({f['draws']} draws of real images: "
             f"{f.get('source') or 'unknown source'}{'; ' + f['note'] if f.get('note') else ''})"
             for n, f in sorted(floors.items())]
    return (f"Noise floor of {metric} (real images against the same reference): " + "; ".join(parts) +
            f". {MARK_FLOOR} marks a cell at the floor (less than {findings_lib.AT_FLOOR_STDS:g} of the floor's stds "
            f"above it: as close to the reference as real data at this sample count). The floor is a bias every "
            f"cell carries, not the noise of a difference: findings use intervals (docs/comparisons.md). "
            f"{MARK_CONVERGED} marks a cell whose convergence curve (seed mean) moved "
            f"less than the floor when the training compute doubled (its last point against the one at half its "
            f"compute), {MARK_MOVING} one still moving.")


MARK_SECONDARY = "†"


def format_paper(value, unsupported: bool = False, secondary: bool = False) -> str:
    """A paper cell: '-' if unknown; in parentheses where the paper puts it in parentheses; † where the value
    comes from a secondary source."""
    if value is None:
        return MISSING
    text = f"{value:.1f}" if round(value, 1) == value else f"{value:g}"  # the paper prints one decimal: 23.0
    return (f"({text})" if unsupported else text) + (f" {MARK_SECONDARY}" if secondary else "")


def sort_key(method: str, arch: str, label: str):
    """Rows in each objective's `table_order` (Table 1's end-to-end methods, then its two-phase ones)."""
    return methods.table_order(method), method, arch, label


def build_tables(records: list[dict], paper: pd.DataFrame) -> list[Table]:
    values = our_values(records)
    agg = aggregate(values)
    paper = paper.copy()
    datasets = sorted(set(agg["dataset"]) | set(paper["dataset"]))
    tables = []
    for ds in datasets:
        p = paper[paper["dataset"] == ds]
        ours_metrics = sorted(set(agg.loc[agg["dataset"] == ds, "metric"]))
        for metric in ours_metrics or sorted(set(p["metric"])):
            tables.append(_table(ds, metric, agg[(agg["dataset"] == ds) & (agg["metric"] == metric)], p, records,
                                 values[(values["dataset"] == ds) & (values["metric"] == metric)]))
    return tables


def build_spec_tables(name: str, experiments: list[tuple[str, str]], records: list[dict],
                      description: str = "") -> list[Table]:
    """A table spec's own tables (an ablation, a table beyond the paper), one per (dataset, metric) of its
    records: one row per experiment, in the spec's order, labelled `experiments`' (experiment, label); never
    merged by method; no paper columns (published numbers of other scales go beside it: published_block).
    `records` are the table's runs (make_tables selects them by spec hash)."""
    values = our_values(records)
    agg = aggregate(values)
    tables = []
    for ds in sorted(set(agg["dataset"])):
        for metric in sorted(set(agg.loc[agg["dataset"] == ds, "metric"])):
            a = agg[(agg["dataset"] == ds) & (agg["metric"] == metric)]
            seed_values = values[(values["dataset"] == ds) & (values["metric"] == metric)]
            t = _table(ds, metric, a, pd.DataFrame(columns=PAPER_COLUMNS), records, seed_values,
                       experiments=experiments)
            t.name = name if len(set(agg["dataset"])) == 1 else f"{name}_{ds}"
            t.title = f"{name}, {t.ours_tag} (ours)"
            if description:
                t.notes.insert(0, f"{name}: {description}")
            tables.append(t)
    return tables


def published_block(t: Table) -> str:
    """Markdown: the published numbers beside a table spec's table (t.published: results/paper/published.csv's
    lines of this table), one line per (row, published method, dataset, model, budget, metric), one column per
    number of network evaluations; "" when there are none."""
    if not t.published:
        return ""
    labels = {r.experiment: r.label for r in t.rows}
    order = {r.experiment: i for i, r in enumerate(t.rows)}
    groups: dict[tuple, dict] = {}
    for p in t.published:
        key = tuple(str(p.get(k) or "") for k in ("experiment", "method", "dataset", "model", "budget", "metric"))
        g = groups.setdefault(key, {"values": {}, "sources": [], "secondary": False})
        if p.get("nfe") is not None and p.get("value") is not None:
            g["values"][int(p["nfe"])] = float(p["value"])
        source = str(p.get("source") or "").rsplit(", column ", 1)[0]
        if source and source not in g["sources"]:
            g["sources"].append(source)
        g["secondary"] |= str(p.get("note") or "").strip().lower().startswith("secondary")
    nfes = sorted({n for g in groups.values() for n in g["values"]}, reverse=True)
    lines = [f"### {t.name}: published (other scale)", "",
             "| Row (ours) | Published | " + " | ".join(f"{n} NFE" for n in nfes) +
             " | Metric | Dataset | Model | Budget | Source |",
             "| --- | --- | " + " | ".join("---:" for _ in nfes) + " | --- | --- | --- | --- | --- |"]
    for key in sorted(groups, key=lambda k: order.get(k[0], len(order))):  # stable: the file's order within a row
        experiment, method, dataset, model, budget, metric = key
        g = groups[key]
        cells = [f"{g['values'][n]:g}" if n in g["values"] else MISSING for n in nfes]
        row = [labels.get(experiment, experiment or MISSING), method + (f" {MARK_SECONDARY}" if g["secondary"] else ""),
               *cells, metric, dataset, model, budget, "; ".join(g["sources"])]
        lines.append("| " + " | ".join((c or MISSING).replace("|", "\\|") for c in row) + " |")
    lines += ["", "- Published numbers of these methods on other datasets, models and budgets (results/paper/"
              "published.csv): context for the direction of each step, never a target; they are not comparable "
              f"with our {t.ours_tag} cells. NFE: network evaluations per sample."]
    if any(g["secondary"] for g in groups.values()):
        lines.append(f"- {MARK_SECONDARY}: a number this project could not confirm from a primary source (its note "
                     "in published.csv says where it was seen).")
    return "\n".join(lines) + "\n"


def mean_curve(by_seed: dict) -> list[tuple[float, float]]:
    """The seeds' mean curve [(compute, value)], over the points every seed has (by position)."""
    if not by_seed:
        return []
    length = min(len(points) for points in by_seed.values())
    return [(float(np.mean([p[i][0] for p in by_seed.values()])), float(np.mean([p[i][1] for p in by_seed.values()])))
            for i in range(length)]


def _number(x) -> float | None:
    return None if x is None or (isinstance(x, float) and not np.isfinite(x)) or pd.isna(x) else float(x)


def _row_evidence(primary: pd.DataFrame, records: list[dict], metric: str) -> dict:
    """A row's spreads, noise floors, compute, convergence curves and memorisation, from its seeds' records."""
    spreads = {int(n): {int(s): _number(b) for s, b in zip(v["seed"], v["bootstrap_std"])}
               for n, v in primary.groupby("num_steps")}
    floors = {int(n): max((f for f in map(_number, v["noise_floor"]) if f is not None), default=None)
              for n, v in primary.groupby("num_steps")}
    floor_stds = {int(n): max((f for f in map(_number, v["noise_floor_std"]) if f is not None), default=None)
                  for n, v in primary.groupby("num_steps")}
    memorisation = {int(n): float(np.mean(m)) for n, v in primary.groupby("num_steps")
                    for m in [[x for x in map(_number, v["memorisation"]) if x is not None]] if m}
    compute = {int(s): _number(c) for s, c in zip(primary["seed"], primary["total_flops"])}
    hashes = set(primary["spec_hash"])
    curves: dict[int, dict[int, list]] = {}
    ref_draws: dict[int, dict[int, np.ndarray]] = {}
    ref_count = None
    for rec in records:
        if rec["spec_hash"] not in hashes:
            continue
        for e in table_entries(rec, metric):
            draws = reference_variance.cell_draws(rec, e)
            if draws is not None:
                ref_draws.setdefault(int(e["num_steps"]), {})[int(rec["seed"])] = draws
                ref_count = reference_variance.reference_size(str(e["reference"]))
        for p in rec.get("curve") or []:
            if p.get("metric") == metric and p.get("compute_flops"):
                curves.setdefault(int(p["num_steps"]), {}).setdefault(int(rec["seed"]), []).append(
                    (float(p["compute_flops"]), float(p["value"]), _number(p.get("bootstrap_std"))))
    for by_seed in curves.values():
        for points in by_seed.values():
            points.sort()
    return {"spreads": spreads, "floors": floors, "floor_stds": floor_stds, "compute": compute, "curves": curves,
            "memorisation": memorisation, "ref_draws": ref_draws, "ref_count": ref_count}


def _table(ds: str, metric: str, a: pd.DataFrame, p: pd.DataFrame, records: list[dict],
           seed_values: pd.DataFrame, experiments: list[tuple[str, str]] | None = None) -> Table:
    """Table 1's layout of one dataset and metric; with `experiments` [(experiment, label)], a table spec's:
    one row per experiment in that order (its runs: the records of that name), no paper columns."""
    steps = sorted({int(n) for n in a["num_steps"]} | {int(n) for n in p["num_steps"]}, reverse=True)
    counts = {int(c) for r in records if r["dataset"] == ds for e in r.get("evaluation") or []
              if e.get("metric") == metric for c in [e.get("num_samples")] if c}
    ours_tag = metric_tag(metric, counts)
    paper_tag = None
    if len(p):
        paper_metrics = sorted(set(p["metric"]))
        paper_tag = " / ".join(metric_tag(m, set(p.loc[p["metric"] == m, "num_samples"].astype(int)))
                               for m in paper_metrics)
    rows: dict[tuple, Row] = {}
    configs = a.groupby(["method", "arch"])["config"].nunique().to_dict() if len(a) else {}

    def row(method: str, arch: str, label: str, config_rows: pd.DataFrame, primary: pd.DataFrame, **kw) -> Row:
        cells = {(int(r.num_steps), r.scale_column): (float(r.mean), float(r.std), int(r.n))
                 for r in config_rows.itertuples()}
        ours = {n: c for (n, w), c in cells.items() if not w}
        per_seed = {int(n): dict(zip(v["seed"].astype(int), v["value"].astype(float)))
                    for n, v in primary.groupby("num_steps")}
        return Row(method, arch, label, ours, {}, per_seed=per_seed, extra={k: c for k, c in cells.items() if k[1]},
                   **_row_evidence(primary, records, metric), **kw)

    for (method, arch, config), g in ([] if experiments is not None else
                                      a.groupby(["method", "arch", "config"], sort=False)):
        label = method_name(method)
        if configs.get((method, arch), 1) > 1:  # several configurations of one method: say which
            label += f" [{g['name'].iloc[0]} {config[:6]}]"
        primary = seed_values[(seed_values["config"] == config) & (seed_values["scale_column"] == "")]
        rows[(method, arch, config)] = row(method, arch, label, g, primary)
    for experiment, label in experiments or []:  # a table spec's rows: by experiment, in its order
        mine = seed_values[seed_values["name"] == experiment]
        config_rows = aggregate(mine)  # by experiment: two experiments never merge
        first = next((r for r in records if r["name"] == experiment), None)
        method = first["method"] if first else ""
        arch = first["arch"] if first else MISSING
        rows[(experiment,)] = row(method, arch, label, config_rows, mine[mine["scale_column"] == ""],
                                  experiment=experiment)
    for (method, arch), g in p.groupby(["method", "arch"], sort=False):
        values = {int(r.num_steps): (None if pd.isna(r.value) else float(r.value)) for r in g.itertuples()}
        unsupported = frozenset(int(r.num_steps) for r in g.itertuples() if r.unsupported and not pd.isna(r.value))
        secondary = frozenset(int(r.num_steps) for r in g.itertuples() if getattr(r, "secondary", False)
                              and not pd.isna(r.value))
        matched = [row for key, row in rows.items() if key[:2] == (method, arch)]
        if not matched:
            rows[(method, arch, "")] = Row(method, arch, method_name(method), {}, {})
            matched = [rows[(method, arch, "")]]
        for row in matched:
            row.paper, row.paper_unsupported, row.paper_secondary = values, unsupported, secondary
    ordered = list(rows.values()) if experiments is not None else \
        sorted(rows.values(), key=lambda r: sort_key(r.method, r.arch, r.label))
    params = sorted({{"ema": "EMA"}.get(str(e.get("params", "ema")), str(e.get("params"))) for r in records
                     if r["dataset"] == ds for e in r.get("evaluation") or [] if e.get("metric") == metric})
    notes = [metrics.quantity(metric).description + ".",
             f"Ours: {' / '.join(params) or 'EMA'} parameters at the last evaluated training step; mean ± std over "
             "seeds where a row has several (sample std); '-' = no value."]
    references = sorted({str(e["reference"]) for r in records if r["dataset"] == ds
                         for e in r.get("evaluation") or [] if e.get("metric") == metric and e.get("reference")})
    if references:
        notes.append("Reference: " + ", ".join(references) + ("" if any("heldout" in x for x in references) else
                     " (includes the training images: a model that reproduces them scores well)") + ".")
    notes += [n for n in [floor_note(records, ds, metric)] if n]
    if any(r.get("compute") for r in records if r["dataset"] == ds):
        unit = "flow" if experiments is None or any(r.method == "flow_matching" and r.mean_compute for r in ordered) \
            else next((r.label for r in ordered[:1] if r.mean_compute), "flow")
        notes.append(f"Compute (x {unit}): total training FLOPs (XLA cost analysis of the compiled train step x steps; "
                     "a student adds its teacher's and the teacher's pair generation), relative to the "
                     + ("Flow Matching row" if unit == "flow" else f"table's first row ({unit})")
                     + "; equal steps are not equal budgets.")
    if any(e.get("memorisation") is not None for r in records if r["dataset"] == ds for e in r.get("evaluation") or []):
        notes.append("Memorisation: share of samples closer to their nearest training image than 95 % of held-out "
                     "real images are to theirs (0.05 for samples as novel as unseen data, 1 for copies).")
    extra_columns = sorted({(int(n), w) for n, w in zip(a["num_steps"], a["scale_column"]) if w},
                           key=lambda c: (-c[0], float(c[1].removeprefix("w = "))))
    scales = seed_values.groupby(["num_steps", "scale_column"])["cfg_scale"].agg(
        lambda ws: " / ".join(f"{float(w):g}" for w in sorted(set(ws)))) if len(seed_values) else {}
    if len(seed_values) and (extra_columns or set(seed_values["cfg_scale"].astype(float)) != {1.0}):
        notes.append("Guidance scale w of our cells: " + "; ".join(
            f"{n}-step{', ' + w if w else ''}: {scales[(n, w)]}"
            for n, w in sorted(scales.index, key=lambda k: (-k[0], k[1])))
            + (". A step count evaluated at several scales: the first fills its column, each further one adds "
               "a 'N-step, w = ...' column" if extra_columns else "") + ".")
    if experiments is not None:
        notes.append("Rows: the table spec's experiments in its order (one configuration each, never merged by "
                     "method); a row without runs yet shows '-'.")
    elif paper_tag:
        sources: dict[str, list[str]] = {}
        for src in p.loc[p["value"].notna(), "source"]:
            head, _, where = src.partition(", row ")
            where = where.rsplit(", column ", 1)[0]
            rows_named = sources.setdefault(head, [])
            if where and where not in rows_named:
                rows_named.append(where)
        text = "; ".join(f"{h} (row{'s' if len(w) > 1 else ''} {', '.join(w)})" if w else h for h, w in sources.items())
        notes.append("Paper: " + (text or "no published value available") +
                     ". Empty paper cells ('-'): " + (p.loc[p["value"].isna(), "note"].iloc[0]
                                                    if p["value"].isna().any() else "none") + ".")
        if "secondary" in p and (p["secondary"] & p["value"].notna()).any():
            notes.append(f"Paper cells marked {MARK_SECONDARY}: from a secondary source (a summary of the paper, not "
                         "the paper or its official code); the primary source could not be read.")
        if (p["unsupported"] & p["value"].notna()).any():
            notes.append("Paper cells in parentheses, e.g. (302.9): the paper's own mark, 'evaluation under "
                         "conditions that the objective is not intended to support'.")
        if set(p["metric"]) != {metric}:
            notes.append(f"Ours ({ours_tag}) and the paper's ({paper_tag}) are different metrics: "
                         "the columns are not comparable.")
        elif ours_tag != paper_tag:
            notes.append(f"Ours use a different sample count ({ours_tag}) than the paper ({paper_tag}); "
                         "Frechet distances are biased by sample count.")
    else:
        notes.append(f"The paper reports no numbers on {ds}.")
    return Table(ds, metric, steps, ours_tag, paper_tag, ordered, notes, frozenset(p["metric"]), extra_columns)


# -------------------------------------------------------------------------------------- rendering


def to_markdown(t: Table) -> str:
    header = t.header()
    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    lines = [f"## {t.dataset}: {t.title}" if t.title else
             f"## {t.dataset}: {t.ours_tag}" + (f" (ours) vs {t.paper_tag} (paper)" if t.paper_tag else ""), "",
             "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.cells()]
    lines += [""] + [f"- {n}" for n in t.notes]
    block = published_block(t)
    return "\n".join(lines) + "\n" + (f"\n{block}" if block else "")


def latex_escape(text: str) -> str:
    out = text.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        out = out.replace(ch, "\\" + ch)
    return out.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")


def to_latex(t: Table) -> str:
    k, ko = len(t.steps), len(t.ours_columns())
    spec = "ll" + "r" * ko + ("|" + "r" * k if t.paper_tag else "")
    group = [" ", " ", rf"\multicolumn{{{ko}}}{{c{'|' if t.paper_tag else ''}}}{{Ours: {latex_escape(t.ours_tag)}}}"]
    if t.paper_tag:
        group.append(rf"\multicolumn{{{k}}}{{c}}{{Paper: {latex_escape(t.paper_tag)}}}")
    steps = [f"{n}-step{', ' + w if w else ''}" for n, w in t.ours_columns()]
    steps += [f"{n}-step" for n in t.steps] if t.paper_tag else []
    lines = [f"% {t.dataset}: generated by make_tables; '-' = no value"]
    lines += [f"% {latex_escape(n.replace('±', '+-'))}" for n in t.notes]
    lines += [rf"\begin{{tabular}}{{{spec}}}", r"\hline", " & ".join(group) + r" \\",
              " & ".join(["Method", "Model"] + steps) + r" \\", r"\hline"]
    for row in t.cells(pm=r"$\pm$"):
        lines.append(" & ".join(c if "$" in c else latex_escape(c) for c in row) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    return pd.DataFrame(t.cells(), columns=t.header()).to_csv(index=False)


def values_frame(t: Table) -> pd.DataFrame:
    """The numbers behind a table: per row and step count, mean, std, n, each seed's value
    (`ours_seed_<s>`) and the paper's value with its parenthesis flag; a step count's further guidance
    scales have their own lines (`scale_column` "w = ...")."""
    seeds = sorted({s for r in t.rows for by_seed in r.per_seed.values() for s in by_seed})
    rows = []
    for r in t.rows:
        for n, w in t.ours_columns():
            c = r.extra.get((n, w)) if w else r.ours.get(n)
            by_seed = {} if w else r.per_seed.get(n, {})
            rows.append({"dataset": t.dataset, **({"experiment": r.experiment} if t.name else {}),
                         "method": r.method, "arch": r.arch, "row": r.label, "num_steps": n,
                         "scale_column": w, "ours_metric": t.ours_tag, "ours_mean": c[0] if c else None,
                         "ours_std": c[1] if c and c[2] > 1 else None, "ours_n": c[2] if c else 0,
                         "ours_seeds": ",".join(str(s) for s in sorted(by_seed)),
                         **{f"ours_seed_{s}": by_seed.get(s) for s in seeds},
                         "noise_floor": None if w else r.floors.get(n),
                         "converged": None if w else r.converged(n),
                         "memorisation": None if w else r.memorisation.get(n),
                         "total_flops": r.mean_compute,
                         "compute_x_flow": (r.mean_compute / t.reference_compute
                                            if r.mean_compute and t.reference_compute else None),
                         "paper_metric": t.paper_tag, "paper": None if w else r.paper.get(n),
                         "paper_unsupported": not w and n in r.paper_unsupported,
                         "paper_secondary": not w and n in r.paper_secondary})
    return pd.DataFrame(rows)
