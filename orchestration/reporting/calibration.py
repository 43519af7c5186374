"""How often the findings' verdicts are wrong, measured on simulated tables whose truth is known.

A simulated table has what a real one has: a data distribution, one finite reference drawn from it and shared
by every cell, two "methods" with a few training seeds each (a seed moves a method's distribution), a finite
set of samples per cell, the noise floor measured from real draws, and the same code from sample statistics on:
the Frechet distance of the run's evaluation (its "eigh" form), the reference resampling
(reference_bootstrap) and the interval and verdict of findings.py. Only the feature network is left out: the
"features" are Gaussian, so each cell's sample mean and covariance are drawn exactly (normal and Wishart, by
Bartlett's decomposition) instead of from `samples` vectors.

Scenarios (the truth is exact, by construction):
  identical            both methods the same imperfect distribution (variances scaled by `quality`): 0
  equal, different     equally good, imperfect in different dimensions (even vs odd ones of pairs with equal
                       variance, so a swap of the pairs maps one onto the other): 0
  shifted by k         the second method's mean moved by a: |a|^2, set to k x the cell std (the spread of one
                       cell over seeds and samples, measured by a pilot)
  both at the floor    both methods the data distribution itself: 0

Rules: "calibrated" (findings.py: seeds + reference variance, floor only for "both at the floor"), "seeds
only" (the same interval without the reference variance) and "floor rule" (the rule before: t over seeds,
and not resolved whenever |mean| <= the floor). Run `python -m orchestration.reporting.calibration` for the
table of docs/comparisons.md; tests/test_calibration.py asserts the error rates at a small dimension.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
from threadpoolctl import threadpool_limits

from orchestration.reporting import findings
from shortcut.evaluation import reference_bootstrap

RULES = ("calibrated", "seeds only", "floor rule")
FINDING = findings.PaperFinding("other", 1, 1.0, 2.0)  # "shortcut beats other": sign +1


@dataclasses.dataclass(frozen=True)
class World:
    """The simulated setting; the defaults are the digits table's sizes."""
    dim: int = 16
    samples: int = 2000  # per cell (eval.num_samples)
    reference: int = 359  # held-out digits
    seeds: int = 3
    draws: int = reference_bootstrap.DRAWS
    floor_draws: int = 10  # as evaluation/noise_floor.py
    quality: float = 0.75  # variance scale of an imperfect method (1: perfect)
    seed_shift: float = 0.02  # std of a seed's mean offset, per unit of the data's std in each dimension

    @property
    def variances(self) -> np.ndarray:
        """The data's per-dimension variances: a decaying spectrum in equal pairs, total `dim`."""
        pairs = 1.0 / (1.0 + np.arange(self.dim // 2))
        lam = np.repeat(pairs, 2)
        return lam * self.dim / lam.sum()


def _cell_moments(rng, mean: np.ndarray, scale: np.ndarray, count: int):
    """Sample mean and unbiased covariance of `count` draws of N(mean, diag(scale)) [batch, D], exactly in
    distribution: mean + N(0, scale / count), and Wishart by Bartlett's decomposition."""
    batch, d = mean.shape
    m = mean + rng.standard_normal((batch, d)) * np.sqrt(scale / count)
    a = np.tril(rng.standard_normal((batch, d, d)), -1)
    a[:, np.arange(d), np.arange(d)] = np.sqrt(rng.chisquare(count - 1 - np.arange(d), size=(batch, d)))
    root = np.sqrt(scale)[:, :, None] * a
    return m, root @ np.swapaxes(root, 1, 2) / (count - 1)


def _method(world: World, scenario: str, which: int, k_shift: float, cell_std: float):
    """(mean offset [D], variance scale [D]) of method `which` (0 or 1) in a scenario."""
    d, lam = world.dim, world.variances
    mean, scale = np.zeros(d), np.full(d, world.quality)
    if scenario == "equal, different":
        scale = np.where(np.arange(d) % 2 == which, world.quality, 1.0)
    elif scenario == "both at the floor":
        scale = np.ones(d)
    elif scenario == "shifted" and which == 1:
        mean = np.full(d, np.sqrt(k_shift * cell_std / d))
    return mean, scale * lam


def truth(world: World, scenario: str, k_shift: float, cell_std: float) -> float:
    """The exact expected difference (method 1 - method 0) of the scenario (module docstring)."""
    if scenario != "shifted":
        return 0.0
    a, _ = _method(world, scenario, 1, k_shift, cell_std)
    return float(a @ a)


def simulate_tables(world: World, scenario: str, tables: int, seed: int = 0, k_shift: float = 0.0,
                    cell_std: float = 1.0, bootstrap: bool = True) -> list[dict]:
    """`tables` simulated tables: per table each method's per-seed values, floor and, with `bootstrap`, each
    cell's values against the reference draws."""
    with threadpool_limits(1, "blas"):  # many small matrices: threads only contend (1000x slower on a busy CPU)
        return _simulate(world, scenario, tables, seed, k_shift, cell_std, bootstrap)


def _simulate(world: World, scenario: str, tables: int, seed: int, k_shift: float, cell_std: float,
              bootstrap: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    lam, d, s, f = world.variances, world.dim, world.seeds, world.floor_draws
    methods = [_method(world, scenario, which, k_shift, cell_std) for which in (0, 1)]
    out = []
    for t in range(tables):
        x = rng.standard_normal((world.reference, d)) * np.sqrt(lam)
        mu_ref, cov_ref = x.mean(axis=0), np.cov(x, rowvar=False)
        # the floor's real draws, then each method's seeds: one batch of cells
        means = [np.zeros((f, d))] + [o + rng.standard_normal((s, d)) * world.seed_shift * np.sqrt(lam)
                                      for o, _ in methods]
        scales = [np.tile(lam, (f, 1))] + [np.tile(sc, (s, 1)) for _, sc in methods]
        m, c = _cell_moments(rng, np.concatenate(means), np.concatenate(scales), world.samples)
        # the evaluation's Frechet distance ("eigh": the same trace as sqrtm's, to rounding; the distance is
        # symmetric, so all cells against the one reference is one batched call)
        values = reference_bootstrap.distances(mu_ref, cov_ref, m, c)
        resampled = reference_bootstrap.resample(x, world.draws, seed=t) if bootstrap else None
        table = {"floor": float(np.mean(values[:f])), "floor_std": float(np.std(values[:f], ddof=1))}
        for which in (0, 1):
            idx = f + which * s + np.arange(s)
            table[which] = {"values": {k: float(values[i]) for k, i in enumerate(idx)},
                            "draws": {k: reference_bootstrap.distances(m[i], c[i], *resampled)
                                      for k, i in enumerate(idx)} if bootstrap else {}}
        out.append(table)
    return out


def floor_rule(diffs: list[float], floor: float) -> tuple[str, tuple | None]:
    """The rule before this calibration: t over seeds, not resolved whenever |mean| <= the floor."""
    ci = findings.interval(diffs)
    if ci is None:
        return "no interval", None
    mean, low, high, _ = ci
    if low <= 0 <= high or abs(mean) <= floor:
        return "not resolved", ci
    return ("holds" if mean > 0 else "reversed"), ci


def judge(table: dict, rule: str) -> tuple[str, tuple | None]:
    """(verdict, interval) of a simulated table's finding "method 0 beats method 1" under a rule."""
    side = {w: findings.Side(table[w]["values"], {}, {}, {}, table["floor"], table["floor_std"],
                             table[w]["draws"] if rule == "calibrated" else {}, None) for w in (0, 1)}
    if rule == "floor rule":
        diffs = [table[1]["values"][k] - table[0]["values"][k] for k in sorted(table[0]["values"])]
        return floor_rule(diffs, table["floor"])
    check = findings._pair(FINDING, side[0], side[1], "", "")
    if rule == "seeds only":
        check.both_at_floor = False
    return check.verdict, check.interval


def cell_std(world: World, tables: int = 200, seed: int = 12345) -> float:
    """The spread of one cell over seeds and samples (the table's "±"), pooled over simulated tables."""
    sims = simulate_tables(world, "identical", tables, seed=seed, bootstrap=False)
    return float(np.sqrt(np.mean([np.var(list(t[0]["values"].values()), ddof=1) for t in sims])))


@dataclasses.dataclass
class Rates:
    scenario: str
    rule: str
    truth: float
    tables: int
    wrong: float  # resolved with the wrong sign, or resolved at all when the truth is 0
    right: float  # resolved with the right sign (the truth is not 0)
    covered: float | None  # the interval contains the truth (None: the rule gives no interval)
    at_floor: float  # "both at the floor"

    @property
    def mc_error(self) -> float:
        """Monte-Carlo standard error of a rate near 5 % over these tables."""
        return float(np.sqrt(0.05 * 0.95 / self.tables))


def rates(world: World, scenario: str, tables: int, seed: int = 0, k_shift: float = 0.0,
          std: float | None = None) -> dict[str, Rates]:
    """Each rule's error rates on the same `tables` simulated tables of a scenario."""
    std = cell_std(world) if std is None else std
    delta = truth(world, scenario, k_shift, std)
    sims = simulate_tables(world, scenario, tables, seed=seed, k_shift=k_shift, cell_std=std)
    out = {}
    for rule in RULES:
        verdicts, covered = [], []
        for t in sims:
            v, ci = judge(t, rule)
            verdicts.append(v)
            covered.append(None if ci is None else ci[1] <= delta <= ci[2])
        resolved_sign = [+1 if v == "holds" else -1 if v == "reversed" else 0 for v in verdicts]
        true_sign = int(np.sign(delta))
        out[rule] = Rates(scenario if scenario != "shifted" else f"shifted by {k_shift:g} cell stds", rule, delta,
                          tables, wrong=float(np.mean([r != 0 and r != true_sign for r in resolved_sign])),
                          right=float(np.mean([r == true_sign for r in resolved_sign])) if true_sign else 0.0,
                          covered=None if None in covered else float(np.mean(covered)),
                          at_floor=float(np.mean([v == findings.BOTH_AT_FLOOR for v in verdicts])))
    return out


def report(world: World, tables: int, shifts: tuple[float, ...] = (2.0, 4.0, 6.0), seed: int = 0) -> str:
    """The Markdown table of docs/comparisons.md: every scenario under every rule."""
    std = cell_std(world)
    lines = [f"Simulated tables: {tables} per scenario; {world.dim}-d Gaussian features, {world.samples} samples "
             f"per cell, a reference of {world.reference}, {world.seeds} seeds, {world.draws} reference draws; "
             f"cell std {std:.3f}; Monte-Carlo std error of a 5 % rate {np.sqrt(0.05 * 0.95 / tables):.3f}, "
             f"of a 95 % coverage the same.", "",
             "| scenario | true difference | rule | wrong verdict | right verdict | interval covers the truth | "
             "both at the floor |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    cases = [("identical", 0.0), ("equal, different", 0.0), *(("shifted", k) for k in shifts),
             ("both at the floor", 0.0)]
    for i, (scenario, k) in enumerate(cases):
        for r in rates(world, scenario, tables, seed=seed + 1000 * i, k_shift=k, std=std).values():
            lines.append(f"| {r.scenario} | {r.truth:.3f} | {r.rule} | {r.wrong:.3f} | "
                         f"{'-' if not r.truth else f'{r.right:.3f}'} | "
                         f"{'-' if r.covered is None else f'{r.covered:.3f}'} | {r.at_floor:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Error rates of the findings' verdicts on simulated tables.")
    p.add_argument("--dim", type=int, default=World.dim, help="feature dimensions (64 for fd_digits' own)")
    p.add_argument("--tables", type=int, default=500, help="simulated tables per scenario")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sys.stdout.write(report(World(dim=args.dim), args.tables, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
