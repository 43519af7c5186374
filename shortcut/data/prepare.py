"""Prepare (build) a dataset once: `python -m shortcut.data.prepare NAME --data_dir DIR`.

NAME is digits, celebahq256, imagenet256 (TFDS imagenet2012 from the manual tars) or any TFDS
name (downloads, so it needs network access).
"""

from __future__ import annotations

import argparse
import sys

from shortcut.data.catalog import default_manual_dir, prepare_builder, resolve_data_dir
from shortcut.data.errors import DatasetNotReadyError
from shortcut.data.sources import load, resolve_source


def prepare_dataset(
    name: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> dict[str, int]:
    """Build dataset `name` in data_dir (a no-op if it is already there).

    manual_dir defaults to <data_dir>/downloads/manual. Returns {split: number of examples}.
    """
    source = resolve_source(name)
    data_dir = resolve_data_dir(data_dir)
    if source.check_files:
        load(source.check_files)(manual_dir or default_manual_dir(data_dir))
    builder = prepare_builder(source, data_dir, manual_dir=manual_dir)
    return {split: info.num_examples for split, info in builder.info.splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shortcut.data.prepare", description=__doc__)
    parser.add_argument("name", help="digits | celebahq256 | imagenet256 | any TFDS dataset name")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR "
                        "or ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="manually downloaded files "
                        "(default <data_dir>/downloads/manual)")
    args = parser.parse_args(argv)
    try:
        splits = prepare_dataset(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
    except DatasetNotReadyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {args.name} in {resolve_data_dir(args.data_dir)}: {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
