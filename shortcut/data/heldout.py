"""A fixed, stratified held-out split for datasets without an official test split.

Training sees only the rest; the held-out images are the reference of the evaluation metric and of the
memorisation score, so a model that reproduces its training images gains nothing. The split is a pure
function of the labels, the fraction and the seed: the same on every machine and in every process.
"""

from __future__ import annotations

import numpy as np

HELDOUT_FRACTION = 0.2
HELDOUT_SEED = 0


def stratified_split(labels, fraction: float = HELDOUT_FRACTION,
                     seed: int = HELDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), both sorted: round(fraction x count) of every class held out,
    chosen by one seeded permutation per class (classes in sorted order)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    heldout = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        heldout.append(rng.permutation(members)[:int(round(fraction * len(members)))])
    held = np.sort(np.concatenate(heldout)) if heldout else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, held
