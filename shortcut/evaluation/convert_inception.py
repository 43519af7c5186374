"""One-time conversion of the standard FID Inception weights to this project's .npz.

    python -m shortcut.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth
    python -m shortcut.evaluation.convert_inception inception_v3_weights_fid.pickle --out w.npz

Needs neither torch nor network. The source file's sha256 is checked against the known
values (``--no-verify`` skips that, for custom weights) and recorded in the output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shortcut.evaluation import inception_weights as iw
from shortcut.evaluation.inception_head import NPZ_KEY, load_logits_weight


def convert_to_npz(src: str | os.PathLike, dst: str | os.PathLike | None = None,
                   expected_sha256: str | None = iw.STANDARD) -> Path:
    """Convert a .pth or jax-fid pickle to this project's .npz (default: the default weights dir)."""
    loaded = iw.load_inception_weights(src, expected_sha256)
    if loaded.fmt == "npz":
        raise ValueError(f"{src} is already a converted .npz")
    dst = Path(dst) if dst is not None else iw.default_weights_dir() / iw.CONVERTED_FILENAME
    head = load_logits_weight(loaded.path, loaded.fmt)  # kept for the Inception Score
    iw.save_variables_npz(
        dst,
        loaded.variables,
        {
            "source_file": Path(src).name,
            "source_sha256": loaded.file_sha256,
            "source_format": loaded.fmt,
            "params_digest": iw.params_digest(loaded.variables),
        },
        extra=None if head is None else {NPZ_KEY: head},
    )
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shortcut.evaluation.convert_inception", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="pytorch-fid .pth or jax-fid .pickle")
    ap.add_argument("--out", default=None,
                    help=f"output .npz (default: {iw.default_weights_dir() / iw.CONVERTED_FILENAME})")
    ap.add_argument("--no-verify", action="store_true", help="do not require a known sha256")
    args = ap.parse_args(argv)
    try:
        out = convert_to_npz(args.source, args.out, expected_sha256=None if args.no_verify else iw.STANDARD)
    except (iw.InceptionWeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (sha256 {iw.sha256_file(out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
