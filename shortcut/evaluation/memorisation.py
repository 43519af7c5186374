"""How much a model's samples copy its training images.

The score is the share of samples that lie closer to their nearest training image (Euclidean distance in
pixel space) than all but a `quantile` of held-out real images lie to theirs. Samples as novel as unseen
real images score about `quantile`; a model that reproduces its training set scores near 1.
"""

from __future__ import annotations

import numpy as np

QUANTILE = 0.05


def nearest_distances(queries: np.ndarray, pool: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance of each query to its nearest pool item (both flattened)."""
    q = np.asarray(queries, np.float64).reshape(len(queries), -1)
    p = np.asarray(pool, np.float64).reshape(len(pool), -1)
    pp = np.sum(p * p, axis=1)
    out = []
    for i in range(0, len(q), chunk):
        block = q[i:i + chunk]
        d2 = np.sum(block * block, axis=1)[:, None] - 2 * block @ p.T + pp[None, :]
        out.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
    return np.concatenate(out) if out else np.zeros(0)


class Memorisation:
    """Scores samples against a training set, calibrated on held-out images of the same data."""

    def __init__(self, train_images: np.ndarray, heldout_images: np.ndarray, quantile: float = QUANTILE):
        self.train = np.asarray(train_images, np.float32)
        self.quantile = quantile
        self.threshold = float(np.quantile(nearest_distances(heldout_images, self.train), quantile))

    def score(self, samples: np.ndarray) -> dict:
        d = nearest_distances(samples, self.train)
        return {"memorisation": float(np.mean(d < self.threshold)), "memorisation_threshold": self.threshold,
                "memorisation_expected": self.quantile, "memorisation_samples": int(len(d)),
                "memorisation_median_distance": float(np.median(d))}
