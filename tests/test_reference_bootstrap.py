"""Resampling the reference (shortcut/evaluation/reference_bootstrap.py) against explicit resamples and the
evaluation's own Frechet distance."""

from __future__ import annotations

import numpy as np
import pytest

from shortcut.evaluation import reference_bootstrap
from shortcut.evaluation.frechet import frechet_distance


def test_a_draw_is_the_moments_of_an_explicit_resample_and_draws_repeat_by_seed():
    x = np.random.default_rng(0).normal(size=(50, 4)) * [1.0, 2.0, 0.5, 3.0] + 10.0  # far from the origin
    means, covs = reference_bootstrap.resample(x, draws=5, seed=3)
    counts = np.random.default_rng(3).multinomial(50, np.full(50, 1 / 50), size=5)
    for b in range(5):
        rows = x[np.repeat(np.arange(50), counts[b])]
        assert means[b] == pytest.approx(rows.mean(axis=0), abs=1e-12)
        assert covs[b] == pytest.approx(np.cov(rows, rowvar=False), abs=1e-10)
    again = reference_bootstrap.resample(x, draws=5, seed=3)
    assert np.array_equal(again[0], means) and np.array_equal(again[1], covs)


def test_distances_are_the_frechet_distance_to_each_draw():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(80, 6)), rng.normal(size=(300, 6)) * 1.3 + 0.2
    means, covs = reference_bootstrap.resample(x, draws=7)
    got = reference_bootstrap.distances(y.mean(axis=0), np.cov(y, rowvar=False), means, covs)
    expected = [frechet_distance(y.mean(axis=0), np.cov(y, rowvar=False), means[b], covs[b]) for b in range(7)]
    assert got == pytest.approx(expected, rel=1e-9)
