"""The reference draw as a source of variation: Frechet distances recomputed against bootstrap resamplings
of the reference images.

Every cell of a table is scored against the same finite set of reference images (359 held-out digits for
fd_digits). Another draw of that set would move every cell, and not by the same amount: two methods whose
samples miss different parts of the data can swap places. `resample` draws the reference anew from its own
images (with replacement, the same size) `draws` times; `distances` gives one cell's Frechet distance to each
draw from the cell's stored sample mean and covariance, so no sample is regenerated. Using the same draws
(the same seed) for every cell of a table keeps the cells' shared dependence on the reference, which is what
a difference between two cells needs (docs/comparisons.md).
"""

from __future__ import annotations

import numpy as np

DRAWS = 200


def resample(features: np.ndarray, draws: int = DRAWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(means [draws, D], unbiased covariances [draws, D, D]) of `draws` bootstrap resamplings of the
    reference features [M, D]; a resampling is M images drawn with replacement (multinomial counts)."""
    x = np.asarray(features, np.float64)
    m, centre = len(x), x.mean(axis=0)
    xc = x - centre  # centred once, so the uncentred sums below lose no precision
    counts = np.random.default_rng(seed).multinomial(m, np.full(m, 1.0 / m), size=draws).astype(np.float64)
    shift = counts @ xc / m  # each draw's mean, relative to the centre
    # sum_i c_i xc_i xc_i^T - m shift shift^T; xc.T broadcast against the stack keeps this one BLAS call per draw
    covs = (xc.T @ (counts[:, :, None] * xc[None]) - m * shift[:, :, None] * shift[:, None, :]) / (m - 1)
    return centre + shift, covs


def distances(mean: np.ndarray, cov: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """The Frechet distance of N(mean, cov) to each N(means[b], covs[b]) [draws]:
    |mean - mu_b|^2 + tr(cov) + tr(cov_b) - 2 tr((cov^1/2 cov_b cov^1/2)^1/2), the trace from the eigenvalues
    of a symmetric matrix (real by construction, one batched call)."""
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    w, v = np.linalg.eigh(cov)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root[None] @ covs @ root[None]
    ev = np.linalg.eigvalsh((inner + np.swapaxes(inner, 1, 2)) / 2)
    tr_sqrt = np.sum(np.sqrt(np.clip(ev, 0.0, None)), axis=1)
    diff = mean[None, :] - means
    return np.einsum("bi,bi->b", diff, diff) + np.trace(cov) + np.trace(covs, axis1=1, axis2=2) - 2.0 * tr_sqrt
