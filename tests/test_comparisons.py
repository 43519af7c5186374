"""The evidence a comparison rests on: the held-out split, the metric's noise floor, the bootstrap spread,
the memorisation score and the compute count, each against an expectation computed independently."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut import compute
from shortcut.data.heldout import stratified_split
from shortcut.evaluation.memorisation import Memorisation, nearest_distances
from shortcut.evaluation.noise_floor import bootstrap_std, noise_floor
from shortcut.evaluation.reference_stats import ReferenceStats
from shortcut.evaluation.frechet import RunningStats


def test_stratified_split_is_fixed_disjoint_and_keeps_class_shares():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # the digits' counts
    train, held = stratified_split(labels)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    for c in range(10):  # 20 % of every class, rounded
        assert np.sum(labels[held] == c) == round(0.2 * np.sum(labels == c))
    again_train, again_held = stratified_split(labels)
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    assert not np.array_equal(held, stratified_split(labels, seed=1)[1])


def test_digits_splits_partition_the_dataset():
    from shortcut.data.digits import split_indices

    train, held, everything = split_indices("train"), split_indices("heldout"), split_indices("all")
    assert len(everything) == 1797 and len(held) == 359 and len(train) == 1438
    assert np.array_equal(np.sort(np.concatenate([train, held])), everything)
    with pytest.raises(ValueError, match="heldout"):
        split_indices("test")


def _reference(features: np.ndarray) -> ReferenceStats:
    return ReferenceStats.from_running_stats(RunningStats(features.shape[1]).update(features), {}, features)


def test_noise_floor_shrinks_with_samples_and_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    reference = _reference(rng.normal(size=(20_000, 4)))
    pool = rng.normal(size=(5_000, 4))  # real data disjoint from the reference, same distribution
    small, large = noise_floor(pool, reference, 100), noise_floor(pool, reference, 2_000)
    assert small["value"] > 3 * large["value"] > 0  # the Frechet distance's bias falls roughly as 1/n
    assert not small["with_replacement"] and noise_floor(pool, reference, 6_000)["with_replacement"]
    # each draw is the plain Frechet distance of a subset, drawn with the same seeded generator
    from shortcut.evaluation.frechet import frechet_distance

    idx = np.random.default_rng(0).choice(len(pool), 100, replace=False)
    sub = pool[idx]
    direct = frechet_distance(sub.mean(0), np.cov(sub, rowvar=False), reference.mu, reference.sigma)
    assert small["values"][0] == pytest.approx(direct)
    # a distribution shifted by 1 in every dimension scores ~4 (|mu| squared), far above the floor
    assert noise_floor(pool + 1.0, reference, 2_000)["value"] == pytest.approx(4.0, abs=0.3)


def test_bootstrap_std_tracks_the_spread_over_independent_sample_sets():
    rng = np.random.default_rng(1)
    reference = _reference(rng.normal(size=(50_000, 3)))
    shifted = lambda n: rng.normal(size=(n, 3)) + 0.5  # noqa: E731
    from shortcut.evaluation.frechet import frechet_distance

    independent = [frechet_distance(x.mean(0), np.cov(x, rowvar=False), reference.mu, reference.sigma)
                   for x in (shifted(1000) for _ in range(200))]
    estimate = bootstrap_std(shifted(1000), reference, draws=200)
    assert estimate == pytest.approx(np.std(independent), rel=0.35)
    assert bootstrap_std(rng.normal(size=(100, 300)), _reference(rng.normal(size=(400, 300)))) is None


def test_a_method_that_copies_its_training_set_scores_as_memorising():
    from shortcut.evaluation.digits_classifier import load_digits_split

    train, _ = load_digits_split("train")
    held, _ = load_digits_split("heldout")
    memo = Memorisation(train, held)
    rng = np.random.default_rng(0)
    copies = train[rng.choice(len(train), 500)] + rng.normal(scale=0.01, size=(500, 8, 8, 1))
    assert memo.score(copies)["memorisation"] > 0.95
    # held-out digits are as novel as the calibration says: about 5 % (by construction of the threshold)
    assert memo.score(held)["memorisation"] == pytest.approx(0.05, abs=0.01)
    # noise is far from every training image
    assert memo.score(rng.uniform(-1, 1, size=(200, 8, 8, 1)))["memorisation"] == 0.0
    assert nearest_distances(train[:3], train)[0] == pytest.approx(0.0, abs=1e-6)


def test_train_step_flops_match_an_analytic_count_for_a_dense_network():
    b, d, h, o = 32, 64, 128, 16
    params = {"w1": jnp.ones((d, h)), "w2": jnp.ones((h, o))}
    x = jnp.ones((b, d))

    def loss(p, x):
        return jnp.mean(jnp.square(jax.nn.relu(x @ p["w1"]) @ p["w2"]))

    forward = compute.program_flops(jax.jit(loss), params, x)
    # matmuls: 2bdh + 2bho; the elementwise rest (relu, square, mean) is O(b(h + o)), < 1 % here
    assert forward == pytest.approx(2 * b * (d * h + h * o), rel=0.01)
    grad = compute.program_flops(jax.jit(jax.grad(loss)), params, x)
    # backward: dW2 = h^T g (2bho), dh = g W2^T (2bho), dW1 = x^T dh (2bdh); no dx (x is not differentiated)
    assert grad == pytest.approx(2 * b * (d * h + h * o) + 2 * b * (d * h + 2 * h * o), rel=0.02)


def test_a_students_compute_counts_its_teacher_and_its_pairs():
    c = compute.run_compute(2e9, 1000, teacher={"total_flops": 5e12}, preparation={"pairs_flops": 1e12},
                            has_teacher=True)
    assert c["train_flops"] == 2e12 and c["total_flops"] == 8e12 and c["teacher_flops"] == 5e12
    assert compute.run_compute(2e9, 1000)["total_flops"] == 2e12
    # a teacher without a recorded compute leaves the student's total unknown, not understated
    assert compute.run_compute(2e9, 1000, teacher=None, has_teacher=True)["total_flops"] is None
