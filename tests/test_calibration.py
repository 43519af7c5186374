"""The findings' verdicts are right at the rate they claim: simulated tables with a known truth, through the
real interval and verdict code (orchestration/reporting/calibration.py). 8-d features keep it to seconds; the
64-d table of docs/comparisons.md comes from `python -m orchestration.reporting.calibration --dim 64`."""

from __future__ import annotations

import numpy as np
import pytest

from orchestration.reporting import calibration

TABLES = 500
WORLD = calibration.World(dim=8)
SE = np.sqrt(0.05 * 0.95 / TABLES)  # Monte-Carlo std error of a 5 % rate (and of a 95 % coverage)
POWER_AT = 8.0  # cell stds: the stated size of a true difference (power at 4 and 6: docs/comparisons.md)


@pytest.fixture(scope="module")
def measured():
    std = calibration.cell_std(WORLD)
    cases = {"identical": ("identical", 0.0, TABLES), "equal, different": ("equal, different", 0.0, TABLES),
             "shifted": ("shifted", POWER_AT, TABLES), "both at the floor": ("both at the floor", 0.0, 200)}
    return {name: calibration.rates(WORLD, scenario, tables, seed=1000 * i, k_shift=k, std=std)
            for i, (name, (scenario, k, tables)) in enumerate(cases.items())}


def test_two_methods_without_a_difference_get_a_wrong_verdict_at_most_5_percent(measured):
    for scenario in ("identical", "equal, different"):
        r = measured[scenario]["calibrated"]
        assert r.truth == 0 and r.wrong <= 0.05 + 2 * SE, (scenario, r)
        assert 0.93 - 2 * SE <= r.covered <= 0.97 + 2 * SE, (scenario, r)


def test_a_true_difference_is_resolved_in_its_direction_and_covered(measured):
    r = measured["shifted"]["calibrated"]
    assert r.truth > 0 and r.wrong == 0.0 and r.right >= 0.80, r
    assert 0.93 - 2 * SE <= r.covered <= 0.97 + 2 * SE, r


def test_the_earlier_rules_fail_where_the_simulation_says(measured):
    # over seeds only, the shared reference is missing: equally good methods with different errors are
    # told apart far more often than 5 %, and the interval covers the truth far less than 95 %
    seeds_only = measured["equal, different"]["seeds only"]
    assert seeds_only.wrong > 0.15 and seeds_only.covered < 0.85, seeds_only
    assert measured["shifted"]["seeds only"].covered < 0.88
    # (what the floor as a threshold costs depends on the floor's size against a cell's spread: 4 cell stds here,
    # about 8 on the digits table; the 64-d table of docs/comparisons.md shows it)


def test_two_methods_that_match_real_data_are_both_at_the_floor(measured):
    r = measured["both at the floor"]["calibrated"]
    assert r.at_floor >= 0.9 and r.wrong <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 200), r


def test_the_simulated_cells_have_the_moments_they_are_drawn_with():
    # the Wishart draw (Bartlett) against explicit samples: the same mean of the sample covariance
    rng = np.random.default_rng(0)
    scale = np.array([[2.0, 1.0, 0.5]])
    _, covs = calibration._cell_moments(rng, np.zeros((4000, 3)), np.repeat(scale, 4000, axis=0), 50)
    assert np.diagonal(covs.mean(axis=0)) == pytest.approx(scale[0], rel=0.02)
    assert np.abs(covs.mean(axis=0) - np.diag(scale[0])).max() < 0.03
    assert np.var(covs[:, 0, 0]) == pytest.approx(2 * 2.0 ** 2 / 49, rel=0.1)  # Wishart: 2 sigma^4 / (n - 1)
