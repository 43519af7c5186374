"""Every metric of one stream of samples from one pass of the feature network: the Frechet distance
(FID / fd_digits), the Inception Score on the same network's logits and improved precision/recall
(k = 3) on the same features. Streamed and resumable like the Frechet distance alone.

The same function scores a run's samples (shortcut/evaluate.py) and a sample file
(orchestration/evaluate_samples.py), so both give the same numbers for the same images.

Names: each feature network names its scores (`score_names`: IS, precision, recall): with the FID Inception
`inception_score`, `precision`, `recall`; with the digits classifier (`fd_digits`) `is_digits`,
`precision_digits`, `recall_digits`: the same definitions in that classifier's logits and features, not
comparable to the Inception ones.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from shortcut.evaluation.fid import MetricResult
from shortcut.evaluation.frechet import RunningStats, atomic_savez
from shortcut.evaluation.noise_floor import bootstrap_std
from shortcut.evaluation.inception_score import DEFAULT_SPLITS, InceptionScoreStats, softmax
from shortcut.evaluation.precision_recall import DEFAULT_K, precision_recall
from shortcut.evaluation.reference_stats import ReferenceStats
from shortcut.evaluation.streaming import BatchesFn, compute_stats

PR_MAX_SAMPLES = 10_000  # generated features kept for precision/recall (the ADM suite's reference size)


class SampleStats:
    """Feature mean/covariance, Inception Score split sums and the first PR_MAX_SAMPLES features of
    samples fed in index order (from index 0), checkpointable."""

    def __init__(self, dim: int, num_samples: int, num_logits: int = 0, pr_samples: int = PR_MAX_SAMPLES,
                 splits: int = DEFAULT_SPLITS):
        self.running = RunningStats(dim)
        self.inception = InceptionScoreStats(num_samples, num_logits, splits) if num_logits else None
        self._kept = np.zeros((min(pr_samples, num_samples), dim), np.float32)

    @classmethod
    def for_output(cls, output, num_samples: int) -> "SampleStats":
        features, logits = output
        return cls(features.shape[-1], num_samples, 0 if logits is None else logits.shape[-1])

    @property
    def count(self) -> int:
        return self.running.count

    @property
    def pr_features(self) -> np.ndarray:
        return self._kept[:min(self.count, len(self._kept))]

    def update(self, output) -> "SampleStats":
        features, logits = output
        i = self.count
        take = max(0, min(len(features), len(self._kept) - i))
        self._kept[i:i + take] = features[:take]
        self.running.update(features)
        if self.inception is not None:
            self.inception.update(softmax(logits))
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {**self.running.state_dict(), "pr_features": self.pr_features, "pr_capacity": np.int64(len(self._kept))}
        if self.inception is not None:
            out.update(self.inception.state_dict())
        return out

    def save(self, path: str | os.PathLike, **extra) -> None:
        atomic_savez(path, **self.state_dict(), **extra)

    @classmethod
    def from_state_dict(cls, state) -> "SampleStats":
        out = cls.__new__(cls)
        out.running = RunningStats.from_state_dict(state)
        out.inception = InceptionScoreStats.from_state_dict(state) if "is_counts" in state else None
        out._kept = np.zeros((int(state["pr_capacity"]), out.running.dim), np.float32)
        kept = np.asarray(state["pr_features"], np.float32)
        out._kept[:len(kept)] = kept
        return out


def compute_sample_metrics(batches_fn: BatchesFn, num_samples: int, batch_size: int, reference: ReferenceStats,
                           net, *, checkpoint_path: str | os.PathLike | None = None, fingerprint: str = "",
                           progress: bool | None = None, extra_references: dict | None = None,
                           desc: str | None = None) -> MetricResult:
    """Score `num_samples` images (``batches_fn(start, n)`` in [-1, 1], NHWC) with `net` (an object
    with ``outputs(images) -> (features, logits or None)``, ``name``, ``sha256``, ``score_names``) against
    `reference`.

    Returns the Frechet distance as the value and the other scores as the record: {IS name: mean,
    IS name + "_std", IS name + "_splits", precision and recall names, "precision_recall_k",
    "precision_recall_samples", "precision_recall_reference"}; the IS keys are missing when the
    network has no logits, the precision/recall keys when the reference holds no features (then
    "score_notes" says so). Also "bootstrap_std" (the value's std over resamplings of the samples, when every
    sample's features are kept and they are small enough) and, for each of `extra_references` (name ->
    ReferenceStats), the Frechet distance to it under that name. `desc` names the progress bar.
    """
    reference.check_feature_net(net.name, net.sha256)
    stats: SampleStats = compute_stats(
        batches_fn, net.outputs, num_samples, batch_size, checkpoint_path,
        fingerprint=f"{net.name}:{net.sha256}:{fingerprint}:scores-v1", progress=progress, desc=desc or f"{net.name} features",
        new_stats=lambda output: SampleStats.for_output(output, num_samples), load_stats=SampleStats.from_state_dict)
    is_name, p_name, r_name = net.score_names
    out: dict[str, Any] = {}
    notes = []
    if stats.inception is not None:
        mean, std = stats.inception.result()
        out.update({is_name: mean, f"{is_name}_std": std, f"{is_name}_splits": stats.inception.splits})
    else:
        notes.append(f"{is_name}: the feature network has no classification layer (weights file without it)")
    if reference.features is not None and len(reference.features) > DEFAULT_K and stats.count > DEFAULT_K:
        precision, recall = precision_recall(reference.features, stats.pr_features, k=DEFAULT_K)
        out.update({p_name: precision, r_name: recall, "precision_recall_k": DEFAULT_K,
                    "precision_recall_samples": len(stats.pr_features),
                    "precision_recall_reference": len(reference.features)})
    else:
        notes.append(f"{p_name}/{r_name}: the reference statistics hold no reference features "
                     "(recompute them with fid_stats)")
    if stats.count == len(stats.pr_features):
        spread = bootstrap_std(stats.pr_features, reference)
        if spread is not None:
            out["bootstrap_std"] = spread
    for name, ref in (extra_references or {}).items():
        out[name] = ref.frechet_distance(stats.running)
    if notes:
        out["score_notes"] = notes
    return MetricResult(reference.frechet_distance(stats.running), out)
