"""Pairwise findings, checked on our runs with calibrated verdicts (written by make_tables).

A finding comes from one of two places, and both are checked by one code path (`check`, `interval`,
`verdict`, `to_frame`, `to_markdown`):

- the paper (`PaperFinding`): read off the paper's CelebA-HQ column of Table 1 (results/paper/table1.csv):
  shortcut models against each other method, at each step count where the paper prints neither cell in
  parentheses ("evaluation under conditions that the objective is not intended to support"), e.g.
  "Shortcut Models beat Flow Matching at 128 steps (6.9 vs 7.3)". Its sides are our rows of two methods.
- a table spec (`TableComparison`): a claim its YAML declares under `comparisons:`, e.g.
  `{better: digits_shortcut_wavelet, than: digits_shortcut, steps: [1, 4]}`: "+ wavelet loss beats the
  official recipe at 1 and at 4 steps". Its sides are the table's rows of two experiments; the claimed
  direction plays the part of the paper's sign.

Below, "shortcut" is the finding's reference side (a paper finding's shortcut row, a comparison's `better`
row) and "other" its other side (the other method, a comparison's `than` row). Lower is better (for a
comparison on a metric where higher is better, the claimed sign flips).

The uncertainty model (docs/comparisons.md). The difference of a seed is other - shortcut, paired by seed
(the runs of one seed share their teacher, for students). Three sources move it: the training seed and the
generated samples, which the spread of the per-seed differences carries (variance s^2 over n seeds), and the
draw of the reference images, which every seed and both sides share, so no spread over seeds can show it.
Its variance v_ref is that of the seed-mean difference over B bootstrap resamplings of the reference images
(the same draws for both sides and every seed; shortcut/evaluation/reference_bootstrap.py). The 95 % interval:

  n >= 2   mean +- t(df) sqrt(s^2 / n + v_ref), df by Welch-Satterthwaite:
           df = (s^2/n + v_ref)^2 / ((s^2/n)^2 / (n - 1) + v_ref^2 / (B - 1))   (n - 1 when v_ref is unknown)
  n == 1   diff +- 1.96 sqrt(b_o^2 + b_s^2 + v_ref), b the two cells' bootstrap stds over their samples
           (a training seed's own variation is then not in the interval)

The verdict is one of:

  holds         the interval excludes zero, with the paper's sign
  reversed      the interval excludes zero, with the opposite sign
  not resolved  the interval contains zero; or "not resolved: both at the floor", when both cells are within
                twice the floor's std of the noise floor (as close to the reference as real data: the metric
                cannot rank them)
  no interval   one seed without bootstrap spreads

The noise floor plays no other part: it is a bias every method carries (real data's distance to the finite
reference), not the noise of a difference. Its error rates, and those of the earlier rule that used it as a
threshold, are measured by simulation (orchestration/reporting/calibration.py). An unresolved finding says how
many seeds would resolve it at the observed spread, or that none can because the reference's variance alone
keeps zero inside (and what reference size would not). Each finding also gives the compute ratio of the two
sides and, where both runs have convergence curves, the verdict read at matched compute (both curves at the
smaller of the two runs' total compute; over seeds only, as curve points keep no feature statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pandas as pd

PAPER_DATASET, PAPER_ARCH, PAPER_METRIC = "celebahq256", "DiT-B/2", "fid"
REFERENCE = "shortcut"


def _steps(n: int) -> str:
    return f"{n} step{'s' if n > 1 else ''}"


@dataclasses.dataclass(frozen=True)
class PaperFinding:
    method: str  # the method shortcut models are compared with
    num_steps: int
    shortcut: float  # the paper's values
    other: float

    by = "method"  # the row attribute that names a side
    voice = None  # set below: how its files phrase it

    @property
    def sign(self) -> int:
        """+1: shortcut is better (lower) in the paper; -1: the other method is."""
        return int(np.sign(self.other - self.shortcut))

    @property
    def sides(self) -> tuple[str, str]:
        """(reference, other): the difference of a seed is other - reference."""
        return REFERENCE, self.method

    def statement(self, name: Callable[[str], str]) -> str:
        better, worse = (REFERENCE, self.method) if self.sign > 0 else (self.method, REFERENCE)
        return f"{name(better)} beat{'' if better == REFERENCE else 's'} {name(worse)} at {_steps(self.num_steps)}"

    def columns(self, name: Callable[[str], str]) -> dict:
        """The finding's own columns of to_frame (those before our numbers)."""
        return {"finding": self.statement(name), "method": self.method, "num_steps": self.num_steps,
                "paper_shortcut": self.shortcut, "paper_other": self.other, "paper_sign": self.sign}

    def claim_cell(self) -> str | None:
        """The Markdown cell of what the source printed (None: the kind has no such column)."""
        return f"{self.shortcut:.1f} vs {self.other:.1f}"


@dataclasses.dataclass(frozen=True)
class TableComparison:
    """A table spec's claim (its YAML's `comparisons:`): experiment `better` has a better metric than `than`
    at `num_steps` (lower, unless `lower_is_better` is False)."""
    better: str
    than: str
    num_steps: int
    table: str = ""  # the table spec's name
    lower_is_better: bool = True

    by = "experiment"
    voice = None

    @property
    def sign(self) -> int:
        """The claimed sign of than - better: +1 where lower is better."""
        return 1 if self.lower_is_better else -1

    @property
    def sides(self) -> tuple[str, str]:
        return self.better, self.than

    def statement(self, name: Callable[[str], str]) -> str:
        return f"{name(self.better)} beats {name(self.than)} at {_steps(self.num_steps)}"

    def columns(self, name: Callable[[str], str]) -> dict:
        return {"comparison": self.statement(name), "table": self.table, "better": self.better,
                "than": self.than, "num_steps": self.num_steps, "claimed_sign": self.sign}

    def claim_cell(self) -> str | None:
        return None


def table_comparisons(table, lower_is_better: bool = True) -> list[TableComparison]:
    """A table spec's `comparisons:` (orchestration/execution/graph.py TableSpec), one per step count."""
    return [TableComparison(c.better, c.than, int(n), table.name, lower_is_better)
            for c in table.comparisons for n in c.steps]


@dataclasses.dataclass(frozen=True)
class Voice:
    """How the files phrase one kind of finding."""
    claim: str  # the claim column's header
    source: str | None  # the source-value column's header (None: no such column)
    difference: str  # our difference, as the header says it
    whose: str  # "the paper's findings"
    title: str  # the Markdown heading after "<dataset>: "
    sign_note: str  # what the sign of our difference means
    ratio: str  # the compute ratio's sides


PaperFinding.voice = Voice(
    "Paper's finding", "Paper: shortcut vs other", "other - shortcut", "the paper's {n} findings",
    "the paper's findings (Table 1, CelebA-HQ, FID-50k), checked on ours ({ours_tag})",
    "our difference is other - shortcut per seed (positive: shortcut better)", "other / shortcut")
TableComparison.voice = Voice(
    "Comparison (table spec)", None, "than - better", "the table's {n} comparisons",
    "{table}'s comparisons, checked on ours ({ours_tag})",
    "each comparison claims its `better` row beats its `than` row; our difference is than - better per seed "
    "(positive: as claimed, where lower is better)", "than / better")


def paper_findings(paper: pd.DataFrame) -> list[PaperFinding]:
    """Shortcut vs every other method at every step count where neither paper cell is in parentheses."""
    p = paper[(paper["dataset"] == PAPER_DATASET) & (paper["arch"] == PAPER_ARCH) & (paper["metric"] == PAPER_METRIC)
              & paper["value"].notna() & ~paper["unsupported"].astype(bool)]
    cell = {(r.method, int(r.num_steps)): float(r.value) for r in p.itertuples()}
    out = []
    for (method, n), value in cell.items():
        if method != REFERENCE and (REFERENCE, n) in cell and value != cell[(REFERENCE, n)]:
            out.append(PaperFinding(method, n, cell[(REFERENCE, n)], value))
    return out


Z95 = 1.959963984540054
MAX_SEEDS = 1000
AT_FLOOR_STDS = 2.0  # a cell within this many of the floor's stds of the floor is "at the floor"
BOTH_AT_FLOOR = "not resolved: both at the floor"
VERDICTS = ("holds", "reversed", "not resolved", "no interval")  # BOTH_AT_FLOOR counts as not resolved


def t_quantile(df: float) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def satterthwaite_df(seed_var_of_mean: float, ref_var: float, n: int, draws: int) -> float:
    """Welch-Satterthwaite degrees of freedom of seed_var_of_mean (n - 1 df) + ref_var (draws - 1 df)."""
    total = seed_var_of_mean + ref_var
    denom = seed_var_of_mean ** 2 / (n - 1) + (ref_var ** 2 / (draws - 1) if draws > 1 else 0.0)
    return float(n - 1) if denom <= 0 else total ** 2 / denom


def interval(diffs: list[float], spreads: list[float | None] = (), ref_var: float | None = None,
             draws: int = 0) -> tuple[float, float, float, str] | None:
    """(mean, low, high, how) of the 95 % interval of the mean difference (the module docstring's formula);
    `ref_var` the reference's variance of the seed-mean difference from `draws` resamplings (None: unknown,
    the interval is over seeds only). None when no interval is possible."""
    n = len(diffs)
    ref = f" + reference ({draws} draws)" if ref_var is not None else ""
    v_ref = ref_var or 0.0
    if n >= 2:
        mean, var = float(np.mean(diffs)), float(np.var(diffs, ddof=1))
        df = satterthwaite_df(var / n, v_ref, n, draws)  # n - 1 without a reference variance
        half = t_quantile(df) * np.sqrt(var / n + v_ref)
        return mean, mean - half, mean + half, f"t({df:.1f}) over {n} seeds{ref}"
    if n == 1 and spreads and spreads[0] is not None:
        half = Z95 * np.sqrt(spreads[0] ** 2 + v_ref)
        return diffs[0], diffs[0] - half, diffs[0] + half, f"bootstrap over samples (1 seed){ref}"
    return None


def at_floor(value: float | None, floor: float | None, floor_std: float | None) -> bool:
    """Whether a cell is as close to the reference as real data: value - floor < AT_FLOOR_STDS x floor std."""
    if value is None or floor is None:
        return False
    return value - floor < AT_FLOOR_STDS * (floor_std or 0.0)


def verdict(sign: int, ci: tuple[float, float, float, str] | None, both_at_floor: bool = False) -> str:
    """holds / reversed / not resolved / not resolved: both at the floor / no interval (module docstring)."""
    if ci is None:
        return "no interval"
    if both_at_floor:
        return BOTH_AT_FLOOR
    mean, low, high, _ = ci
    if low <= 0 <= high:
        return "not resolved"
    return "holds" if int(np.sign(mean)) == sign else "reversed"


def seeds_to_resolve(diffs: list[float], ref_var: float | None = None, draws: int = 0) -> int | None:
    """The fewest seeds whose interval would exclude zero at the observed mean, spread and reference variance;
    None when no number can (the reference's variance alone keeps zero inside, or there is no spread)."""
    if len(diffs) < 2:
        return None
    mean, var = abs(float(np.mean(diffs))), float(np.var(diffs, ddof=1))
    v_ref = ref_var or 0.0
    if mean == 0 or Z95 * np.sqrt(v_ref) >= mean:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if t_quantile(satterthwaite_df(var / n, v_ref, n, draws)) * np.sqrt(var / n + v_ref) < mean:
            return n
    return None


def reference_needed(mean: float, ref_var: float, ref_count: int) -> int:
    """The reference size at which the reference's share of the interval alone no longer reaches zero
    (v_ref scales as 1 / size): ref_count x 1.96^2 v_ref / mean^2, rounded up."""
    return int(np.ceil(ref_count * Z95 ** 2 * ref_var / mean ** 2))


def read_curve(points: list[tuple[float, float, float | None]], compute: float) -> tuple[float, float | None] | None:
    """(value, bootstrap std) of a curve [(compute, value, std)] at `compute`, linear in log compute between
    the two points around it; None outside the curve."""
    pts = sorted(p for p in points if p[0] and p[0] > 0)
    if not pts or compute < pts[0][0] * (1 - 1e-9) or compute > pts[-1][0] * (1 + 1e-9):
        return None
    for (c0, v0, s0), (c1, v1, s1) in zip(pts, pts[1:]):
        if c0 <= compute <= c1:
            w = 0.0 if c1 == c0 else (np.log(compute) - np.log(c0)) / (np.log(c1) - np.log(c0))
            std = None if s0 is None or s1 is None else (1 - w) * s0 + w * s1
            return (1 - w) * v0 + w * v1, std
    return pts[-1][1], pts[-1][2]  # compute equals the only point


@dataclasses.dataclass
class Side:
    """What a finding needs of one row at one step count, per seed."""
    values: dict  # seed -> value
    spreads: dict  # seed -> bootstrap std (or None)
    compute: dict  # seed -> total training FLOPs (or None)
    curves: dict  # seed -> [(compute, value, bootstrap std)]
    floor: float | None
    floor_std: float | None = None
    ref_draws: dict = dataclasses.field(default_factory=dict)  # seed -> the value against each reference draw [B]
    ref_count: int | None = None  # images in the reference

    @property
    def at_floor(self) -> bool:
        return bool(self.values) and at_floor(float(np.mean(list(self.values.values()))), self.floor, self.floor_std)


@dataclasses.dataclass
class Check:
    finding: PaperFinding
    ours: str  # our row compared with our shortcut row ("" when there is none)
    diffs: dict  # seed -> our other - shortcut
    no_data: str = ""  # why nothing could be compared
    spreads: dict = dataclasses.field(default_factory=dict)  # seed -> bootstrap std of the difference
    floor: float | None = None
    compute_ratio: float | None = None  # other / shortcut, mean over seeds
    matched: dict = dataclasses.field(default_factory=dict)  # seed -> difference at matched compute
    matched_spreads: dict = dataclasses.field(default_factory=dict)
    matched_note: str = ""
    ref_var: float | None = None  # the reference's variance of the seed-mean difference
    ref_draws: int = 0  # how many reference resamplings it comes from
    ref_count: int | None = None
    both_at_floor: bool = False

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float | None:
        return float(np.mean(list(self.diffs.values()))) if self.diffs else None

    @property
    def std(self) -> float | None:
        return float(np.std(list(self.diffs.values()), ddof=1)) if self.n > 1 else None

    @property
    def interval(self):
        return interval(list(self.diffs.values()), list(self.spreads.values()), self.ref_var, self.ref_draws)

    @property
    def verdict(self) -> str:
        return ("no data: " + self.no_data) if not self.n else verdict(self.finding.sign, self.interval,
                                                                       self.both_at_floor)

    @property
    def seeds_needed(self) -> int | None:
        return seeds_to_resolve(list(self.diffs.values()), self.ref_var, self.ref_draws)

    @property
    def ref_std(self) -> float | None:
        """sqrt(v_ref): the reference draw's share of the mean difference's std."""
        return None if self.ref_var is None else float(np.sqrt(self.ref_var))

    @property
    def seed_std_of_mean(self) -> float | None:
        """sqrt(s^2 / n): the seeds' and samples' share of the mean difference's std."""
        return None if self.std is None else self.std / np.sqrt(self.n)

    @property
    def reference_limited(self) -> bool:
        """Whether the reference's variance alone keeps zero inside the interval (more seeds cannot help)."""
        return self.ref_var is not None and self.mean is not None and Z95 * np.sqrt(self.ref_var) >= abs(self.mean)

    @property
    def matched_interval(self):
        return interval(list(self.matched.values()), list(self.matched_spreads.values()))

    @property
    def matched_verdict(self) -> str:
        if not self.matched:
            return "n/a" + (f": {self.matched_note}" if self.matched_note else "")
        return verdict(self.finding.sign, self.matched_interval)

    @property
    def compute_differs(self) -> bool:
        return self.compute_ratio is not None and abs(self.compute_ratio - 1) > 0.1


def _pair(f: PaperFinding, s: Side, o: Side, label: str, why_missing: str) -> Check:
    seeds = sorted(set(s.values) & set(o.values))
    diffs = {k: o.values[k] - s.values[k] for k in seeds}
    spreads = {k: (None if s.spreads.get(k) is None or o.spreads.get(k) is None
                   else float(np.hypot(s.spreads[k], o.spreads[k]))) for k in seeds}
    floors = [x for x in (s.floor, o.floor) if x is not None]
    ratios = [o.compute[k] / s.compute[k] for k in seeds if o.compute.get(k) and s.compute.get(k)]
    check = Check(f, label, diffs, "" if diffs else why_missing, spreads, max(floors) if floors else None,
                  float(np.mean(ratios)) if len(ratios) == len(seeds) and ratios else None,
                  both_at_floor=s.at_floor and o.at_floor, ref_count=s.ref_count)
    if seeds and all(k in s.ref_draws and k in o.ref_draws for k in seeds):
        mean_draws = np.mean([np.asarray(o.ref_draws[k]) - np.asarray(s.ref_draws[k]) for k in seeds], axis=0)
        check.ref_var, check.ref_draws = float(np.var(mean_draws, ddof=1)), len(mean_draws)
    notes = set()
    for k in seeds:
        cs, co = s.curves.get(k) or [], o.curves.get(k) or []
        if not cs or not co:
            notes.add("no convergence curve")
            continue
        at = min(max(p[0] for p in cs), max(p[0] for p in co))
        a, b = read_curve(cs, at), read_curve(co, at)
        if a is None or b is None:
            notes.add("one curve starts above the other's total compute")
            continue
        check.matched[k] = b[0] - a[0]
        check.matched_spreads[k] = None if a[1] is None or b[1] is None else float(np.hypot(a[1], b[1]))
    check.matched_note = "; ".join(sorted(notes)) if not check.matched else ""
    return check


def check(findings: list, rows, name: Callable[[str], str]) -> list[Check]:
    """Each finding (a PaperFinding or a TableComparison) against our rows (objects with .method,
    .experiment, .label and .side(steps) -> Side; a finding names its sides by `finding.by`); one check per
    (our reference row, our other row) pair, or one saying what is missing."""
    out = []
    for f in findings:
        ours = {}
        for r in rows:
            if r.per_seed:
                ours.setdefault(getattr(r, f.by), []).append(r)
        reference, other = f.sides
        pairs = [(s, o) for s in ours.get(reference, []) for o in ours.get(other, [])]
        if not pairs:
            missing = [m for m in (reference, other) if m not in ours]
            out.append(Check(f, "", {}, "no run of " + " and ".join(name(m) for m in missing)))
            continue
        for s, o in pairs:
            a, b = s.side(f.num_steps), o.side(f.num_steps)
            why = (f"no {f.num_steps}-step value of " + " and ".join(
                r.label for r, v in ((s, a), (o, b)) if not v.values)) if not (a.values and b.values) \
                else "no seed has both values"
            out.append(_pair(f, a, b, o.label if len(pairs) == 1 else f"{o.label} vs {s.label}", why))
    return out


def statement(f, name: Callable[[str], str]) -> str:
    return f.statement(name)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ci_text(ci) -> str:
    return "-" if ci is None else f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]"


def to_frame(checks: list[Check], name: Callable[[str], str]) -> pd.DataFrame:
    rows = []
    for c in checks:
        ci, mci = c.interval, c.matched_interval
        rows.append({
            **c.finding.columns(name), "ours": c.ours, "ours_mean_diff": c.mean, "ours_std_diff": c.std, "ours_n": c.n,
            "ci_low": ci[1] if ci else None, "ci_high": ci[2] if ci else None, "ci_method": ci[3] if ci else "",
            "seed_std_of_mean": c.seed_std_of_mean, "reference_std": c.ref_std, "reference_draws": c.ref_draws, "both_at_floor": c.both_at_floor,
            "noise_floor": c.floor, "verdict": c.verdict, "seeds_to_resolve": c.seeds_needed,
            "compute_ratio": c.compute_ratio, "compute_differs": c.compute_differs,
            "matched_mean_diff": mci[0] if mci else None, "matched_ci_low": mci[1] if mci else None,
            "matched_ci_high": mci[2] if mci else None, "matched_verdict": c.matched_verdict,
            "seeds": ",".join(map(str, c.diffs)), **{f"diff_seed_{s}": d for s, d in c.diffs.items()}})
    return pd.DataFrame(rows)


def _resolve_text(c: Check) -> str:
    if c.verdict != "not resolved":
        return ""
    if c.reference_limited:
        size = f"; a reference of {reference_needed(c.mean, c.ref_var, c.ref_count)} images would" \
            if c.ref_count and c.mean else ""
        return f"none: more seeds cannot resolve this{size}"
    k = c.seeds_needed
    return "-" if k is None and c.n < 2 else (f"{k}" if k is not None else f"> {MAX_SEEDS}")


def counts(checks: list[Check]) -> dict:
    """How many checks hold, are reversed, are not resolved (both at the floor among them: "at the floor"),
    have no interval, have no data: every check in exactly one of the first five."""
    verdicts = [c.verdict for c in checks]
    out = {"holds": verdicts.count("holds"), "reversed": verdicts.count("reversed"),
           "not resolved": sum(v.startswith("not resolved") for v in verdicts),
           "no interval": verdicts.count("no interval"), "no data": sum(v.startswith("no data") for v in verdicts)}
    out["at the floor"] = verdicts.count(BOTH_AT_FLOOR)
    return out


def to_markdown(checks: list[Check], dataset: str, ours_tag: str, name: Callable[[str], str],
                notes: tuple[str, ...] = (), table: str = "") -> str:
    """The checks of one kind of finding (all paper findings, or all of one table spec's comparisons) as
    Markdown: a heading, one line per check, what the counts and columns mean."""
    findings = list(dict.fromkeys(c.finding for c in checks))
    voice = findings[0].voice if findings else PaperFinding.voice
    source = f" {voice.source} |" if voice.source else ""
    lines = [f"## {dataset}: " + voice.title.format(ours_tag=ours_tag, table=table), "",
             f"| # | {voice.claim} |{source} Ours: {voice.difference}, mean [95 % interval] | "
             f"Std of the mean: seeds / reference | Verdict | Seeds to resolve | Compute {voice.ratio} | "
             "At matched compute |",
             "| ---: | --- |" + (" ---: |" if voice.source else "") + " ---: | ---: | --- | --- | ---: | --- |"]
    for i, c in enumerate(checks, 1):
        f = c.finding
        what = statement(f, name) + (f" [{c.ours}]" if c.ours and c.ours != name(f.sides[1]) else "")
        ratio = "-" if c.compute_ratio is None else f"{c.compute_ratio:.2f}" + (" (differs)" if c.compute_differs
                                                                                else "")
        matched = c.matched_verdict if not c.matched else f"{c.matched_verdict}: {_ci_text(c.matched_interval)}"
        parts = f"{_number(c.seed_std_of_mean)} / {_number(c.ref_std)}"
        claimed = f" {f.claim_cell()} |" if voice.source else ""
        lines.append(f"| {i} | {what} |{claimed} {_ci_text(c.interval)} | "
                     f"{parts} | {c.verdict} | {_resolve_text(c) or '-'} | {ratio} | {matched} |")
    k = counts(checks)
    floors = {round(c.floor, 2) for c in checks if c.floor is not None}
    lines += ["", f"- Of {voice.whose.format(n=len(findings))} ({len(checks)} checks): {k['holds']} hold, "
              f"{k['reversed']} are reversed, {k['not resolved']} are not resolved ({k['at the floor']} of them with "
              f"both cells at the floor), {k['no interval']} have no interval, {k['no data']} have no data.",
              f"- Lower is better; {voice.sign_note}. The "
              "95 % interval is mean +- t(df) sqrt(s^2/n + v_ref): s^2/n the seeds' (and their samples') variance "
              "of the mean, v_ref the reference's, from resampling the reference images (the same draws for both "
              "sides and every seed), df by Welch-Satterthwaite; with one seed +- 1.96 sqrt(both cells' bootstrap "
              "variances + v_ref). A finding holds (or is reversed) when its interval excludes zero; otherwise it "
              "is not resolved, with the seeds that would resolve it at the observed spread, or 'none' when the "
              "reference's variance alone keeps zero inside. Error rates of this rule, measured by simulation: "
              "docs/comparisons.md.",
              "- The noise floor (real images against the same reference at the same sample count"
              + (f": {', '.join(f'{x:.2f}' for x in sorted(floors))}" if floors else "") + ") is a bias every "
              "method carries, not a threshold: it only marks findings whose two cells are both within "
              f"{AT_FLOOR_STDS:g} floor stds of it ('both at the floor': the metric cannot rank methods that "
              "match real data).",
              "- Compute: total training FLOPs (XLA cost analysis x steps; a student's teacher and pair "
              f"generation included), {voice.ratio}; '(differs)' marks more than 10 % apart. At matched "
              "compute: both runs' convergence curves read at the smaller total compute of the two."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def budget_note(records: list[dict], dataset: str) -> str:
    """Whether every run of a dataset had the same training budget (steps, batch, model)."""
    budgets: dict[tuple, list[str]] = {}
    for r in records:
        if r["dataset"] == dataset:
            t = (r.get("spec") or {}).get("train") or {}
            budgets.setdefault((t.get("steps"), t.get("batch_size"), r["arch"]), []).append(r["name"])
    if len(budgets) == 1:
        (steps, batch, arch), = budgets
        return (f"Budget: every run trained {steps} steps at batch {batch} with {arch}; a student's teacher trained "
                "before it (its compute is in the compute ratio, not in the steps).")
    parts = [f"{steps} steps, batch {batch}, {arch}: {', '.join(sorted(set(names)))}"
             for (steps, batch, arch), names in budgets.items()]
    return "Budgets differ between runs, so differences may come from the budget: " + "; ".join(parts) + "."
