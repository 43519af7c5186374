"""Frechet distance and streaming statistics against closed forms and numpy."""

import numpy as np
import pytest

from shortcut.evaluation.frechet import RunningStats, frechet_distance


METHODS = ["sqrtm", "eigh"]


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_gaussians_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # For diagonal covariances: |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_commuting_full_covariances_closed_form(method):
    # Covariances sharing eigenvectors: distance depends only on the eigenvalues.
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    l1, l2 = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
    c1, c2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    expected = np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(np.zeros(d), c1, np.zeros(d), c2, method=method) == pytest.approx(expected, rel=1e-8)


def test_methods_agree_on_general_covariances():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(200, 10)) @ rng.normal(size=(10, 10)), rng.normal(size=(150, 10)) * 2
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(frechet_distance(*args, method="eigh"), rel=1e-9)


def test_not_psd_raises_on_imaginary_part():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("method", METHODS)
def test_identical_is_zero_and_shift_is_squared_norm(method):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, cov, mu, cov, method=method)) < 1e-8
    m = rng.normal(size=8)
    assert frechet_distance(mu + m, cov, mu, cov, method=method) == pytest.approx(m @ m, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_singular_covariances_use_eps_fallback(method):
    # Rank-deficient covariances (fewer samples than dims): still finite, near the truth.
    rng = np.random.default_rng(3)
    d = 20
    a = rng.normal(size=(5, d))
    cov = np.cov(a, rowvar=False)  # rank 4
    val = frechet_distance(np.zeros(d), cov, np.zeros(d), cov, method=method)
    assert np.isfinite(val) and abs(val) < 1e-3
    z = np.zeros((d, d))
    assert frechet_distance(np.ones(d), z, np.zeros(d), z, method=method) == pytest.approx(d, abs=1e-3)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_stats_equal_numpy_on_concatenation():
    rng = np.random.default_rng(4)
    batches = [rng.normal(3.0, 2.0, size=(n, 7)).astype(np.float32) for n in (1, 5, 64, 3, 17)]
    s = RunningStats(7)
    for b in batches:
        s.update(b)
    x = np.concatenate(batches).astype(np.float64)
    assert s.count == len(x)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_merge_of_shards_equals_whole_and_checkpoint_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 6)) * rng.uniform(0.5, 4, 6) + 10.0
    whole = RunningStats(6).update(x)
    a = RunningStats(6).update(x[:37]).update(x[37:120])
    b = RunningStats(6).update(x[120:])
    merged = a.copy().merge(b)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-10)
    assert merged.count == 300
    merged.merge(RunningStats(6))  # merging an empty shard changes nothing
    assert merged.count == 300

    # Save a partial accumulation, reload it and continue: same as never stopping.
    a.save(tmp_path / "partial.npz")
    resumed = RunningStats.load(tmp_path / "partial.npz").update(x[120:])
    np.testing.assert_array_equal(resumed.mean, merged.mean)
    np.testing.assert_allclose(resumed.cov, whole.cov, rtol=1e-10)


def test_running_stats_rejects_bad_input():
    s = RunningStats(3)
    with pytest.raises(ValueError):
        s.update(np.zeros((4, 2)))
    with pytest.raises(ValueError):
        s.update(np.array([[np.nan, 0, 0]]))
    s.update(np.zeros((1, 3)))
    with pytest.raises(ValueError):
        s.cov  # one sample
    with pytest.raises(ValueError):
        s.merge(RunningStats(4))


def test_fewer_samples_than_dimensions_use_the_exact_eigh_trace():
    """Below full rank (n <= d) the distance is exact: it equals the n x n route of the trace,
    tr((C_x C)^1/2) = sum sqrt(eig(X C X^T / (n - 1))) for the centred samples X, an independent oracle."""
    from shortcut.evaluation.frechet import frechet_distance_of_samples

    rng = np.random.default_rng(0)
    d, n = 64, 12
    ref = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    mu_ref, cov_ref = ref.mean(0), np.cov(ref, rowvar=False)
    x = rng.normal(size=(n, d)) + 0.3
    xc = x - x.mean(0)
    small = np.linalg.eigvalsh(xc @ cov_ref @ xc.T / (n - 1))
    oracle = (np.sum((x.mean(0) - mu_ref) ** 2) + np.trace(np.cov(x, rowvar=False)) + np.trace(cov_ref)
              - 2 * np.sum(np.sqrt(np.clip(small, 0, None))))
    got = frechet_distance_of_samples(x.mean(0), np.cov(x, rowvar=False), n, mu_ref, cov_ref)
    assert got == pytest.approx(oracle, rel=1e-6)
    # full rank: the standard sqrtm route, the same value as frechet_distance's default
    y = rng.normal(size=(300, d))
    args = (y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance_of_samples(*args, 300, mu_ref, cov_ref) == frechet_distance(*args, mu_ref, cov_ref)
