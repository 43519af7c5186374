"""FID with the standard FID Inception-v3 (pool3), following the paper's protocol."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from shortcut.evaluation import inception_weights as iw
from shortcut.evaluation.frechet import RunningStats
from shortcut.evaluation.inception import FID_IMAGE_SIZE, POOL3_DIM, FIDInceptionV3, fid_preprocess
from shortcut.evaluation.reference_stats import ReferenceStats
from shortcut.evaluation.sharded_features import ShardedFeatureFn
from shortcut.evaluation.streaming import BatchesFn, compute_stats


def _apply(model, image_size, variables, images):
    pool3 = model.apply(variables["inception"], fid_preprocess(images, image_size))
    if variables["logits_weight"] is None:
        return pool3, None
    return pool3, pool3 @ variables["logits_weight"]


class InceptionFeatureNet:
    """The FID feature network: images in [-1, 1] (NHWC, any size) -> pool3 features [N, 2048].

    ``features`` applies :func:`fid_preprocess` (bilinear resize to 299, clip) inside the
    jit-compiled, device-sharded function. ``sha256`` is the hash of the standard weights
    file the variables came from (for a converted .npz, the hash of its source).
    ``outputs`` gives pool3 and, in the same pass, the 1008-way logits of the graph's
    classification layer (inception_head.py) for the Inception Score, None without that layer.
    """

    name = "inception-v3-fid-2015-12-05-pool3"
    dim = POOL3_DIM
    score_names = ("inception_score", "precision", "recall")  # sample_metrics.py: IS, precision, recall

    def __init__(self, variables: dict, sha256: str, *, weights_path: Path | None = None,
                 devices: Sequence[jax.Device] | None = None, image_size: int = FID_IMAGE_SIZE,
                 logits_weight: np.ndarray | None = None):
        self.sha256 = sha256
        self.has_logits = logits_weight is not None
        self.weights_path = weights_path
        self.weights_file = weights_path.name if weights_path is not None else None  # load() names the source
        self.image_size = image_size
        if image_size != FID_IMAGE_SIZE:  # only for cheap pipeline tests
            self.name = f"{InceptionFeatureNet.name}@{image_size}px"
        self._fn = ShardedFeatureFn(functools.partial(_apply, FIDInceptionV3(), image_size),
                                    {"inception": variables, "logits_weight": logits_weight}, devices)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, expected_sha256: str | None = iw.STANDARD,
             **kwargs) -> "InceptionFeatureNet":
        """Load verified weights (see :func:`inception_weights.load_inception_weights`)."""
        from shortcut.evaluation.inception_head import load_logits_weight

        w = iw.load_inception_weights(path, expected_sha256)
        net = cls(w.variables, w.source_sha256, weights_path=w.path, logits_weight=load_logits_weight(w.path, w.fmt),
                  **kwargs)
        net.weights_file = w.source_name  # for a converted .npz: the file it was converted from
        return net

    def features(self, images) -> np.ndarray:
        return self._fn(images)[0]

    def outputs(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """(pool3 features [N, 2048], logits [N, 1008] or None), from one pass."""
        return self._fn(images)

    __call__ = features

    def provenance(self) -> dict[str, Any]:
        return {"feature_net": self.name, "feature_net_sha256": self.sha256,
                "feature_net_weights": self.weights_file or "(in memory)",
                "preprocess": f"jax.image.resize bilinear antialias=False to {self.image_size}, clip [-1,1]"}


@dataclass(frozen=True)
class MetricResult:
    """A metric value together with everything it depends on."""

    value: float
    record: dict[str, Any] = field(default_factory=dict)


def compute_fid(
    batches_fn: BatchesFn,
    num_samples: int,
    batch_size: int,
    reference: ReferenceStats | str | os.PathLike,
    net: InceptionFeatureNet | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    *,
    fingerprint: str = "",
    progress: bool | None = None,
    frechet_method: str = "sqrtm",
) -> MetricResult:
    """FID of ``num_samples`` generated images against reference statistics (streamed, resumable).

    ``batches_fn(start, n)`` returns images ``start .. start+n-1`` in [-1, 1], NHWC.
    The reference's provenance must name the same feature network, when it names one.
    ``net`` may be any object with ``features``, ``name``, ``sha256`` and ``provenance()``
    (default: the standard weights via :meth:`InceptionFeatureNet.load`).
    """
    net = net if net is not None else InceptionFeatureNet.load()
    ref = reference if isinstance(reference, ReferenceStats) else ReferenceStats.load(reference)
    ref.check_feature_net(net.name, net.sha256)
    stats: RunningStats = compute_stats(
        batches_fn, net.features, num_samples, batch_size, checkpoint_path, checkpoint_every,
        fingerprint=f"{net.name}:{net.sha256}:{fingerprint}", progress=progress, desc="FID features",
    )
    value = ref.frechet_distance(stats, frechet_method)
    return MetricResult(value, {
        "metric": "FID", "num_samples": stats.count, **net.provenance(), "frechet_method": frechet_method,
        "reference_sha256": ref.file_sha256, "reference_provenance": ref.provenance,
    })
