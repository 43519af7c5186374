"""The paper's pairwise findings, checked on our runs (written by make_tables next to each table).

A finding is read off the paper's CelebA-HQ column of Table 1 (results/paper/table1.csv): shortcut
models against each other method, at each step count where the paper prints neither cell in
parentheses ("evaluation under conditions that the objective is not intended to support"), e.g.
"Shortcut Models beat Flow Matching at 128 steps (6.9 vs 7.3)" or "Live Reflow beats Shortcut
Models at 128 steps (6.3 vs 6.9)". Lower is better.

On our runs, the difference of a seed is other - shortcut in our metric, paired by seed (the runs of
one seed share their evaluation noise). A finding holds in a seed when that difference has the
paper's sign (a tie holds nowhere). Reported: mean +- std (n-1) of the difference over the seeds that
have both values, and in how many of them the finding holds; a finding without both values says so.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pandas as pd

PAPER_DATASET, PAPER_ARCH, PAPER_METRIC = "celebahq256", "DiT-B/2", "fid"
REFERENCE = "shortcut"


def lower_is_better(metric: str) -> bool:
    """The metrics findings are checked on: Frechet distances (FID, fd_digits, fd_*)."""
    return metric == "fid" or metric.startswith("fd_")


@dataclasses.dataclass(frozen=True)
class PaperFinding:
    method: str  # the method shortcut models are compared with
    num_steps: int
    shortcut: float  # the paper's values
    other: float

    @property
    def sign(self) -> int:
        """+1: shortcut is better (lower) in the paper; -1: the other method is."""
        return int(np.sign(self.other - self.shortcut))


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


@dataclasses.dataclass
class Check:
    finding: PaperFinding
    ours: str  # our row compared with our shortcut row ("" when there is none)
    diffs: dict  # seed -> our other - shortcut
    no_data: str = ""  # why nothing could be compared

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def holds_in(self) -> int:
        return sum(int(np.sign(d)) == self.finding.sign for d in self.diffs.values())

    @property
    def mean(self) -> float | None:
        return float(np.mean(list(self.diffs.values()))) if self.diffs else None

    @property
    def std(self) -> float | None:
        return float(np.std(list(self.diffs.values()), ddof=1)) if self.n > 1 else None

    @property
    def verdict(self) -> str:
        if not self.n:
            return "no data: " + self.no_data
        seeds = f"{self.holds_in}/{self.n} seed{'s' if self.n > 1 else ''}"
        if self.holds_in == self.n:
            return f"holds ({seeds})"
        return f"does not hold ({seeds})" if self.holds_in == 0 else f"mixed ({seeds})"


def check(findings: list[PaperFinding], rows, name: Callable[[str], str]) -> list[Check]:
    """Each finding against our rows (objects with .method, .label and .per_seed: steps -> {seed: value});
    one check per (our shortcut row, our row of the other method) pair, or one saying what is missing."""
    ours = {}
    for r in rows:
        if r.per_seed:
            ours.setdefault(r.method, []).append(r)
    out = []
    for f in findings:
        pairs = [(s, o) for s in ours.get(REFERENCE, []) for o in ours.get(f.method, [])]
        if not pairs:
            missing = [m for m in (REFERENCE, f.method) if m not in ours]
            out.append(Check(f, "", {}, "no run of " + " and ".join(name(m) for m in missing)))
            continue
        for s, o in pairs:
            a, b = s.per_seed.get(f.num_steps, {}), o.per_seed.get(f.num_steps, {})
            diffs = {seed: b[seed] - a[seed] for seed in sorted(set(a) & set(b))}
            why = "" if diffs else (f"no {f.num_steps}-step value of " + " and ".join(
                r.label for r, v in ((s, a), (o, b)) if not v) if not (a and b) else "no seed has both values")
            out.append(Check(f, o.label if len(pairs) == 1 else f"{o.label} vs {s.label}", diffs, why))
    return out


def statement(f: PaperFinding, name: Callable[[str], str]) -> str:
    better, worse = (REFERENCE, f.method) if f.sign > 0 else (f.method, REFERENCE)
    return f"{name(better)} beat{'' if better == REFERENCE else 's'} {name(worse)} at {f.num_steps} " \
           f"step{'s' if f.num_steps > 1 else ''}"


def to_frame(checks: list[Check], name: Callable[[str], str]) -> pd.DataFrame:
    return pd.DataFrame([{
        "finding": statement(c.finding, name), "method": c.finding.method, "num_steps": c.finding.num_steps,
        "paper_shortcut": c.finding.shortcut, "paper_other": c.finding.other, "paper_sign": c.finding.sign,
        "ours": c.ours, "ours_mean_diff": c.mean, "ours_std_diff": c.std, "ours_n": c.n, "holds_in": c.holds_in,
        "seeds": ",".join(map(str, c.diffs)), **{f"diff_seed_{s}": d for s, d in c.diffs.items()},
        "verdict": c.verdict} for c in checks])


def to_markdown(checks: list[Check], dataset: str, ours_tag: str, name: Callable[[str], str],
                notes: tuple[str, ...] = ()) -> str:
    findings = {c.finding for c in checks}
    lines = [f"## {dataset}: the paper's findings (Table 1, CelebA-HQ, FID-50k), checked on ours ({ours_tag})", "",
             f"| # | Paper's finding | Paper: shortcut vs other | Ours: other - shortcut ({ours_tag}) | "
             "Holds in | Verdict |", "| ---: | --- | ---: | ---: | ---: | --- |"]
    for i, c in enumerate(checks, 1):
        f = c.finding
        diff = "-" if c.mean is None else f"{c.mean:+.2f}" + ("" if c.std is None else f" ± {c.std:.2f}")
        what = statement(f, name) + (f" [{c.ours}]" if c.ours and c.ours != name(f.method) else "")
        lines.append(f"| {i} | {what} | {f.shortcut:.1f} vs {f.other:.1f} | {diff} | "
                     f"{f'{c.holds_in}/{c.n}' if c.n else '-'} | {c.verdict} |")
    counts = {"hold in every seed": sum(c.n > 0 and c.holds_in == c.n for c in checks),
              "are mixed": sum(0 < c.holds_in < c.n for c in checks),
              "hold in no seed": sum(c.n > 0 and c.holds_in == 0 for c in checks),
              "have no data": sum(c.n == 0 for c in checks)}
    lines += ["", f"- Of the paper's {len(findings)} findings ({len(checks)} checks): "
              + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".",
              "- A finding is shortcut vs another method at a step count where the paper prints neither cell in "
              "parentheses. Lower is better; our difference is other - shortcut per seed (positive: shortcut "
              "better), mean ± std (n-1) over the seeds with both values; it holds in a seed when its sign is "
              "the paper's."]
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
        return f"Budget: every run trained {steps} steps at batch {batch} with {arch} (students' teachers not counted)."
    parts = [f"{steps} steps, batch {batch}, {arch}: {', '.join(sorted(set(names)))}"
             for (steps, batch, arch), names in budgets.items()]
    return "Budgets differ between runs, so differences may come from the budget: " + "; ".join(parts) + "."
