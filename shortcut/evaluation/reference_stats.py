"""Reference statistics files: feature mean/covariance of a dataset, with provenance.

File format (.npz, no pickles):

* ``mu``: float64 [D]; ``sigma``: float64 [D, D] (unbiased covariance); ``count``: int64;
* ``provenance``: a JSON string with at least ``format``, ``dataset``, ``split``,
  ``feature_net`` and ``feature_net_sha256`` (plus whatever the caller adds, e.g. the
  preprocessing and image size);
* optionally ``features``: float32 [M, D], the features of the first M images, the reference
  set of improved precision/recall (precision_recall.py).

:meth:`ReferenceStats.load` also reads the official shortcut-models stats files, which
hold only ``mu`` and ``sigma`` (their provenance is then empty and ``count`` is None).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from shortcut.evaluation.frechet import RunningStats, atomic_savez, frechet_distance, frechet_distance_of_samples
from shortcut.evaluation.streaming import FeatureFn

FORMAT = "shortcut-models/reference-stats/v1"


@dataclass(frozen=True)
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    provenance: dict[str, Any] = field(default_factory=dict)
    file_sha256: str | None = None  # set by load()
    features: np.ndarray | None = None  # [M, D] reference features for precision/recall

    @classmethod
    def from_running_stats(cls, stats: RunningStats, provenance: dict[str, Any],
                           features: np.ndarray | None = None) -> "ReferenceStats":
        prov = {"format": FORMAT, **provenance, "count": stats.count}
        if features is not None:
            features = np.asarray(features, np.float32)
            prov["precision_recall_features"] = len(features)
        return cls(stats.mean, stats.cov, stats.count, prov, features=features)

    def save(self, path: str | os.PathLike) -> None:
        atomic_savez(
            path,
            mu=np.asarray(self.mu, np.float64),
            sigma=np.asarray(self.sigma, np.float64),
            count=np.int64(-1 if self.count is None else self.count),
            provenance=np.array(json.dumps(self.provenance, sort_keys=True)),
            **({} if self.features is None else {"features": np.asarray(self.features, np.float32)}),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        from shortcut.evaluation.inception_weights import sha256_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics file {path} does not exist")
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise ValueError(f"{path}: a reference stats file needs 'mu' and 'sigma', has {f.files}")
            count = int(f["count"]) if "count" in f.files else -1
            prov = json.loads(str(f["provenance"])) if "provenance" in f.files else {}
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            features = np.asarray(f["features"], np.float32) if "features" in f.files else None
        if sigma.shape != mu.shape * 2:
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        return cls(mu, sigma, None if count < 0 else count, prov, sha256_file(path), features)

    def check_feature_net(self, name: str, sha256: str) -> None:
        """Raise if the provenance names another feature network (no-op when it names none)."""
        pn, ps = self.provenance.get("feature_net"), self.provenance.get("feature_net_sha256")
        if (pn is not None and pn != name) or (ps is not None and ps != sha256):
            raise ValueError(
                f"reference statistics were computed with feature net {pn} ({ps}), not {name} ({sha256})"
            )

    def frechet_distance(self, stats: RunningStats, method: str | None = None) -> float:
        """Of `stats` to this reference; `method` None: the one its sample count calls for
        (frechet_distance_of_samples)."""
        if method is None:
            return frechet_distance_of_samples(stats.mean, stats.cov, stats.count, self.mu, self.sigma)
        return frechet_distance(stats.mean, stats.cov, self.mu, self.sigma, method=method)


def compute_reference_stats(
    batches: Iterable[np.ndarray],
    feature_fn: FeatureFn,
    *,
    dataset: str,
    split: str,
    feature_net: str,
    feature_net_sha256: str,
    extra_provenance: dict[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    progress: bool | None = None,
    keep_features: int = 0,
    total: int | None = None,
) -> ReferenceStats:
    """Stream dataset image batches (e.g. a TFDS iterator, in [-1, 1]) through ``feature_fn``.

    Batches smaller than the first one are zero-padded to its size before ``feature_fn``
    (one compiled shape) and the padding dropped. Writes ``path`` if given. The features of
    the first ``keep_features`` images are kept as the precision/recall reference set. For a
    resumable computation over a random-access source use ``compute_stats`` and then
    :meth:`ReferenceStats.from_running_stats`. ``total`` (the images to expect) gives the progress
    bar its time left.
    """
    from shortcut import progress as progress_lib

    stats: RunningStats | None = None
    kept: list[np.ndarray] = []
    first = None
    with progress_lib.bar(total, f"reference {dataset}/{split}", unit="img", enabled=progress) as bar:
        for images in batches:
            stats = _add_batch(np.asarray(images), feature_fn, stats, kept, keep_features, first)
            first = first or len(images)
            bar.update(len(images))
    if stats is None:
        raise ValueError("no batches given")
    ref = ReferenceStats.from_running_stats(
        stats,
        {"dataset": dataset, "split": split, "feature_net": feature_net,
         "feature_net_sha256": feature_net_sha256, **(extra_provenance or {})},
        np.concatenate(kept) if kept else None,
    )
    if path is not None:
        ref.save(path)
    return ref


def _add_batch(images: np.ndarray, feature_fn: FeatureFn, stats: RunningStats | None, kept: list[np.ndarray],
               keep_features: int, first: int | None) -> RunningStats:
    """One batch's features into `stats` (zero-padded to the first batch's size: one compiled shape), the
    first `keep_features` of them kept."""
    n = images.shape[0]
    if first is not None and n < first:
        images = np.concatenate([images, np.zeros((first - n, *images.shape[1:]), images.dtype)])
    feats = np.asarray(feature_fn(images))[:n]
    if stats is None:
        stats = RunningStats(feats.shape[-1])
    stats.update(feats)
    if keep_features > sum(len(k) for k in kept):
        kept.append(np.asarray(feats[:keep_features - sum(len(k) for k in kept)], np.float32))
    return stats
