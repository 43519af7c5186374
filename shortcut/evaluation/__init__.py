"""Evaluation metrics: FID (standard FID Inception-v3) and the offline digits Frechet distance.

* :mod:`frechet`: ``RunningStats`` (streaming, mergeable, checkpointable) and ``frechet_distance``.
* :mod:`digits_classifier`: ``fd_digits`` / ``class_accuracy`` with the shipped digits classifier.
* :mod:`inception`, :mod:`inception_weights`: the FID Inception-v3 and its verified weights.
* :mod:`streaming`, :mod:`reference_stats`, :mod:`fid`: streamed, sharded, resumable FID.
"""

from shortcut.evaluation.digits_classifier import (
    DigitsFeatureNet,
    class_accuracy,
    digits_reference_stats,
    fd_digits,
    load_digits_data,
)
from shortcut.evaluation.fid import InceptionFeatureNet, MetricResult, compute_fid
from shortcut.evaluation.frechet import RunningStats, frechet_distance
from shortcut.evaluation.inception import FIDInceptionV3, fid_preprocess
from shortcut.evaluation.inception_weights import InceptionWeightsError, load_inception_weights
from shortcut.evaluation.reference_stats import ReferenceStats, compute_reference_stats
from shortcut.evaluation.sharded_features import ShardedFeatureFn
from shortcut.evaluation.streaming import compute_stats

__all__ = [
    "DigitsFeatureNet",
    "FIDInceptionV3",
    "InceptionFeatureNet",
    "InceptionWeightsError",
    "MetricResult",
    "ReferenceStats",
    "RunningStats",
    "ShardedFeatureFn",
    "class_accuracy",
    "compute_fid",
    "compute_reference_stats",
    "compute_stats",
    "digits_reference_stats",
    "fd_digits",
    "fid_preprocess",
    "frechet_distance",
    "load_digits_data",
    "load_inception_weights",
]
