"""Evaluation at each sampling step count: the Frechet distance of generated samples to reference
statistics, streamed and resumable, with everything the number depends on recorded beside it.

Metrics (spec `eval.metric`):
  fd_digits  Frechet distance in the feature space of the shipped digits classifier, against the
             digits split training never sees (`data.heldout_split`; without one, all digits), and as
             `fd_digits_train` against the training split (offline, for the embedded default; not FID).
             Class-conditional runs also report the classifier's accuracy on the samples' intended
             classes, and the memorisation score (evaluation/memorisation.py).
  fid        FID with the standard FID Inception-v3 (pool3), reference statistics from `fid_stats`.

Every entry records the metric's noise floor at its sample count (evaluation/noise_floor.py: real images
against the same reference) and, where the features allow, the value's bootstrap std over its samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shortcut.errors import ShortcutError
from shortcut.images import save_grid
from shortcut.sampling import sample_range
from shortcut.spec import Spec


class EvaluationSetupError(ShortcutError, RuntimeError):
    """Something the metric needs is missing; the message says what and how to provide it."""


@dataclasses.dataclass
class Metric:
    name: str
    net: Any  # features(images) -> [N, D], name, sha256, provenance()
    reference: Any  # evaluation.ReferenceStats
    reference_sha256: str
    classifier: Any = None  # for class accuracy of class-conditional digits samples
    note: str = ""
    provenance: dict = dataclasses.field(default_factory=dict)  # what the number depends on, for each entry
    floor_pool: Any = None  # features of real images disjoint from the reference (for its noise floor)
    floor_source: str = ""
    extra_references: dict = dataclasses.field(default_factory=dict)  # name -> (ReferenceStats, floor pool)
    memorisation: Any = None  # evaluation.memorisation.Memorisation

    def floor(self, num_samples: int, reference: str | None = None) -> dict | None:
        """The noise floor at `num_samples` of the main reference (or of one of `extra_references`): stored
        with the reference statistics (fid_stats), or measured here from its floor pool and then kept with
        them for this process. None when neither exists."""
        ref, pool, source = (self.reference, self.floor_pool, self.floor_source) if reference is None \
            else self.extra_references[reference]
        stored = (ref.provenance.get("noise_floor") or {}).get(str(num_samples))
        if stored is None and pool is not None:
            from shortcut.evaluation.noise_floor import noise_floor

            stored = noise_floor(pool, ref, num_samples, source=source)
            ref.provenance.setdefault("noise_floor", {})[str(num_samples)] = stored
        return stored


def default_reference_path(spec: Spec) -> Path:
    from shortcut.evaluation.inception_weights import default_weights_dir

    d = spec.data
    return default_weights_dir() / "fid_stats" / f"{d.dataset}_{d.split.replace('/', '-')}_{d.image_size}.npz"


def load_metric(spec: Spec) -> Metric | None:
    """The spec's metric, ready to use; raises EvaluationSetupError/InceptionWeightsError when its
    weights or reference statistics are missing (before any training)."""
    ev = spec.eval
    if ev.metric == "none":
        return None
    if ev.metric == "fd_digits":
        return digits_metric(class_conditional=spec.data.num_classes > 0, heldout_split=spec.data.heldout_split,
                             train_split=spec.data.split)
    path = Path(ev.reference_stats) if ev.reference_stats else default_reference_path(spec)
    return fid_metric(path, ev.inception_weights, verify=ev.verify_inception,
                      how_to_make=f"Compute them once over the whole dataset with\n    fid_stats {spec.name}\n(or set "
                                  "eval.reference_stats to an existing file).")


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


def smoke_metric(spec: Spec) -> Metric | None:
    """For --smoke runs of FID specs: the FID pipeline with stand-ins (randomly initialised Inception at
    75 px, reference statistics of mock images), so decoding and feature statistics are exercised.
    The record's note says it is not an FID. None for other metrics (mock data has no reference)."""
    if spec.eval.metric != "fid":
        return None
    from shortcut.data import make_mock_iterator
    from shortcut.evaluation import InceptionFeatureNet, ReferenceStats
    from shortcut.evaluation.frechet import RunningStats
    from shortcut.evaluation.inception import random_inception_variables

    net = InceptionFeatureNet(random_inception_variables(0), "random-init (smoke)", image_size=75)
    images = make_mock_iterator(image_shape=spec.pixel_shape, num_classes=0, batch_size=16, seed=spec.seed + 7)
    features = np.concatenate([net(next(images)["image"]) for _ in range(2)])
    ref = ReferenceStats.from_running_stats(RunningStats(net.dim).update(features), {
        "dataset": "mock", "feature_net": net.name, "feature_net_sha256": net.sha256}, features)
    return Metric("fid_smoke", net, ref, "mock", note="--smoke: random Inception weights at 75 px and statistics of "
                  "random images stand in for FID's; a pipeline check, not an FID", provenance=net.provenance())


class _Accuracy:
    def __init__(self, classifier):
        self.classifier, self.correct, self.count = classifier, 0, 0

    def update(self, images: np.ndarray, labels: np.ndarray) -> None:
        if self.classifier is not None:
            pred = np.argmax(np.asarray(self.classifier.logits(images)), axis=-1)
            self.correct += int(np.sum(pred == labels))
            self.count += len(labels)


def _sample_writer(spec: Spec, path: Path):
    """With `eval.save_samples`, the writer of a setting's sample file (sample_files.py layout)."""
    if not spec.eval.save_samples:
        return None
    from shortcut.sample_files import SampleFileWriter

    size = spec.data.image_size
    return SampleFileWriter(path, spec.eval.num_samples, (size, size), with_labels=spec.data.num_classes > 0)


def evaluate(spec: Spec, metric: Metric | None, sampler: Callable, params, *, objective, train_step: int,
             rundir: Path, log: Callable[[str], None] = print,
             decode: Callable[[np.ndarray], np.ndarray] | None = None, settings=None,
             grids: bool = True) -> tuple[list[dict], dict]:
    """Sample at each of the spec's evaluation settings (step count N, guidance w: `eval.settings()`, or
    the given `settings`), save a grid per setting (unless not `grids`) and, with a metric, compute it.
    `params` are the ones `eval.params` names. `decode` maps latent samples to images (latent specs)
    before the grids and the metric.

    Returns (evaluation entries, {setting's samples_key: sample info}). Partial feature statistics
    are checkpointed under rundir/eval/, so a killed evaluation continues where it stopped.
    """
    from shortcut.evaluation.sample_metrics import compute_sample_metrics, score_names

    ev = spec.eval
    entries, samples = [], {}
    for setting in ev.settings() if settings is None else settings:
        n, w = setting.num_steps, setting.cfg_scale
        common = dict(shape=spec.input_shape, num_classes=spec.data.num_classes, cfg_scale=w, seed=spec.seed + 1)
        t0 = time.perf_counter()
        if grids:
            grid_images, _ = sample_range(sampler, params, 0, ev.grid_size, num_steps=n, **common)
            grid = save_grid(decode(grid_images) if decode else grid_images,
                             rundir / "samples" / f"steps_{setting.samples_key}.png")
            samples[setting.samples_key] = {"grid": str(grid), "num_steps": n, "cfg_scale": w, "params": ev.params,
                                            "network_evaluations": objective.network_evaluations(n, w)}
        if metric is None:
            continue
        accuracy = _Accuracy(metric.classifier)
        kept: list[np.ndarray] = []  # the samples, for the memorisation score
        writer = _sample_writer(spec, rundir / "samples" / f"steps_{setting.samples_key}.npz")

        def batches(start: int, count: int) -> np.ndarray:
            images, labels = sample_range(sampler, params, start, ev.batch_size, num_steps=n, **common)
            images, labels = images[:count], labels[:count]
            images = decode(images) if decode else images
            accuracy.update(images, labels)
            if metric.memorisation is not None:
                kept.append(np.asarray(images))
            if writer is not None:
                writer.write(start, images, labels)
            return images

        stats_path = rundir / "eval" / f"{metric.name}_step{train_step}_{setting.key}_{ev.params}.npz"
        result = compute_sample_metrics(
            batches, ev.num_samples, ev.batch_size, metric.reference, metric.net, checkpoint_path=stats_path,
            fingerprint=f"{spec.hash()}:{train_step}:{n}:{w}:{spec.seed + 1}:{ev.params}",
            desc=f"{spec.name} eval {n}-step" + (f" w={w:g}" if w != 1 else ""),
            extra_references={name: ref for name, (ref, _, _) in metric.extra_references.items()})
        if writer is not None:  # samples a resumed evaluation did not regenerate
            for start, count in writer.missing(ev.batch_size):
                batches(start, count)
            samples[setting.samples_key]["samples_file"] = str(writer.finish())
        entry = {
            "train_step": train_step, "num_steps": n, "setting": setting.key, "metric": metric.name,
            "value": result.value, **result.record, "num_samples": ev.num_samples, "cfg_scale": w,
            "seed": spec.seed + 1, "params": ev.params, "network_evaluations": objective.network_evaluations(n, w),
            **metric.provenance, "reference_stats_sha256": metric.reference_sha256,
            "reference_provenance": {k: v for k, v in metric.reference.provenance.items() if k != "noise_floor"},
            "noise_floor": _floor_summary(metric.floor(ev.num_samples)), "seconds": time.perf_counter() - t0,
            # the samples' feature mean and covariance (the finished streaming checkpoint), for resampling the
            # reference later (orchestration/reporting/reference_variance.py)
            "feature_stats": str(stats_path.relative_to(rundir)),
        }
        for name in metric.extra_references:
            entry[f"noise_floor_{name}"] = _floor_summary(metric.floor(ev.num_samples, name))
        if kept:  # a resumed evaluation has only the samples it made itself
            entry.update(metric.memorisation.score(np.concatenate(kept)))
        if accuracy.count:
            entry.update(class_accuracy=accuracy.correct / accuracy.count, class_accuracy_samples=accuracy.count)
        if metric.note:
            entry["note"] = metric.note
        entries.append(entry)
        extra = f", class accuracy {entry['class_accuracy']:.3f}" if accuracy.count else ""
        extra += f", noise floor {entry['noise_floor']['value']:.3f}" if entry["noise_floor"] else ""
        extra += "".join(f", {k} {entry[k]:.3f}" for k in ("memorisation", *metric.extra_references) if k in entry)
        extra += "".join(f", {k} {v:.3f}" for k, v in result.record.items() if k in score_names(metric.net.name))
        log(f"step {train_step}: {metric.name} at {n} step(s), w = {w:g}, {ev.params} params = {result.value:.3f} "
            f"({ev.num_samples} samples, {entry['seconds']:.1f}s{extra})")
    return entries, samples


def _floor_summary(floor: dict | None) -> dict | None:
    """What an evaluation entry records of a noise floor (its draws' values stay with the reference)."""
    return None if floor is None else {k: v for k, v in floor.items() if k != "values"}
