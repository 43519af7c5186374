"""The paper's pairwise findings (orchestration/findings.py): read off its CelebA-HQ column, checked per
seed on synthetic digits runs whose differences are computed by hand below."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from orchestration import findings, make_tables
from orchestration.results import export_tree, load_paper
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


def test_findings_are_checked_per_seed(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper", root / "paper")
    work = tmp_path / "runs"
    shortcut = {0: {128: 1.0, 4: 2.0, 1: 4.0}, 1: {128: 2.0, 4: 3.0, 1: 6.0}, 2: {128: 3.0, 4: 4.0}}
    live = {0: {128: 0.5, 4: 5.0, 1: 1.0}, 1: {128: 2.5, 4: 6.0, 1: 2.0}, 2: {128: 2.0, 4: 7.0, 1: 3.0}}
    for seed in (0, 1, 2):
        make_record(work, make_spec("digits_shortcut", "shortcut", "digits", seed=seed), shortcut[seed], grids=False)
        make_record(work, make_spec("digits_live_reflow", "live_reflow", "digits", seed=seed), live[seed], grids=False)
    make_record(work, make_spec("digits_reflow", "reflow", "digits"), {128: 1.5, 4: 1.0}, grids=False)
    assert len(export_tree(work, root)) == 7
    assert make_tables.main(["--results-dir", str(root)]) == 0

    table = pd.read_csv(root / "tables" / "table1_digits_fd_digits_findings.csv")
    assert len(table) == 15
    rows = {(r.method, r.num_steps): r for r in table.itertuples()}
    # live reflow beats shortcut at 128 steps in the paper; ours: 0.5-1, 2.5-2, 2-3 = -0.5, +0.5, -1.0
    lr128 = rows[("live_reflow", 128)]
    assert lr128.ours_mean_diff == pytest.approx(-1 / 3) and lr128.ours_std_diff == pytest.approx(0.7637626)
    assert (lr128.holds_in, lr128.ours_n, lr128.verdict) == (2, 3, "mixed (2/3 seeds)")
    assert (lr128.diff_seed_0, lr128.diff_seed_1, lr128.diff_seed_2) == pytest.approx((-0.5, 0.5, -1.0))
    lr4 = rows[("live_reflow", 4)]  # shortcut beats live reflow at 4 steps: +3 in every seed
    assert (lr4.ours_mean_diff, lr4.ours_std_diff, lr4.verdict) == (3.0, 0.0, "holds (3/3 seeds)")
    lr1 = rows[("live_reflow", 1)]  # only seeds 0 and 1 have shortcut's 1-step value: -3, -4
    assert (lr1.ours_mean_diff, lr1.seeds, lr1.verdict) == (-3.5, "0,1", "does not hold (0/2 seeds)")
    assert rows[("reflow", 128)].verdict == "holds (1/1 seed)" and pd.isna(rows[("reflow", 128)].ours_std_diff)
    assert rows[("reflow", 4)].ours_mean_diff == -1.0 and rows[("reflow", 4)].verdict == "does not hold (0/1 seed)"
    assert rows[("reflow", 1)].verdict == "no data: no 1-step value of Reflow"
    assert rows[("consistency_training", 4)].verdict == "no data: no run of Consistency Training"

    md = (root / "tables" / "table1_digits_fd_digits_findings.md").read_text()
    row = "| Live Reflow beats Shortcut Models at 128 steps | 6.9 vs 6.3 | -0.33 ± 0.76 | 2/3 | mixed (2/3 seeds) |"
    assert row in md
    assert "15 findings (15 checks): 2 hold in every seed, 1 are mixed, 2 hold in no seed, 10 have no data" in md
    assert "every run trained 100 steps at batch 16 with DiT-tiny/2" in md
    assert "the paper's findings" in (root / "tables" / "index.md").read_text()
