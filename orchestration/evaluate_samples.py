"""`evaluate_samples FILE.npz --reference STATS [--json OUT]`: score a sample file with this project's metrics.

FILE is a sample file in the ADM / guided-diffusion evaluation layout (arr_0 = uint8 [N, H, W, 3],
optional arr_1 = labels), as `generate --out x.npz` or `eval.save_samples` write it, or as the official
code, a PyTorch port or another paper's release provides it. STATS is a reference statistics file
(`fid_stats`: FID with the standard FID Inception, whose weights are found as for a run) or `digits`
(fd_digits against the held-out split of the embedded digits; the images must be grey 8x8). The scores come
from the same code as a run's evaluation (shortcut/evaluation/sample_metrics.py): the Frechet
distance, the Inception Score on the same network's logits, improved precision/recall (k = 3) on its
features, and with labels and the digits classifier the class accuracy. The JSON has the same fields
and provenance as an evaluation entry in run.json, plus the sample file and its sha256.

The file's uint8 images enter the metric as u / 127.5 - 1; a run's own evaluation scores its float
samples before that 8-bit rounding, so the two agree closely but not to the last digit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evaluate_samples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="sample file (.npz: arr_0 uint8 [N, H, W, 3], optional arr_1 labels)")
    p.add_argument("--reference", required=True, help="reference statistics file (fid_stats), or 'digits'")
    p.add_argument("--inception-weights", help="FID Inception weights file (default: the standard lookup)")
    p.add_argument("--unverified-weights", action="store_true",
                   help="accept Inception weights that are not the standard file (the result says it is not FID)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", help="also write the scores with their provenance to this file")
    args = p.parse_args(argv)

    from shortcut.errors import ShortcutError
    from shortcut.sample_files import SampleFileError

    try:
        entry = evaluate_file(args.file, args.reference, weights=args.inception_weights,
                              verify=not args.unverified_weights, batch_size=args.batch_size)
    except (ShortcutError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if isinstance(e, SampleFileError) else e}", file=sys.stderr)
        return 2
    print(f"{entry['metric']} = {entry['value']:.4f} ({entry['num_samples']} samples of {args.file})")
    from shortcut import metrics

    for name in metrics.plugin(entry["metric"]).scores:
        if isinstance(entry.get(name), (int, float)):
            print(f"{name} = {entry[name]:.4f}")
    for note in entry.get("score_notes", []) + ([entry["note"]] if entry.get("note") else []):
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(entry, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def evaluate_file(path: str | Path, reference: str, *, weights: str | None = None, verify: bool = True,
                  batch_size: int = 500) -> dict:
    """The evaluation entry (value, scores, provenance) of a sample file against a reference."""
    from shortcut.evaluate import _Accuracy, _floor_summary
    from shortcut.evaluation.digits_metric import digits_metric
    from shortcut.evaluation.fid_metric import fid_metric
    from shortcut.evaluation.inception_weights import sha256_file
    from shortcut.evaluation.reference_stats import ReferenceStats
    from shortcut.evaluation.sample_metrics import compute_sample_metrics
    from shortcut.sample_files import SampleFileError, from_sample_images, read_samples

    t0 = time.perf_counter()
    images, labels = read_samples(path)
    if reference == "digits" or (Path(reference).is_file() and
                                 ReferenceStats.load(reference).provenance.get("feature_net") == "fd_digits"):
        metric, channels = digits_metric(class_conditional=labels is not None, heldout_split="heldout"), 1
        if images.shape[1:3] != (8, 8):
            raise SampleFileError(f"{path}: fd_digits needs 8x8 images, the file has {images.shape[1]}x{images.shape[2]}")
    else:
        metric, channels = fid_metric(Path(reference), weights, verify,
                                      how_to_make="Give a file written by fid_stats, or 'digits'."), 3
    accuracy = _Accuracy(metric.classifier)

    def batches(start: int, count: int):
        x = from_sample_images(images[start:start + count], channels)
        if labels is not None:
            accuracy.update(x, labels[start:start + count])
        return x

    result = compute_sample_metrics(batches, len(images), batch_size, metric.reference, metric.net)
    entry = {"metric": metric.name, "value": result.value, **result.record, "num_samples": len(images),
             **metric.provenance, "reference_stats_sha256": metric.reference_sha256,
             "reference_provenance": {k: v for k, v in metric.reference.provenance.items() if k != "noise_floor"},
             "noise_floor": _floor_summary(metric.floor(len(images))), "samples_file": str(path),
             "samples_sha256": sha256_file(path), "image_size": list(images.shape[1:3]),
             "seconds": time.perf_counter() - t0}
    if accuracy.count:
        entry.update(class_accuracy=accuracy.correct / accuracy.count, class_accuracy_samples=accuracy.count)
    if metric.note:
        entry["note"] = metric.note
    return entry


if __name__ == "__main__":
    sys.exit(main())
