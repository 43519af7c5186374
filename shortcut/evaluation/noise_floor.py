"""The noise floor of a Frechet distance, and the sampling spread of one measured value.

A Frechet distance measured on n samples is not zero even for real data: two sets of n real images score
above zero against the reference statistics because n samples estimate a mean and a covariance only so
well. The *floor* of a metric at n samples is that score: the distance between `draws` sets of n real
images (disjoint from the reference) and the reference. A difference between two methods smaller than the
floor is not resolved, and a cell at or below it is as good as real data at that sample count.

`bootstrap_std` is the spread of one measured value over resamplings of its own samples: the interval of
a comparison that has one seed.
"""

from __future__ import annotations

import numpy as np

from shortcut.evaluation.frechet import frechet_distance_of_samples

DRAWS = 10
BOOTSTRAP_DRAWS = 50
BOOTSTRAP_MAX_DIM = 256  # above this (Inception's 2048) one draw costs seconds; the bootstrap is skipped


def _moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def noise_floor(pool: np.ndarray, reference, num_samples: int, *, draws: int = DRAWS, seed: int = 0,
                source: str = "") -> dict:
    """The Frechet distance of `draws` sets of `num_samples` real-image features drawn from `pool` (without
    replacement when the pool is large enough, else with) to `reference` (an object with mu, sigma).
    Returns {"value": mean, "std", "max", "values", "num_samples", "draws", "pool", "with_replacement",
    "source"}."""
    pool = np.asarray(pool)
    replace = len(pool) < num_samples
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        mu, sigma = _moments(pool[rng.choice(len(pool), num_samples, replace=replace)])
        values.append(frechet_distance_of_samples(mu, sigma, num_samples, reference.mu, reference.sigma))
    return {"value": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if draws > 1 else 0.0,
            "max": float(np.max(values)), "values": [float(v) for v in values], "num_samples": int(num_samples),
            "draws": int(draws), "pool": int(len(pool)), "with_replacement": bool(replace), "source": source}


def bootstrap_std(features: np.ndarray, reference, *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float | None:
    """Std of the Frechet distance of `features` to `reference` over `draws` resamplings (with replacement,
    same size) of the features; None above BOOTSTRAP_MAX_DIM feature dimensions."""
    features = np.asarray(features)
    if features.shape[-1] > BOOTSTRAP_MAX_DIM or len(features) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [frechet_distance_of_samples(*_moments(features[rng.integers(0, len(features), len(features))]),
                                          len(features), reference.mu, reference.sigma) for _ in range(draws)]
    return float(np.std(values, ddof=1))
