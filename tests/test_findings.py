"""The paper's pairwise findings (orchestration/reporting/findings.py): read off its CelebA-HQ column, checked per
seed on synthetic digits runs whose differences are computed by hand below."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestration import make_tables
from orchestration.reporting import findings, tables
from orchestration.reporting.results import export_tree, load_paper
from tracking_fixtures import make_record, make_spec

REPO = Path(__file__).resolve().parents[1]


def test_the_paper_column_gives_15_findings():
    got = {(f.method, f.num_steps): f.sign for f in findings.paper_findings(load_paper(REPO / "results"))}
    # every cell of shortcut vs the others, minus the parenthesised ones (PD 128/4, diffusion 4/1, flow 4/1)
    expected = {("diffusion", 128): 1, ("flow_matching", 128): 1, ("progressive_distillation", 1): -1,
                ("live_reflow", 128): -1, ("live_reflow", 4): 1, ("live_reflow", 1): 1}
    for m in ("consistency_training", "consistency_distillation", "reflow"):
        expected.update({(m, n): 1 for n in (128, 4, 1)})
    assert got == expected and len(got) == 15


def test_verdicts_with_intervals_floors_compute_and_matched_compute(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper", root / "paper")
    work = tmp_path / "runs"
    floor = 0.3
    shortcut = {0: {128: 1.0, 4: 2.0, 1: 4.0}, 1: {128: 2.0, 4: 3.0, 1: 6.0}, 2: {128: 3.0, 4: 4.0}}
    live = {0: {128: 0.5, 4: 5.0, 1: 1.0}, 1: {128: 2.5, 4: 6.2, 1: 2.0}, 2: {128: 2.0, 4: 6.8, 1: 3.0}}
    # curves at 4 steps: shortcut reaches its final value at 1e12 FLOPs, live reflow spends twice the compute
    for seed in (0, 1, 2):
        make_record(work, make_spec("digits_shortcut", "shortcut", "digits", seed=seed), shortcut[seed], grids=False,
                    floor=floor, compute=1e12, curve={4: [(1e11, 50.0), (1e12, shortcut[seed][4])]})
        make_record(work, make_spec("digits_live_reflow", "live_reflow", "digits", seed=seed), live[seed],
                    grids=False, floor=floor, compute=2e12,
                    curve={4: [(1e11, 60.0), (1e12, live[seed][4] + 10), (2e12, live[seed][4])]})
    make_record(work, make_spec("digits_reflow", "reflow", "digits"), {128: 1.5, 4: 1.0}, grids=False, floor=floor,
                spreads={128: 0.1, 4: 0.2})
    assert len(export_tree(work, root)) == 7
    assert make_tables.main(["--results-dir", str(root)]) == 0

    table = pd.read_csv(root / "tables" / "table1_digits_fd_digits_findings.csv")
    assert len(table) == 15
    rows = {(r.method, r.num_steps): r for r in table.itertuples()}
    # live reflow beats shortcut at 128 steps in the paper; ours: 0.5-1, 2.5-2, 2-3 = -0.5, +0.5, -1.0:
    # mean -1/3, std 0.7637626, 95 % t interval with 2 dof: -1/3 +- 4.302653 x 0.7637626 / sqrt(3) -> contains 0
    lr128 = rows[("live_reflow", 128)]
    assert lr128.ours_mean_diff == pytest.approx(-1 / 3) and lr128.ours_std_diff == pytest.approx(0.7637626)
    assert (lr128.ci_low, lr128.ci_high) == pytest.approx((-1 / 3 - 1.8973, -1 / 3 + 1.8973), abs=1e-4)
    assert lr128.verdict == "not resolved" and lr128.noise_floor == floor
    # these records keep no feature statistics: no reference variance, so the interval is over seeds only
    assert pd.isna(lr128.reference_std) and lr128.ci_method == "t(2.0) over 3 seeds"
    # n seeds resolve it once t(n) x 0.7638 / sqrt(n) < 1/3, i.e.
    # t(n) / sqrt(n) < 0.4364: n = 22 gives 2.0796 / 4.690 = 0.4434, n = 23 gives 2.0739 / 4.796 = 0.4324
    assert lr128.seeds_to_resolve == 23
    assert (lr128.diff_seed_0, lr128.diff_seed_1, lr128.diff_seed_2) == pytest.approx((-0.5, 0.5, -1.0))
    # shortcut beats live reflow at 4 steps: +3.0, +3.2, +2.8: interval 3 +- 4.302653 x 0.2 / sqrt(3) = [2.503, 3.497]
    lr4 = rows[("live_reflow", 4)]
    assert (lr4.ci_low, lr4.ci_high) == pytest.approx((2.50318, 3.49682), abs=1e-4)
    assert lr4.verdict == "holds" and lr4.compute_ratio == pytest.approx(2.0) and lr4.compute_differs
    # matched compute: both curves read at 1e12 FLOPs: live reflow's point there is its final value + 10
    assert lr4.matched_mean_diff == pytest.approx(13.0) and lr4.matched_verdict == "holds"
    assert rows[("live_reflow", 128)].matched_verdict.startswith("n/a")
    # paper: shortcut beats live reflow at 1 step; ours -3, -4 (seeds 0, 1): t interval [-9.85, 2.85] contains 0
    lr1 = rows[("live_reflow", 1)]
    assert (lr1.ours_mean_diff, lr1.seeds, lr1.verdict) == (-3.5, "0,1", "not resolved")
    # one seed: the interval is +- 1.96 x the two values' bootstrap stds (only reflow has them: no interval)
    assert rows[("reflow", 128)].verdict == "no interval" and pd.isna(rows[("reflow", 128)].ours_std_diff)
    assert rows[("reflow", 1)].verdict == "no data: no 1-step value of Reflow"
    assert rows[("consistency_training", 4)].verdict == "no data: no run of Consistency Training"

    md = (root / "tables" / "table1_digits_fd_digits_findings.md").read_text()
    # seeds' std of the mean: 0.2 / sqrt(3) = 0.115; no reference part
    assert "| Shortcut Models beat Live Reflow at 4 steps | 13.8 vs 27.2 | +3.00 [+2.50, +3.50] | 0.12 / - | holds | - | " \
           "2.00 (differs) | holds: +13.00 [+12.50, +13.50] |" in md
    # every check counted once: reflow's two one-seed checks have no interval (shortcut has no bootstrap spreads)
    assert "15 findings (15 checks): 1 hold, 0 are reversed, 2 are not resolved (0 of them with both cells at the " \
           "floor), 2 have no interval, 10 have no data" in md
    assert "every run trained 100 steps at batch 16 with DiT-tiny/2" in md
    assert "the paper's findings" in (root / "tables" / "index.md").read_text()

    # the table: compute column relative to flow (no flow row here: no column), floor line, marks
    t = (root / "tables" / "table1_digits_fd_digits.md").read_text()
    assert "Noise floor of fd_digits (real images against the same reference): 0.30 ± 0.10 at 2,000 samples" in t
    # live reflow's 4-step curve moved 10 when its compute doubled (> floor): still moving; 128 steps: no curve
    assert "| Live Reflow (3 seeds) | DiT-tiny/2 | 1.67 ± 1.04 | 6.00 ± 0.92 ↘ | 2.00 ± 1.00 |" in t


def test_one_seed_uses_the_bootstrap_interval():
    f = findings.PaperFinding("reflow", 4, 5.0, 6.0)  # shortcut better in the paper
    a = findings.Side({0: 2.0}, {0: 0.3}, {0: 1.0}, {}, 0.5)
    b = findings.Side({0: 4.0}, {0: 0.4}, {0: 1.05}, {}, 0.5)
    c = findings._pair(f, a, b, "Reflow", "")
    mean, low, high, how = c.interval
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 1.959964 * 0.5, 2.0 + 1.959964 * 0.5))
    assert how.startswith("bootstrap") and c.verdict == "holds" and not c.compute_differs
    # a difference smaller than the floor is still resolved: the floor is a bias, not the noise of a difference
    c = findings._pair(f, a, findings.Side({0: 4.0}, {0: 0.01}, {0: 1.0}, {}, 2.5, floor_std=0.1), "Reflow", "")
    assert c.verdict == "holds"
    # ... unless both cells are at the floor (within 2 floor stds of it): 2.0 and 2.6 against 2.5 +- 0.1 x 2
    a_low = findings.Side({0: 2.6}, {0: 0.01}, {0: 1.0}, {}, 2.5, floor_std=0.1)
    b_low = findings.Side({0: 2.0}, {0: 0.01}, {0: 1.0}, {}, 2.5, floor_std=0.1)
    c = findings._pair(f, a_low, b_low, "Reflow", "")
    assert a_low.at_floor and b_low.at_floor and c.verdict == findings.BOTH_AT_FLOOR
    assert not findings.at_floor(2.71, 2.5, 0.1) and findings.at_floor(2.69, 2.5, 0.1)


def test_the_reference_variance_widens_the_interval_by_satterthwaite():
    f = findings.PaperFinding("reflow", 4, 5.0, 6.0)
    rng = np.random.default_rng(0)
    shared = rng.normal(size=200)  # every cell moves with the reference draw ...
    own = {k: rng.normal(size=200) for k in range(6)}  # ... and each by its own amount
    s = findings.Side({0: 1.0, 1: 1.5, 2: 2.0}, {}, {}, {}, None,
                      ref_draws={k: 1.0 + shared + 0.5 * own[k] for k in range(3)}, ref_count=359)
    o = findings.Side({0: 2.0, 1: 3.5, 2: 3.0}, {}, {}, {}, None,
                      ref_draws={k: 2.0 + shared + 0.5 * own[k + 3] for k in range(3)}, ref_count=359)
    c = findings._pair(f, s, o, "Reflow", "")
    # the shared part cancels in the difference; what is left is the seed-mean of the own parts
    mean_draws = np.mean([0.5 * own[k + 3] - 0.5 * own[k] for k in range(3)], axis=0)
    assert c.ref_var == pytest.approx(np.var(mean_draws, ddof=1)) and c.ref_draws == 200
    # diffs 1, 2, 1: mean 4/3, var 1/3; s^2/n = 1/9; Welch-Satterthwaite df from (1/9, 2 df) and (v_ref, 199 df)
    seed_part, v = 1 / 9, c.ref_var
    df = (seed_part + v) ** 2 / (seed_part ** 2 / 2 + v ** 2 / 199)
    half = stats.t.ppf(0.975, df) * np.sqrt(seed_part + v)
    mean, low, high, how = c.interval
    assert (mean, low, high) == pytest.approx((4 / 3, 4 / 3 - half, 4 / 3 + half))
    assert how == f"t({df:.1f}) over 3 seeds + reference (200 draws)"
    # a reference variance that alone covers the mean: no number of seeds resolves it
    assert findings.seeds_to_resolve([1.0, 2.0, 1.0], ref_var=(4 / 3 / 1.9) ** 2, draws=200) is None
    assert findings.seeds_to_resolve([1.0, 2.0, 1.0], ref_var=(4 / 3 / 2.0) ** 2, draws=200) is not None
    # the reference size at which 1.96 sqrt(v_ref) = |mean| (v_ref ~ 1 / size): 359 x 1.96^2 v / mean^2
    assert findings.reference_needed(1.0, 0.5, 359) == int(np.ceil(359 * 1.959964 ** 2 * 0.5))


def test_counts_add_up_to_the_checks():
    f = findings.PaperFinding("reflow", 4, 5.0, 6.0)
    side = lambda v, spread=None: findings.Side(v, {k: spread for k in v}, {}, {}, 1.0, floor_std=0.1)
    checks = [findings._pair(f, side({0: 1.0, 1: 1.1}), side({0: 3.0, 1: 3.1}), "x", ""),  # holds
              findings._pair(f, side({0: 3.0, 1: 3.1}), side({0: 1.5, 1: 1.7}), "x", ""),  # reversed
              findings._pair(f, side({0: 1.0, 1: 1.1}), side({0: 1.05, 1: 1.0}), "x", ""),  # both at the floor
              findings._pair(f, side({0: 2.0, 1: 3.0}), side({0: 3.0, 1: 2.0}), "x", ""),  # contains zero
              findings._pair(f, side({0: 2.0}), side({0: 3.0}), "x", ""),  # one seed, no spreads
              findings.Check(f, "", {}, "no run of X")]
    assert [c.verdict for c in checks] == ["holds", "reversed", findings.BOTH_AT_FLOOR, "not resolved",
                                           "no interval", "no data: no run of X"]
    k = findings.counts(checks)
    assert k == {"holds": 1, "reversed": 1, "not resolved": 2, "no interval": 1, "no data": 1, "at the floor": 1}
    assert sum(k[v] for v in findings.VERDICTS) + k["no data"] == len(checks)


def test_hand_computed_intervals_and_seed_counts():
    # diffs 1, 3: mean 2, std sqrt(2); t(0.975, n-1) sqrt(2) / sqrt(n) < 2 first at n = 5 (2.776 x 0.632 = 1.756)
    assert findings.seeds_to_resolve([1.0, 3.0]) == 5
    mean, low, high, _ = findings.interval([1.0, 2.0, 3.0])
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 2.484138, 2.0 + 2.484138), abs=1e-5)
    assert findings.verdict(+1, (2.0, 0.5, 3.5, "")) == "holds"
    assert findings.verdict(-1, (2.0, 0.5, 3.5, "")) == "reversed"
    assert findings.verdict(+1, (0.8, -0.5, 1.1, "")) == "not resolved"
    assert findings.verdict(+1, (0.8, 0.5, 1.1, ""), both_at_floor=True) == findings.BOTH_AT_FLOOR
    # curves read linearly in log compute: halfway between 1e9 and 1e11 is 1e10
    assert findings.read_curve([(1e9, 10.0, None), (1e11, 2.0, None)], 1e10) == (pytest.approx(6.0), None)
    assert findings.read_curve([(1e9, 10.0, None), (1e11, 2.0, None)], 1e12) is None


def test_a_cell_is_converged_when_doubling_the_compute_moves_it_less_than_the_floor():
    # points every 500 steps of 1e9 FLOPs: adjacent points differ by 0.5 or less, the last doubling by 1.5
    curve = [(500 * k * 1e9, v, None) for k, v in zip(range(1, 9), [40.0, 12.0, 7.0, 5.5, 5.0, 4.6, 4.3, 4.0])]
    row = tables.Row("shortcut", "DiT-tiny/2", "Shortcut Models", {}, {}, curves={1: {0: curve, 1: curve}},
                          floors={1: 1.0})
    assert row.converged(1) is False  # 5.5 at half the compute, 4.0 at the end: 1.5 > 1.0
    row.floors[1] = 2.0
    assert row.converged(1) is True
    assert tables.Row("flow_matching", "x", "x", {}, {}, curves={1: {0: curve[:1]}}, floors={1: 1.0}).converged(1) is None
