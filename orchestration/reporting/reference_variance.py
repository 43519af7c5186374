"""Each table cell's value against bootstrap draws of its reference images, from the feature statistics
exported beside its record (results.load_feature_stats), for the reference's share of a finding's variance
(findings.py). One set of draws per reference (seed 0), shared by every cell scored against it."""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
from threadpoolctl import threadpool_limits

from orchestration.reporting.results import load_feature_stats
from shortcut.evaluation import reference_bootstrap

REPRODUCE_RTOL = 1e-6  # the stored statistics must give the recorded value back, or they are not used


@functools.lru_cache(maxsize=None)
def _reference(reference: str):
    """(ReferenceStats with per-image features, bootstrap means, covariances) of a recorded reference name
    ("sklearn_digits/heldout (359 images)"); None for references whose images are not at hand."""
    dataset, _, rest = reference.partition("/")
    if dataset != "sklearn_digits":
        return None
    from shortcut.evaluation.digits_classifier import default_digits_net

    ref = default_digits_net().reference_stats(rest.split(" ", 1)[0])
    with threadpool_limits(1, "blas"):
        means, covs = reference_bootstrap.resample(ref.features)
    return ref, means, covs


_DRAWS: dict[tuple, np.ndarray | None] = {}  # a cell's draws, once a process (a run may be in several tables)


def cell_draws(record: dict, entry: dict) -> np.ndarray | None:
    """The entry's metric value against each bootstrap draw of its reference [draws], or None when the record
    has no feature statistics or the reference is not resampled (FID: its images are not at hand)."""
    key = (str(record.get("spec_hash")), str(record.get("_assets_dir")), json.dumps(entry, sort_keys=True, default=str))
    if key not in _DRAWS:
        _DRAWS[key] = _cell_draws(record, entry)
    return _DRAWS[key]


def _cell_draws(record: dict, entry: dict) -> np.ndarray | None:
    stats = load_feature_stats(record, entry)
    found = _reference(str(entry.get("reference"))) if stats is not None and entry.get("reference") else None
    if found is None:
        return None
    from shortcut.evaluation.frechet import frechet_distance_of_samples

    ref, means, covs = found
    mean, cov, count = stats
    again = frechet_distance_of_samples(mean, cov, count, ref.mu, ref.sigma)
    if not np.isclose(again, float(entry["value"]), rtol=REPRODUCE_RTOL, atol=1e-9):
        print(f"warning: {record.get('name')} [{record.get('spec_hash', '')[:12]}]: its feature statistics give "
              f"{again:.6f}, not the recorded {entry['value']:.6f}; its reference variance is left out",
              file=sys.stderr)
        return None
    with threadpool_limits(1, "blas"):  # small matrices: BLAS threads only contend
        return reference_bootstrap.distances(mean, cov, means, covs)


def reference_size(reference: str) -> int | None:
    found = _reference(reference)
    return None if found is None else len(found[0].features)
