"""Evaluation at each sampling step count: the Frechet distance of generated samples to reference
statistics, streamed and resumable, with everything the number depends on recorded beside it.

The metric (spec `eval.metric`) is a plugin of shortcut/metrics.py (this project's: `fd_digits`,
shortcut/evaluation/digits_metric.py; `fid`, shortcut/evaluation/fid_metric.py), loaded by `metrics.load_metric`.

Every entry records the metric's noise floor at its sample count (evaluation/noise_floor.py: real images
against the same reference) and, where the features allow, the value's bootstrap std over its samples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from shortcut.images import save_grid
from shortcut.evaluation.metric import Metric
from shortcut.sampling import sample_range
from shortcut.spec import Spec


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
    from shortcut.evaluation.sample_metrics import compute_sample_metrics

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
        extra += "".join(f", {k} {v:.3f}" for k, v in result.record.items() if k in metric.net.score_names)
        log(f"step {train_step}: {metric.name} at {n} step(s), w = {w:g}, {ev.params} params = {result.value:.3f} "
            f"({ev.num_samples} samples, {entry['seconds']:.1f}s{extra})")
    return entries, samples


def _floor_summary(floor: dict | None) -> dict | None:
    """What an evaluation entry records of a noise floor (its draws' values stay with the reference)."""
    return None if floor is None else {k: v for k, v in floor.items() if k != "values"}
