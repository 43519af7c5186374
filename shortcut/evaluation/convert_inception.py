"""One-time conversion of the standard FID Inception weights to this project's .npz.

    python -m shortcut.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth
    python -m shortcut.evaluation.convert_inception inception_v3_weights_fid.pickle --out w.npz

Needs neither torch nor network. The source file's sha256 is checked against the known
values (``--no-verify`` skips that, for custom weights) and recorded in the output.
"""

from __future__ import annotations

import argparse
import sys

from shortcut.evaluation import inception_weights as iw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shortcut.evaluation.convert_inception", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="pytorch-fid .pth or jax-fid .pickle")
    ap.add_argument("--out", default=None,
                    help=f"output .npz (default: {iw.default_weights_dir() / iw.CONVERTED_FILENAME})")
    ap.add_argument("--no-verify", action="store_true", help="do not require a known sha256")
    args = ap.parse_args(argv)
    try:
        out = iw.convert_to_npz(args.source, args.out, expected_sha256=None if args.no_verify else iw.STANDARD)
    except (iw.InceptionWeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (sha256 {iw.sha256_file(out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
