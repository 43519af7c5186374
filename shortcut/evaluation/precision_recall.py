"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) in a feature space.

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
nearest neighbour in the same set (k = 3). Precision: the fraction of generated points inside the
reference manifold; recall: the fraction of reference points inside the generated manifold. Distances
are Euclidean, computed in float64 in blocks of rows (the same definition as the ADM evaluation suite).
"""

from __future__ import annotations

import numpy as np

DEFAULT_K = 3


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(x, k: int = DEFAULT_K, block: int = 1024) -> np.ndarray:
    """Squared distance of each point of x to its k-th nearest neighbour in x (itself excluded)."""
    x = np.asarray(x, np.float64)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points, got {len(x)}")
    # index k of the sorted row: the point itself (distance 0) is index 0
    return np.concatenate([np.partition(_sq_distances(x[i:i + block], x), k, axis=1)[:, k]
                           for i in range(0, len(x), block)])


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
    """Fraction of `points` within radius of at least one centre."""
    inside = [np.any(_sq_distances(points[i:i + block], centres) <= radii[None, :], axis=1)
              for i in range(0, len(points), block)]
    return float(np.mean(np.concatenate(inside)))


def precision_recall(reference, generated, k: int = DEFAULT_K, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of generated features [N, D] against reference features [M, D]."""
    real, fake = np.asarray(reference, np.float64), np.asarray(generated, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {real.shape} and {fake.shape}")
    precision = _coverage(fake, real, knn_radii(real, k, block), block)
    recall = _coverage(real, fake, knn_radii(fake, k, block), block)
    return precision, recall
