"""`fid_stats NAME [--set key=value ...] [--out FILE]`: FID reference statistics over an entire split.

The paper computes FID against statistics of the entire dataset. This makes one ordered pass over the
spec's dataset split (same preprocessing as training, no flips), extracts FID Inception pool3
features and writes mu, sigma, count and provenance (dataset, split, image size, feature network and
its sha256), the features of the first 10,000 images (the precision/recall reference set), and the
metric's noise floor at the spec's `eval.num_samples` (and at each `--floor N`), to FILE (default: where
`eval.metric: fid` looks for it). The floor's draws come from those kept images, which are part of the
reference itself (a dataset with a test split has no held-out images here): a lower bound of the floor.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fid_stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="spec whose data section names the dataset, split and image size")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="output .npz (default: the spec's eval.reference_stats or the standard place)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--floor", type=int, action="append", default=[], metavar="N",
                   help="also store the noise floor at N samples (the spec's eval.num_samples always)")
    args = p.parse_args(argv)

    from shortcut.errors import ShortcutError
    from shortcut.spec_files import load_spec

    try:
        spec = load_spec(args.name, args.overrides)
    except ShortcutError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    from pathlib import Path

    from shortcut import data as data_lib
    from shortcut.evaluation.fid_metric import default_reference_path
    from shortcut.evaluation import InceptionFeatureNet, compute_reference_stats
    from shortcut.evaluation.inception_weights import STANDARD
    from shortcut.evaluation.sample_metrics import PR_MAX_SAMPLES

    d, ev = spec.data, spec.eval
    out = Path(args.out or ev.reference_stats or default_reference_path(spec))
    try:
        info = data_lib.check_dataset(d.dataset, split=d.split, data_dir=d.data_dir, image_size=d.image_size)
        net = InceptionFeatureNet.load(ev.inception_weights, expected_sha256=STANDARD if ev.verify_inception else None)
    except ShortcutError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    batches = (b["image"] for b in data_lib.iterate_split(d.dataset, batch_size=args.batch_size, split=d.split,
                                                         data_dir=d.data_dir, image_size=d.image_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = compute_reference_stats(batches, net.features, dataset=d.dataset, split=d.split, feature_net=net.name,
                                  feature_net_sha256=net.sha256, path=out, keep_features=PR_MAX_SAMPLES, total=info.num_examples,
                                  extra_provenance={"image_size": d.image_size, "num_examples": info.num_examples,
                                                    "verified_weights": ev.verify_inception})
    from shortcut.evaluation.noise_floor import noise_floor

    floors = ref.provenance.setdefault("noise_floor", {})
    for n in sorted({ev.num_samples, *args.floor}):
        floors[str(n)] = noise_floor(ref.features, ref, n, source=f"draws from the first {len(ref.features)} images "
                                     "of the reference set itself (no held-out images): a lower bound")
        print(f"noise floor at {n} samples: {floors[str(n)]['value']:.3f} (std {floors[str(n)]['std']:.3f}, "
              f"{floors[str(n)]['draws']} draws)")
    ref.save(out)
    print(f"wrote {out}: {ref.count} images of {d.dataset}/{d.split}, feature net {net.name} {net.sha256[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
