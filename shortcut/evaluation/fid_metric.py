"""The `fid` metric: FID with the standard FID Inception-v3 (pool3) against reference statistics from
`fid_stats`, the Inception Score and improved precision/recall from the same pass; under --smoke, the same
pipeline with a randomly initialised Inception and statistics of mock images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shortcut.evaluation.metric import Metric
from shortcut.metrics import EvaluationSetupError, MetricPlugin, Quantity


def default_reference_path(spec) -> Path:
    """$SHORTCUT_WEIGHTS_DIR/fid_stats/<dataset>_<split>_<size>.npz: where fid_stats writes a spec's statistics."""
    from shortcut.evaluation.inception_weights import default_weights_dir

    d = spec.data
    return default_weights_dir() / "fid_stats" / f"{d.dataset}_{d.split.replace('/', '-')}_{d.image_size}.npz"


def fid_metric(reference_path: Path, weights: str | None = None, verify: bool = True, how_to_make: str = "") -> Metric:
    """FID against a reference statistics file, with the FID Inception (`verify`: the standard weights)."""
    from shortcut.evaluation import InceptionFeatureNet, ReferenceStats
    from shortcut.evaluation.inception_weights import STANDARD

    net = InceptionFeatureNet.load(weights, expected_sha256=STANDARD if verify else None)
    if not Path(reference_path).exists():
        raise EvaluationSetupError(f"FID reference statistics not found: {reference_path}. {how_to_make}".strip())
    ref = ReferenceStats.load(reference_path)
    ref.check_feature_net(net.name, net.sha256)
    note = "" if verify else ("pipeline test: Inception weights not verified as the standard FID "
                              "weights, so this is not an FID score")
    return Metric("fid", net, ref, ref.file_sha256, note=note, provenance=net.provenance())


class FID(MetricPlugin):
    name = "fid"
    value = Quantity("FID: Frechet distance of Inception-v3 pool3 features to the dataset's reference statistics",
                     display="FID", findings=True)
    scores = {
        "inception_score": Quantity("inception_score: Inception Score (mean over 10 splits) on the FID Inception's "
                                    "logits (its 1008-way layer, no bias), from the same pass as FID",
                                    lower_is_better=False),
        "precision": Quantity("precision: improved precision (Kynkaanniemi et al. 2019, k = 3) on Inception pool3 "
                              "features, against the reference set stored with the FID statistics",
                              lower_is_better=False),
        "recall": Quantity("recall: improved recall (Kynkaanniemi et al. 2019, k = 3) on Inception pool3 features",
                           lower_is_better=False),
    }

    def load(self, spec) -> Metric:
        ev = spec.eval
        path = Path(ev.reference_stats) if ev.reference_stats else default_reference_path(spec)
        return fid_metric(path, ev.inception_weights, verify=ev.verify_inception,
                          how_to_make=f"Compute them once over the whole dataset with\n    fid_stats {spec.name}\n"
                                      "(or set eval.reference_stats to an existing file).")

    def smoke(self, spec) -> Metric:
        """The FID pipeline with stand-ins (randomly initialised Inception at 75 px, reference statistics of mock
        images), so decoding and feature statistics are exercised; the record's note says it is not an FID."""
        from shortcut.data import make_mock_iterator
        from shortcut.evaluation import InceptionFeatureNet, ReferenceStats
        from shortcut.evaluation.frechet import RunningStats
        from shortcut.evaluation.inception import random_inception_variables

        net = InceptionFeatureNet(random_inception_variables(0), "random-init (smoke)", image_size=75)
        images = make_mock_iterator(image_shape=spec.pixel_shape, num_classes=0, batch_size=16, seed=spec.seed + 7)
        features = np.concatenate([net(next(images)["image"]) for _ in range(2)])
        ref = ReferenceStats.from_running_stats(RunningStats(net.dim).update(features), {
            "dataset": "mock", "feature_net": net.name, "feature_net_sha256": net.sha256}, features)
        return Metric("fid_smoke", net, ref, "mock", note="--smoke: random Inception weights at 75 px and statistics "
                      "of random images stand in for FID's; a pipeline check, not an FID", provenance=net.provenance())
