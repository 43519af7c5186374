"""The `fd_digits` metric: the Frechet distance in the feature space of the shipped digits classifier, against
the digits split training never sees (`data.heldout_split`; without one, all digits), and as `fd_digits_train`
against the training split (offline, for the embedded default; not FID). Class-conditional runs also report
the classifier's accuracy on the samples' intended classes, and the memorisation score (memorisation.py)."""

from __future__ import annotations

import hashlib

import numpy as np

from shortcut.errors import KeyedValueError
from shortcut.evaluation.metric import Metric
from shortcut.metrics import MetricPlugin, Quantity


def digits_metric(class_conditional: bool = True, heldout_split: str | None = None, train_split: str = "train") -> Metric:
    """fd_digits against the held-out split (or, without one, all digits), fd_digits_train against the
    training split, the classifier for class accuracy, and the memorisation score."""
    from shortcut.evaluation import DigitsFeatureNet
    from shortcut.evaluation.digits_classifier import load_digits_split
    from shortcut.evaluation.memorisation import Memorisation

    net = DigitsFeatureNet.load()
    if heldout_split is None:  # the whole dataset is the reference: floor draws come from it too
        ref = net.reference_stats("all")
        return Metric("fd_digits", net, ref, _stats_sha256(ref), classifier=net if class_conditional else None,
                      provenance=net.provenance("all"), floor_pool=ref.features,
                      floor_source="draws from all digits, the reference set itself")
    ref, train_ref = net.reference_stats(heldout_split), net.reference_stats(train_split)
    memo = Memorisation(load_digits_split(train_split)[0], load_digits_split(heldout_split)[0])
    return Metric("fd_digits", net, ref, _stats_sha256(ref), classifier=net if class_conditional else None,
                  provenance=net.provenance(heldout_split), floor_pool=train_ref.features,
                  floor_source=f"draws from the {train_split} split (disjoint from the {heldout_split} reference)",
                  extra_references={"fd_digits_train": (train_ref, ref.features, f"draws from the {heldout_split} "
                                                        f"split (disjoint from the {train_split} reference)")},
                  memorisation=memo)


def _stats_sha256(ref) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(ref.mu).tobytes() + np.ascontiguousarray(ref.sigma).tobytes())
    return digest.hexdigest()


def _higher(description: str) -> Quantity:
    return Quantity(description, lower_is_better=False)


class FdDigits(MetricPlugin):
    name = "fd_digits"
    value = Quantity("fd_digits: Frechet distance in the hidden features of the project's small digits classifier, "
                     "to the statistics of the reference named below (offline stand-in; not FID, not comparable to "
                     "FID)", findings=True)
    scores = {
        "is_digits": _higher("is_digits: the Inception Score's formula on the digits classifier's 10 logits (not IS)"),
        "precision_digits": _higher("precision_digits: improved precision (k = 3) in the digits classifier's "
                                    "features, against all 1,797 digits"),
        "recall_digits": _higher("recall_digits: improved recall (k = 3) in the digits classifier's features"),
        "class_accuracy": _higher("class_accuracy: the digits classifier's accuracy on the samples' intended "
                                  "classes"),
        "fd_digits_train": Quantity("fd_digits_train: fd_digits against the training split's statistics (rewards "
                                    "memorisation)", findings=True),
        "memorisation": Quantity("memorisation: share of samples closer to their nearest training image than 95 % "
                                 "of held-out real images are to theirs (0.05 for samples as novel as unseen data)"),
    }

    def check(self, spec) -> None:
        if spec.input_shape != (8, 8, 1):
            raise KeyedValueError("eval.metric", f"fd_digits needs 8x8x1 digits images, the model sees "
                                  f"{spec.input_shape}")

    def load(self, spec) -> Metric:
        return digits_metric(class_conditional=spec.data.num_classes > 0, heldout_split=spec.data.heldout_split,
                             train_split=spec.data.split)
